"""The anchor's tree space: per-node FLOPs and parameters counted with fvcore."""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import torch

from dymu.models.anchor import Anchor
from dymu.models.flops import head_cost, layer_costs, slim_head_costs, slim_layer_costs
from dymu.models.slim import check_widths
from dymu.space.graph import WidthCosts, build_space


def anchor_space(
    anchor: Anchor, input_size: tuple[int, int], widths: Sequence[float] = (1.0,)
) -> nx.DiGraph:
    """The space of ``anchor`` at ``input_size`` [H, W] (batch 1; one multiply-add = 1 FLOP).

    ``widths``: the widths every node may run at (METHOD.md 1.11); more than full width
    alone adds the costs of every (node width, parent width) pair, each counted with fvcore
    on the slimmed layer (a few seconds).
    """
    widths = check_widths(widths)
    n, num_layers = len(anchor.tasks), anchor.num_layers
    flops = [[0] * n for _ in range(num_layers)]
    params = [[0] * n for _ in range(num_layers)]
    for j, stream in enumerate(anchor.streams):
        for layer, (f, p) in enumerate(layer_costs(stream, input_size)):
            flops[layer][j], params[layer][j] = f, p
    was_training = anchor.training
    anchor.eval()
    with torch.no_grad():
        shapes = [f.shape for f in anchor.streams[0](torch.zeros(1, 3, *input_size))]
    anchor.train(was_training)
    head_flops, head_params = [], []
    for task in anchor.tasks:
        head = anchor.heads[task.name]
        low = shapes[head.low_layer] if head.low_layer is not None else None
        f, p = head_cost(head, shapes[-1], low, tuple(input_size))
        head_flops.append(f)
        head_params.append(p)
    wc = None if widths == (1.0,) else _width_costs(anchor, input_size, widths, shapes)
    return build_space(anchor.task_names, flops, params, head_flops, head_params, wc)


def _width_costs(
    anchor: Anchor, input_size: tuple[int, int], widths: tuple[float, ...], shapes: list
) -> WidthCosts:
    """Every node's and head's costs at every width; streams of one architecture (the
    usual anchor) are counted once."""
    n, num_layers = len(anchor.tasks), anchor.num_layers
    per_stream, seen = [], {}
    for stream in anchor.streams:
        key = repr(stream)
        if key not in seen:
            seen[key] = slim_layer_costs(stream, input_size, widths)  # [L][a][b] (f, p)
        per_stream.append(seen[key])

    def table(k: int) -> list:  # [L][N][a][b]: entry k (0 FLOPs, 1 params) of each pair
        return [
            [[[pair[k] for pair in row] for row in per_stream[j][layer]] for j in range(n)]
            for layer in range(num_layers)
        ]

    node_flops, node_params = table(0), table(1)
    head_flops, head_params, low_layers = [], [], []
    for task in anchor.tasks:
        head = anchor.heads[task.name]
        low = shapes[head.low_layer][1:] if head.low_layer is not None else None
        table = slim_head_costs(head, shapes[-1][1:], low, tuple(input_size), widths)
        head_flops.append([[c[0] for c in row] for row in table])
        head_params.append([[c[1] for c in row] for row in table])
        low_layers.append(head.low_layer)
    return WidthCosts(widths, node_flops, node_params, head_flops, head_params, tuple(low_layers))
