"""N streams of one architecture executed as one module: each layer is one batched op.

Every ``nn.Conv2d`` of the N streams becomes one grouped convolution with N times the
channels and every ``nn.BatchNorm2d`` one BatchNorm over N times the channels; activations
and residual additions are elementwise, so they need no change. Stream i's channels sit in
block i of the channel dimension ("stream-major": [B, N * C, H, W]). This is exact — a
grouped convolution never mixes groups and BatchNorm normalises channels independently —
so stacked and per-stream execution agree to rounding, and BatchNorm's running statistics
work as usual (unlike ``vmap`` over ``functional_call``, which cannot update them).

The per-stream modules stay the canonical weights (saved, pruned into trees, exported);
:class:`StackedLayers` is built from them for training and written back afterwards.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

_STACKED = (nn.Conv2d, nn.BatchNorm2d)


def _stack_conv(convs: Sequence[nn.Conv2d]) -> nn.Conv2d:
    c, n = convs[0], len(convs)
    out = nn.Conv2d(
        c.in_channels * n,
        c.out_channels * n,
        c.kernel_size,
        stride=c.stride,
        padding=c.padding,
        dilation=c.dilation,
        groups=c.groups * n,
        bias=c.bias is not None,
        padding_mode=c.padding_mode,
    )
    with torch.no_grad():
        out.weight.copy_(torch.cat([m.weight for m in convs]))  # [N * C_out, C_in / g, k, k]
        if c.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in convs]))
    return out


def _stack_bn(bns: Sequence[nn.BatchNorm2d]) -> nn.BatchNorm2d:
    b, n = bns[0], len(bns)
    out = nn.BatchNorm2d(
        b.num_features * n,
        eps=b.eps,
        momentum=b.momentum,
        affine=b.affine,
        track_running_stats=b.track_running_stats,
    )
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(b, name) is not None:
                getattr(out, name).copy_(torch.cat([getattr(m, name) for m in bns]))
        if b.num_batches_tracked is not None:
            out.num_batches_tracked.copy_(b.num_batches_tracked)
    return out


def stack_modules(modules: Sequence[nn.Module]) -> nn.Module:
    """One module computing all of ``modules`` (same architecture) on stream-major input."""
    template = copy.deepcopy(modules[0])
    names = [name for name, m in template.named_modules() if isinstance(m, _STACKED)]
    for name in names:
        parts = [m.get_submodule(name) for m in modules]
        new = _stack_conv(parts) if isinstance(parts[0], nn.Conv2d) else _stack_bn(parts)
        parent_name, _, attr = name.rpartition(".")
        setattr(template.get_submodule(parent_name) if parent_name else template, attr, new)
    return template


def _unstack_into(stacked: nn.Module, modules: Sequence[nn.Module]) -> None:
    """Copy stream i's slice of every stacked parameter and buffer into ``modules[i]``."""
    n = len(modules)
    with torch.no_grad():
        for name, m in stacked.named_modules():
            if not isinstance(m, _STACKED):
                continue
            for i, target in enumerate(modules):
                dst = target.get_submodule(name)
                for key, value in list(m.named_parameters(recurse=False)) + list(
                    m.named_buffers(recurse=False)
                ):
                    if key == "num_batches_tracked":
                        getattr(dst, key).copy_(value)
                    else:
                        getattr(dst, key).copy_(value.chunk(n, dim=0)[i])


class StackedLayers(nn.Module):
    """Layer l of all N streams as one module; input and output are stream-major."""

    def __init__(self, streams: Sequence[nn.Module], attr: str = "layers") -> None:
        super().__init__()
        self.num_streams = len(streams)
        per_layer = zip(*(getattr(s, attr) for s in streams), strict=True)
        self.layers = nn.ModuleList(stack_modules(list(group)) for group in per_layer)

    def forward(self, image: Tensor) -> list[Tensor]:
        """All layers' outputs, each [B, N * C_l, H_l, W_l], from one image batch [B, C, H, W]."""
        x = image.repeat(1, self.num_streams, 1, 1)  # [B, C, H, W] -> [B, N * C, H, W]
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs

    def unstack_into(self, streams: Sequence[nn.Module], attr: str = "layers") -> None:
        """Write the trained stacked weights back into the per-stream modules."""
        for index, layer in enumerate(self.layers):
            _unstack_into(layer, [getattr(s, attr)[index] for s in streams])


def split_streams(x: Tensor, num_streams: int) -> list[Tensor]:
    """Stream-major [B, N * C, H, W] -> N tensors [B, C, H, W] (views, no copy)."""
    b, nc, *rest = x.shape
    return list(x.view(b, num_streams, nc // num_streams, *rest).unbind(1))
