"""FLOPs and parameter counts per layer and per head (fvcore: one fused multiply-add = 1 FLOP).

The search space prices a tree as the sum of its used nodes and its heads (METHOD.md 1.2),
so every layer is counted alone, at batch 1, on a zero tensor of the shape it really
receives. fvcore counts each operator from its shapes only, so these per-layer counts add
up exactly to fvcore's count of the whole backbone. Modules are counted in eval mode (fvcore
prices a batch norm differently in training) and put back in their own modes afterwards.

What fvcore counts: convolutions and linear layers as multiply-adds, bilinear upsampling
and adaptive pooling per element; it ignores ReLUs, max pooling and elementwise sums. Its
warnings about those uncounted operators are silenced. Batch norm (fvcore: 2 per element
in eval mode) is counted as 0 here: every deployed tree has its batch norms folded into
the preceding convolutions (``dymu.compile.materialize``), so the space prices what runs on
the device, and fvcore's count of a materialized tree equals the space's prediction.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from dymu.models.backbones import Backbone
from dymu.models.heads import Head


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode and restore every submodule's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _Bound(nn.Module):
    """Calls ``module`` with constant non-tensor arguments bound, so fvcore can trace it.

    fvcore traces with ``torch.jit``, which accepts only tensor inputs; ``None`` and
    ``out_size`` tuples are held here and put back in their places on every call.
    """

    def __init__(self, module: nn.Module, inputs: Sequence[object]) -> None:
        super().__init__()
        self.module = module
        self.inputs = list(inputs)
        self.slots = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]

    def forward(self, *tensors: Tensor) -> object:
        args = list(self.inputs)
        for i, t in zip(self.slots, tensors, strict=True):
            args[i] = t
        return self.module(*args)


def count_flops(module: nn.Module, *inputs: object) -> int:
    """fvcore's FLOP count of ``module(*inputs)``; non-tensor inputs are passed as constants.

    Args:
        module: any module; counted in eval mode, its modes are restored afterwards.
        *inputs: the forward arguments (tensors, and e.g. None or a size tuple).

    Returns:
        Total FLOPs (fused multiply-adds) over all operators fvcore supports.
    """
    bound = _Bound(module, inputs)
    tensors = tuple(x for x in inputs if isinstance(x, Tensor))
    with _eval_mode(module), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices and tracer chatter
        from fvcore.nn import FlopCountAnalysis  # its import already calls torch.jit.script

        analysis = FlopCountAnalysis(bound, tensors)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        analysis.set_op_handle("aten::batch_norm", _folded)  # see the module docstring
        return int(analysis.total())


def _folded(inputs: object, outputs: object) -> int:
    """fvcore handle of a batch norm that deployment folds into its convolution: 0 FLOPs."""
    return 0


def count_params(module: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics are not parameters)."""
    return sum(p.numel() for p in module.parameters())


def layer_output_shapes(
    backbone: Backbone, input_size: tuple[int, int], in_channels: int = 3
) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` of every layer's output for one ``[in_channels, *input_size]`` image."""
    x = torch.zeros(1, in_channels, *input_size)
    with _eval_mode(backbone), torch.no_grad():
        return [tuple(out.shape[1:]) for out in backbone(x)]  # type: ignore[misc]


def layer_costs(
    backbone: Backbone, input_size: tuple[int, int], in_channels: int = 3
) -> list[tuple[int, int]]:
    """``(flops, params)`` of each layer at batch 1 for an ``input_size`` image.

    Each layer is counted alone on a zero tensor of the shape it receives inside the
    backbone, so the FLOPs sum to ``count_flops(backbone, image)``.
    """
    out_shapes = layer_output_shapes(backbone, input_size, in_channels)
    in_shapes = [(in_channels, *input_size), *out_shapes[:-1]]  # layer l reads layer l - 1
    return [
        (count_flops(layer, torch.zeros(1, *shape)), count_params(layer))
        for layer, shape in zip(backbone.layers, in_shapes, strict=True)
    ]


def _batched(shape: Sequence[int]) -> tuple[int, ...]:
    return (1, *shape) if len(shape) == 3 else tuple(shape)


def head_cost(
    head: Head,
    high_shape: Sequence[int],
    low_shape: Sequence[int] | None,
    out_size: tuple[int, int],
) -> tuple[int, int]:
    """``(flops, params)`` of ``head`` for one image.

    Args:
        head: the head to count.
        high_shape: ``(C, h, w)`` of its ``high`` input (a 4-tuple is taken as batched).
        low_shape: ``(C, h, w)`` of its ``low`` input, or None when the head reads none.
        out_size: ``(H, W)`` of the dense output.
    """
    high = torch.zeros(_batched(high_shape))
    low = None if low_shape is None else torch.zeros(_batched(low_shape))
    return count_flops(head, high, low, tuple(out_size)), count_params(head)


def slim_layer_costs(
    backbone: Backbone,
    input_size: tuple[int, int],
    widths: Sequence[float],
    in_channels: int = 3,
) -> list[list[list[tuple[int, int]]]]:
    """``costs[l][a][b]`` = ``(flops, params)`` of layer ``l`` at width ``widths[b]`` read
    by its parent at width ``widths[a]`` (METHOD.md 1.11); layer 0 reads the image, so
    ``costs[0]`` has one row.

    Each entry is fvcore's count of the slimmed layer (:func:`dymu.models.slim.skeleton`),
    the module that materialization exports, so a priced configuration and fvcore's count
    of its materialized network agree exactly. Layers of equal structure and input shape
    (the N streams of an anchor) are counted once.
    """
    from dymu.models import slim  # slim imports heads, which import nothing from here

    spatial = [(*input_size,), *(s[1:] for s in layer_output_shapes(backbone, input_size))]
    table: list[list[list[tuple[int, int]]]] = []
    reads = [in_channels]  # channels layer 0 may be read with
    for layer_index, layer in enumerate(backbone.layers):
        rows = []
        for cin in reads:
            x = torch.zeros(1, cin, *spatial[layer_index])
            row = []
            for w in widths:
                sk = slim.skeleton(layer, cin, w)
                row.append((count_flops(sk, x), count_params(sk)))
            rows.append(row)
        table.append(rows)
        reads = [slim.out_channels(layer, reads[-1], w) for w in widths]
    return table


def slim_head_costs(
    head: Head,
    high_shape: Sequence[int],
    low_shape: Sequence[int] | None,
    out_size: tuple[int, int],
    widths: Sequence[float],
) -> list[list[tuple[int, int]]]:
    """``costs[a][c]`` = ``(flops, params)`` of ``head`` reading its high input at width
    ``widths[a]`` and its low input at ``widths[c]`` (one column when it reads none).

    ``high_shape`` and ``low_shape`` are the full-width ``(C, h, w)`` inputs; the head
    keeps its own widths (:func:`dymu.models.slim.head_skeleton`).
    """
    from dymu.models import slim

    lows = [None] if low_shape is None else list(widths)
    table = []
    for wh in widths:
        high_c = slim.width_channels(high_shape[0], wh)
        row = []
        for wl in lows:
            low_c = None if wl is None else slim.width_channels(low_shape[0], wl)
            sk = slim.head_skeleton(head, high_c, low_c)
            high = (high_c, *high_shape[1:])
            low = None if low_c is None else (low_c, *low_shape[1:])
            row.append(head_cost(sk, high, low, out_size))
        table.append(row)
    return table
