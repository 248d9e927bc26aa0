"""Weight hypernet (METHOD.md 1.6): BatchNorm affine offsets for every node of the anchor.

Same input embedding as the edge hypernet (``sum_i r_i e_i + b e_b``), an MLP with three
hidden layers of 100 (ReLU), and one linear output of every node's (delta gamma, delta
beta). The output layer starts at zero, so training starts exactly at the anchor; the
anchor's running statistics stay frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

Node = tuple[int, int]
BNLayout = list[tuple[Node, list[tuple[str, int]]]]


def bn_layout(streams: Sequence[nn.Module]) -> BNLayout:
    """For every node (l, j), layer-major: the BatchNorm modules of stream j's layer l as
    (name inside the layer, number of channels)."""
    layout: BNLayout = []
    num_layers = len(streams[0].layers)
    for layer in range(num_layers):
        for j, stream in enumerate(streams):
            bns = [
                (name, m.num_features)
                for name, m in stream.layers[layer].named_modules()
                if isinstance(m, nn.BatchNorm2d) and m.affine
            ]
            layout.append(((layer, j), bns))
    return layout


class WeightHypernet(nn.Module):
    """(r [N], b) -> per-node BatchNorm offsets ``{(l, j): {"bn.weight": dg, "bn.bias": db}}``."""

    def __init__(
        self, num_tasks: int, layout: BNLayout, *, embed_dim: int = 32, hidden: int = 100
    ) -> None:
        super().__init__()
        self.layout = layout
        self.total = sum(2 * c for _, bns in layout for _, c in bns)
        self.task_embed = nn.Parameter(torch.randn(num_tasks, embed_dim) * 0.1)
        self.budget_embed = nn.Parameter(torch.randn(embed_dim) * 0.1)
        self.mlp = nn.Sequential(
            nn.Linear(embed_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.out = nn.Linear(hidden, self.total)
        nn.init.zeros_(self.out.weight)  # offsets start at exactly zero: the anchor itself
        nn.init.zeros_(self.out.bias)

    def flat(self, r: Tensor, b: Tensor | float) -> Tensor:
        """All offsets as one vector [total] (node-major, gamma then beta per BatchNorm)."""
        b = torch.as_tensor(b, dtype=self.budget_embed.dtype, device=self.budget_embed.device)
        p = r.to(self.task_embed) @ self.task_embed + b * self.budget_embed  # [E]
        return self.out(self.mlp(p))

    def forward(self, r: Tensor, b: Tensor | float) -> dict[Node, dict[str, Tensor]]:
        flat = self.flat(r, b)
        out: dict[Node, dict[str, Tensor]] = {}
        offset = 0
        for node, bns in self.layout:
            deltas = {}
            for name, c in bns:
                prefix = f"{name}." if name else ""
                deltas[prefix + "weight"] = flat[offset : offset + c]
                deltas[prefix + "bias"] = flat[offset + c : offset + 2 * c]
                offset += 2 * c
            out[node] = deltas
        return out
