"""The anchor's tree space: per-node FLOPs and parameters counted with fvcore."""

from __future__ import annotations

import networkx as nx
import torch

from dymu.models.anchor import Anchor
from dymu.models.flops import head_cost, layer_costs
from dymu.space.graph import build_space


def anchor_space(anchor: Anchor, input_size: tuple[int, int]) -> nx.DiGraph:
    """The space of ``anchor`` at ``input_size`` [H, W] (batch 1; one multiply-add = 1 FLOP)."""
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
    return build_space(anchor.task_names, flops, params, head_flops, head_params)
