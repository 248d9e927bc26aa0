"""Expected FLOPs of a configuration drawn from parent and width distributions (METHOD.md
1.11): the budget term's path into the width distributions, as
:func:`~dymu.losses.branching.expected_flops` is into the parent ones.

Parent choices, and each node's width, are drawn independently. A node's cost depends on
its own width and its parent's, a head's on the widths of the nodes it reads, so

    E[FLOPs] = sum_{l, j} P_use(l, j) E[cost(l, j) | used] + sum_j E[head_j]
    E[cost(l, j) | used] = sum_i nu[l-1, j, i] omega[l-1, i]^T T[l, j] omega[l, j]
    E[head_j] = sum_s q[low, j, s] omega[L-1, j]^T H[j] omega[low, s]

with ``T[l, j][a, b]`` node (l, j)'s FLOPs at width b read by a parent at width a, ``H``
the heads' tables and ``q`` the path weights (:func:`~dymu.models.mixture.path_weights`:
the probability that task j's path runs through node (low, s)). Whether (l, j) is used
depends only on choices above it, its parent and the widths on neither, so each term is
exact; ``P_use`` carries :func:`~dymu.losses.branching.p_use`'s mean-field approximation
(exact for one-hot choices, and for two layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch
from torch import Tensor

from dymu.losses.branching import p_use
from dymu.models.mixture import path_weights
from dymu.space.graph import width_costs


@dataclass(frozen=True)
class WidthTables:
    """A slimmable space's FLOPs tables as tensors on the training device.

    Attributes:
        first: ``[N, K]`` layer 0's node FLOPs per own width (it reads the image).
        nodes: ``[L-1, N, K, K]`` layers 1..L-1, ``[parent width, own width]``.
        heads: ``[N, K, K]`` each head per (last node width, low-level node width); a head
            that reads no low-level node has the same value in every column.
        low_layers: the layer each head's low-level input comes from, or None.
    """

    first: Tensor
    nodes: Tensor
    heads: Tensor
    low_layers: tuple[int | None, ...]

    @classmethod
    def of(cls, space: nx.DiGraph, device: torch.device | str = "cpu") -> WidthTables:
        wc = width_costs(space)
        if wc is None:
            raise ValueError("the space has no widths: use expected_flops")
        k = len(wc.widths)

        def t(values) -> Tensor:
            return torch.tensor(values, dtype=torch.float64, device=device)

        first = t([cell[0] for cell in wc.node_flops[0]])  # [N, K]
        nodes = t([row for row in wc.node_flops[1:]])  # [L-1, N, K, K]
        heads = torch.stack(
            [t(cell).expand(k, k) if len(cell[0]) == 1 else t(cell) for cell in wc.head_flops]
        )  # [N, K, K]
        return cls(first, nodes, heads, tuple(wc.low_layers))


def expected_flops_widths(nu: Tensor, omega: Tensor, tables: WidthTables) -> Tensor:
    """Expected FLOPs (fvcore counts) of a configuration drawn from ``nu`` [L-1, N, N] and
    ``omega`` [L, N, K] (each row a distribution); gradients flow into both."""
    nu = nu.to(tables.nodes.dtype)
    omega = omega.to(tables.nodes.dtype)
    pu = p_use(nu)  # [L, N]
    total = (pu[0] * torch.einsum("jb,jb->j", omega[0], tables.first)).sum()
    # [N(j), N(i)]: node (l, j)'s expected cost when it reads node (l-1, i)
    pairs = torch.einsum("lia,ljab,ljb->lji", omega[:-1], tables.nodes, omega[1:])
    total = total + (pu[1:] * (nu * pairs).sum(-1)).sum()
    q = path_weights(nu)  # [L, N(tasks), N(nodes)]
    last = omega[-1]  # [N, K]
    for j, low in enumerate(tables.low_layers):
        if low is None:
            total = total + last[j] @ tables.heads[j][:, 0]
        elif low == len(omega) - 1:  # it reads its own last node twice: one width
            total = total + last[j] @ torch.diagonal(tables.heads[j])
        else:
            reads = q[low, j] @ omega[low]  # [K]: width distribution of the node it reads
            total = total + last[j] @ tables.heads[j] @ reads
    return total
