"""Slimmable layers and heads: one set of weights run at several widths (METHOD.md 1.11).

A layer at width ``w`` keeps the first ``width_channels(C, w)`` of each of its channel
dimensions (Yu et al., slimmable networks): every convolution's output channels, and so
every BatchNorm's features, and the inputs that its parent's width leaves it. A head keeps
its own widths and reads the first channels its inputs have.

One rule decides every slice: :func:`skeleton` builds the slimmed architecture (fresh
modules with the sliced shapes), and :func:`sliced_state` cuts the original's parameters
and buffers to the skeleton's shapes, first entries along every dimension. Training runs
the skeleton on views of the full weights (:func:`run`, gradients and BatchNorm statistics
reach the full tensors); materialization copies the views into the skeleton (:func:`slim`);
pricing counts the skeleton with fvcore. So what is priced, trained and exported is one
network.

Residual shortcuts without a projection add the input to the output channel by channel;
when the input is narrower or wider than the output, :class:`ChannelMatch` zero-pads or
cuts it, which at equal widths is the identity.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from dymu.errors import UserError
from dymu.models.backbones import BasicBlock, InvertedResidual
from dymu.models.heads import ASPPPooling, ClassificationHead, DeepLabV3PlusHead, Head

FULL = 1.0


def width_channels(channels: int, width: float) -> int:
    """Channels a dimension of ``channels`` keeps at ``width``: rounded half up, at least 1.

    ``math.floor(x + 0.5)`` rather than ``round`` (banker's rounding), so 16 x 0.5 x ...
    never depends on a tie rule.
    """
    if not 0.0 < width <= FULL:
        raise UserError(f"a width must be in (0, 1], got {width!r}")
    return max(1, math.floor(channels * width + 0.5))


def check_widths(widths: Sequence[float]) -> tuple[float, ...]:
    """``widths`` as a sorted tuple of distinct floats in (0, 1] that contains 1.0.

    Full width must be in the set: it is the anchor's, and budget 1 must reach it.
    """
    try:
        out = tuple(sorted({float(w) for w in widths}))
    except (TypeError, ValueError) as exc:
        raise UserError(f"widths must be numbers in (0, 1], got {widths!r}") from exc
    if not out or any(not 0.0 < w <= FULL for w in out):
        raise UserError(f"widths must be numbers in (0, 1], got {list(widths)!r}")
    if out[-1] != FULL:
        raise UserError(f"widths must include 1.0 (the anchor's width), got {list(out)!r}")
    return out


class ChannelMatch(nn.Module):
    """An identity shortcut between ``in_channels`` and ``out_channels``: channel c of the
    input is added to channel c of the output; missing channels are zero, extra ones cut."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.in_channels >= self.out_channels:
            return x[:, : self.out_channels]  # [B, in, h, w] -> [B, out, h, w]
        # [B, in, h, w] -> [B, out, h, w]: zeros after the input's channels
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - self.in_channels))


class SlimInvertedResidual(InvertedResidual):
    """An inverted-residual block whose shortcut may join unequal widths (ChannelMatch)."""

    shortcut: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return self.shortcut(x) + self.conv(x)
        return self.conv(x)


