"""Weight hypernet (METHOD.md 1.6): BatchNorm affine offsets for every node of the anchor,
and (dymu, METHOD.md 1.9) low-rank adapters on every cross-task edge.

Same input embedding as the edge hypernet (``sum_i r_i e_i + b e_b``), an MLP with three
hidden layers of 100 (ReLU), and one linear output of every node's (delta gamma, delta
beta), plus ``sum_i r_i D_i``: one learned offset vector per task mixed by the preference
(METHOD.md 1.10, as PaLoRA mixes task adapters). The MLP alone can lose its dependence
on r: on MultiMNIST every hidden unit of its last layer ended dead (zero for every
preference and budget), and the 20 preferences gave bit-identical outputs; the mixed
term keeps a path from r to the offsets that no ReLU can cut. Both start at zero, so
training starts exactly at the anchor; the anchor's running statistics stay frozen.
Private nodes (:meth:`~dymu.space.tree.TreeSpec.private`) take no offsets: a task that
shares nothing keeps its single-task network.

BatchNorm offsets scale and shift channels but cannot remap them, which is what a node fed
another stream's features needs. With ``rank > 0`` every cross-task edge (node (l, j) fed by
parent (l - 1, i), i != j) also owns a low-rank delta ``U V^T`` to the first convolution of
node (l, j), the one that reads the parent's output: a learned per-edge weight change,
used only by trees that hold that edge. It is a change of that convolution's weights, so it
folds into the materialized convolution exactly and costs no FLOPs (the identity shortcut
of a residual block is left as it is). ``U`` starts at zero: training starts at the anchor.

With ``task_rank > 0`` every adapted node's first convolution also takes
``sum_i r_i U_i V_i^T``: one rank-``task_rank`` adapter per task, mixed by the preference
(PaLoRA's task adapters, METHOD.md 1.10): a weight change that follows r, which BatchNorm
offsets (a scale and a shift per channel) cannot make. It folds into the convolution at
export like the edge adapters; ``U_i`` starts at zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

ADAPTATION = (
    "BatchNorm offsets = MLP(sum_i r_i e_i + b e_b) + sum_i r_i D_i on every node but the "
    "private ones; rank-k adapters on cross-task edges; sum_i r_i U_i V_i^T task adapters "
    "on the first convolution of every node but the private ones"
)
"""What the weight hypernet predicts and where it applies: part of stage 2's spec, so a
weight hypernet made under another rule is never reused."""

Node = tuple[int, int]
BNLayout = list[tuple[Node, list[tuple[str, int]]]]
EdgeLayout = list[tuple[Node, str, tuple[int, ...]]]


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


def edge_layout(streams: Sequence[nn.Module]) -> EdgeLayout:
    """For every node (l, j) with l >= 1: the name and weight shape of its first
    convolution (the one that reads the parent's output)."""
    layout: EdgeLayout = []
    for layer in range(1, len(streams[0].layers)):
        for j, stream in enumerate(streams):
            name, conv = next(
                (n, m) for n, m in stream.layers[layer].named_modules() if isinstance(m, nn.Conv2d)
            )
            layout.append(((layer, j), f"{name}.weight", tuple(conv.weight.shape)))
    return layout


def build_weight_hypernet(
    num_tasks: int, streams: Sequence[nn.Module], rank: int, task_rank: int = 0
) -> WeightHypernet:
    """The weight hypernet of an anchor's streams, with rank-``rank`` edge adapters and
    rank-``task_rank`` task adapters."""
    convs = edge_layout(streams) if rank or task_rank else None
    return WeightHypernet(
        num_tasks, bn_layout(streams), edges=convs, rank=rank, task_rank=task_rank
    )


class WeightHypernet(nn.Module):
    """(r [N], b) -> per-node BatchNorm offsets ``{(l, j): {"bn.weight": dg, "bn.bias": db}}``."""

    def __init__(
        self,
        num_tasks: int,
        layout: BNLayout,
        *,
        embed_dim: int = 32,
        hidden: int = 100,
        edges: EdgeLayout | None = None,
        rank: int = 0,
        task_rank: int = 0,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.rank, self.task_rank = rank, task_rank
        convs = {node: (name, shape) for node, name, shape in (edges or [])}
        self.edges = convs if rank else {}
        self.convs = convs if task_rank else {}
        self.adapters = nn.ParameterDict()
        gen = torch.Generator().manual_seed(0)
        for (layer, j), (_, shape) in self.edges.items():
            fan_in = math.prod(shape[1:])  # C_in * k * k
            for i in range(num_tasks):
                if i != j:  # [C_out, rank] zeros, [rank, C_in * k * k] small random
                    self.adapters[f"{layer}_{j}_{i}_u"] = nn.Parameter(torch.zeros(shape[0], rank))
                    v = torch.randn(rank, fan_in, generator=gen) / math.sqrt(fan_in)
                    self.adapters[f"{layer}_{j}_{i}_v"] = nn.Parameter(v)
        self.task_adapters = nn.ParameterDict()
        for (layer, j), (_, shape) in self.convs.items():
            fan_in = math.prod(shape[1:])  # C_in * k * k
            u = torch.zeros(num_tasks, shape[0], task_rank)  # [N, C_out, k]
            v = torch.randn(num_tasks, task_rank, fan_in, generator=gen) / math.sqrt(fan_in)
            self.task_adapters[f"{layer}_{j}_u"] = nn.Parameter(u)
            self.task_adapters[f"{layer}_{j}_v"] = nn.Parameter(v)  # [N, k, C_in * k * k]
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
        # [N, total] one offset vector per task, mixed by the preference: a path from r to
        # the offsets that no dead ReLU can cut (zeros: training starts at the anchor).
        self.task_offsets = nn.Parameter(torch.zeros(num_tasks, self.total))

    def flat(self, r: Tensor, b: Tensor | float) -> Tensor:
        """All offsets as one vector [total] (node-major, gamma then beta per BatchNorm)."""
        b = torch.as_tensor(b, dtype=self.budget_embed.dtype, device=self.budget_embed.device)
        r = r.to(self.task_embed)
        p = r @ self.task_embed + b * self.budget_embed  # [E]
        return self.out(self.mlp(p)) + r @ self.task_offsets  # [total]

    def edge_deltas(self, tree) -> dict[Node, dict[str, Tensor]]:
        """The adapters of ``tree``'s cross-task edges as weight deltas ``{node: {conv weight
        name: U V^T}}`` (empty without adapters)."""
        out: dict[Node, dict[str, Tensor]] = {}
        if not self.rank:
            return out
        parents = tree.canonical().parents
        for (layer, j), (name, shape) in self.edges.items():
            i = parents[layer - 1][j]
            if i != j:
                u, v = self.adapters[f"{layer}_{j}_{i}_u"], self.adapters[f"{layer}_{j}_{i}_v"]
                out[(layer, j)] = {name: (u @ v).view(shape)}  # [C_out, C_in, k, k]
        return out

    def task_deltas(self, r: Tensor) -> dict[Node, dict[str, Tensor]]:
        """The task adapters mixed by ``r`` as weight deltas ``{node: {conv weight name:
        sum_i r_i U_i V_i^T}}`` (empty without task adapters)."""
        out: dict[Node, dict[str, Tensor]] = {}
        for (layer, j), (name, shape) in self.convs.items():
            u, v = self.task_adapters[f"{layer}_{j}_u"], self.task_adapters[f"{layer}_{j}_v"]
            mixed = torch.einsum("i,iok,ikf->of", r.to(u), u, v)  # [C_out, C_in * k * k]
            out[(layer, j)] = {name: mixed.view(shape)}  # [C_out, C_in, k, k]
        return out

    def forward(self, r: Tensor, b: Tensor | float, tree=None) -> dict[Node, dict[str, Tensor]]:
        """Per node, ``{parameter name: delta}``: BatchNorm offsets and task adapters for
        (r, b), and with a ``tree`` the adapters of its cross-task edges (added to the task
        adapters of the same convolution)."""
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
        extra = [self.task_deltas(r)]
        if tree is not None:
            extra.append(self.edge_deltas(tree))
        for deltas_of in extra:
            for node, deltas in deltas_of.items():
                mine = out.setdefault(node, {})
                for name, d in deltas.items():
                    mine[name] = mine[name] + d if name in mine else d
        return out