def _conv(conv: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    """A fresh convolution like ``conv`` with other channel counts (depthwise stays so)."""
    depthwise = conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels
    if conv.groups > 1 and not depthwise:
        raise UserError(f"cannot slim a grouped convolution with {conv.groups} groups")
    if depthwise:
        out_channels = in_channels
    return nn.Conv2d(
        in_channels,
        out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        groups=in_channels if depthwise else 1,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )


def _bn(bn: nn.BatchNorm2d, channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)


def _chain(module: nn.Module, in_channels: int, width: float) -> tuple[nn.Module, int]:
    """The skeleton of ``module`` read by ``in_channels`` channels, and its output channels."""
    if isinstance(module, nn.Conv2d):
        conv = _conv(module, in_channels, width_channels(module.out_channels, width))
        return conv, conv.out_channels
    if isinstance(module, nn.BatchNorm2d):
        return _bn(module, in_channels), in_channels
    if type(module) is nn.Sequential:
        parts, channels = [], in_channels
        for name, child in module.named_children():
            part, channels = _chain(child, channels, width)
            parts.append((name, part))
        return nn.Sequential(OrderedDict(parts)), channels
    if type(module) is BasicBlock:
        block = BasicBlock.__new__(BasicBlock)
        nn.Module.__init__(block)
        block.conv1, mid = _chain(module.conv1, in_channels, width)
        block.bn1 = _bn(module.bn1, mid)
        block.relu = copy.deepcopy(module.relu)
        block.conv2, out = _chain(module.conv2, mid, width)
        block.bn2 = _bn(module.bn2, out)
        if isinstance(module.downsample, nn.Identity):
            block.downsample = ChannelMatch(in_channels, out)
        else:
            block.downsample, _ = _chain(module.downsample, in_channels, width)
        block.train(module.training)
        return block, out
    if type(module) in (InvertedResidual, SlimInvertedResidual):
        block = SlimInvertedResidual.__new__(SlimInvertedResidual)
        nn.Module.__init__(block)
        block.use_res_connect = module.use_res_connect
        block.conv, out = _chain(module.conv, in_channels, width)
        block.shortcut = ChannelMatch(in_channels, out)
        block.train(module.training)
        return block, out
    if isinstance(module, (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.Identity, nn.Dropout)):
        return copy.deepcopy(module), in_channels
    raise UserError(f"cannot slim a {type(module).__name__}: no width rule for it")


def skeleton(layer: nn.Module, in_channels: int, width: float) -> nn.Module:
    """The architecture of ``layer`` at ``width`` read by ``in_channels`` channels.

    Its parameters are freshly initialised; fill them with :func:`sliced_state`.
    """
    out, _ = _chain(layer, in_channels, width)
    return _like(out, layer).train(layer.training)


def without_statistics(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose BatchNorms keep no running statistics, so they normalise
    with each batch's own in training and evaluation alike (a narrowed node's, until
    statistics are calibrated for its configuration)."""
    out = copy.deepcopy(module)
    for m in out.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                m.register_buffer(name, None)
    return out


def _like(module: nn.Module, original: nn.Module) -> nn.Module:
    """``module`` on ``original``'s device and in its floating dtype."""
    p = next(original.parameters(), None)
    return module if p is None else module.to(device=p.device, dtype=p.dtype)


def out_channels(layer: nn.Module, in_channels: int, width: float) -> int:
    """Output channels of ``layer`` at ``width`` (what its children read)."""
    return _chain(layer, in_channels, width)[1]


def _input_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    return _conv(conv, in_channels, conv.out_channels)


def head_skeleton(head: Head, high_channels: int, low_channels: int | None) -> Head:
    """``head`` reading ``high_channels`` (and ``low_channels``) channels, its own widths
    kept: only the convolutions and linear layer that read its inputs change."""
    out = copy.deepcopy(head)
    if isinstance(out, DeepLabV3PlusHead):
        for branch in out.aspp.branches:
            seq = branch.proj if isinstance(branch, ASPPPooling) else branch
            seq[0] = _input_conv(seq[0], high_channels)
        if out.low_proj is not None:
            if low_channels is None:
                raise ValueError("this head reads low-level features: give low_channels")
            out.low_proj[0] = _input_conv(out.low_proj[0], low_channels)
        return _like(out, head)
    if isinstance(out, ClassificationHead):
        fc = out.fc
        out.fc = nn.Linear(high_channels, fc.out_features, bias=fc.bias is not None)
        return _like(out, head)
    raise UserError(f"cannot slim a {type(head).__name__}: no width rule for it")


def sliced_state(
    original: nn.Module | Mapping[str, Tensor], skeleton_module: nn.Module
) -> dict[str, Tensor]:
    """Views of ``original``'s parameters and buffers (a module, or a name -> tensor map
    such as parameters shifted by the weight hypernet) cut to ``skeleton_module``'s
    shapes: the first entries along every dimension (the slimmable-network rule)."""
    if isinstance(original, nn.Module):
        full = dict(original.named_parameters())
        full.update(original.named_buffers())
    else:
        full = dict(original)
    out = {}
    for name, small in [*skeleton_module.named_parameters(), *skeleton_module.named_buffers()]:
        big = full[name]
        if big.dim() != small.dim():
            raise ValueError(f"{name}: {tuple(big.shape)} cannot be cut to {tuple(small.shape)}")
        out[name] = big[tuple(slice(0, s) for s in small.shape)]
    return out


def run(
    module: nn.Module,
    skeleton_module: nn.Module,
    *inputs: object,
    state: Mapping[str, Tensor] | None = None,
) -> object:
    """``skeleton_module`` run on views of ``module``'s weights (or of ``state``, e.g. its
    parameters shifted by the weight hypernet; what it does not name comes from
    ``module``), each submodule in ``module``'s mode:
    gradients reach the full tensors and BatchNorm running statistics update their first
    entries in place."""
    modes = {name: m.training for name, m in module.named_modules()}
    for name, m in skeleton_module.named_modules():
        m.training = modes.get(name, module.training)
    full = {**dict(module.named_parameters()), **dict(module.named_buffers()), **(state or {})}
    weights = sliced_state(full, skeleton_module)
    return functional_call(skeleton_module, weights, inputs)


def slim(original: nn.Module, skeleton_module: nn.Module) -> nn.Module:
    """``skeleton_module`` holding copies of ``original``'s sliced weights (materialization):
    a plain module with no reference to ``original``."""
    out = copy.deepcopy(skeleton_module)
    state = {k: v.detach().clone() for k, v in sliced_state(original, out).items()}
    out.load_state_dict(state, strict=True)
    return out


_SKELETONS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, nn.Module]] = (
    weakref.WeakKeyDictionary()
)
"""Every skeleton built so far, per module it slims (see :class:`Skeletons`)."""


class Skeletons:
    """Skeletons built once per (module, input channels, width) and reused by every caller.

    Building one constructs and initialises fresh modules, far slower than running it; the
    joint stage builds a new :class:`~dymu.space.treenet.TreeNet` per tree and step, so the
    cache is shared by the whole process, held weakly by the modules it slims (a skeleton's
    own parameters are never read: :func:`run` passes the sliced weights).
    """

    def _get(self, module: nn.Module, key: tuple, build) -> nn.Module:
        per_module = _SKELETONS.setdefault(module, {})
        if key not in per_module:
            per_module[key] = build()
        return per_module[key]

    def layer(
        self, module: nn.Module, in_channels: int, width: float, batch_stats: bool = False
    ) -> nn.Module:
        """``module``'s skeleton; with ``batch_stats``, one whose BatchNorms normalise with
        batch statistics (:func:`without_statistics`)."""

        def build() -> nn.Module:
            sk = skeleton(module, in_channels, width)
            return without_statistics(sk) if batch_stats else sk

        return self._get(module, ("layer", in_channels, width, batch_stats), build)

    def head(self, head: Head, high_channels: int, low_channels: int | None) -> Head:
        key = ("head", high_channels, low_channels)
        return self._get(head, key, lambda: head_skeleton(head, high_channels, low_channels))  # type: ignore[return-value]
