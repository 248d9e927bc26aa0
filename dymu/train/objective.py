"""Stage 1's objective for one step (METHOD.md 1.5, 1.9): the preference-weighted task
term, the branching regulariser Omega and the FLOPs term, each averaged over the step's
draws; :class:`Flops` holds the space's FLOPs tables on the training device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx
import torch

from dymu.config import Stage1Config
from dymu.losses import budget_penalty, budget_target, omega, omega_budget, p_use, task_loss
from dymu.space.graph import anchor_flops, costs, min_flops
from dymu.tasks import Task
from dymu.train.draws import Draws


@dataclass(frozen=True)
class Flops:
    """The space's FLOPs that the budget penalty needs, on the training device."""

    nodes: torch.Tensor  # [L, N] float64
    heads: torch.Tensor  # [N] float64
    full: float  # the anchor's
    low: float  # the cheapest tree's, as a fraction of the anchor's

    @classmethod
    def of(cls, space: nx.DiGraph, device: torch.device) -> Flops:
        node_flops, _, head_flops, _ = costs(space)
        full = float(anchor_flops(space))
        return cls(
            torch.tensor(node_flops, dtype=torch.float64, device=device),
            torch.tensor(head_flops, dtype=torch.float64, device=device),
            full,
            min_flops(space) / full,
        )


def step_terms(
    out: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    tasks: Sequence[Task],
    parts: list[tuple[int, slice, float]],
    s1: Stage1Config,
    draws: Draws,
    scales: torch.Tensor,
    affinity: torch.Tensor,
    flops: Flops,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three terms of a stage-1 step, each the mean over the G draws.

    Args:
        out, batch: the network's outputs and the targets for this rank's images.
        tasks: the anchor's tasks.
        parts: :func:`group_parts` of the global batch for this rank.
        s1: the stage-1 config (draws, regulariser, lambdas).
        draws: the step's :func:`draw_parents`.
        scales: [N] loss scales w_i; affinity: [N, N] symmetric.
        flops: the space's FLOPs.

    Returns:
        ``(L_task, Omega, budget penalty)``; ``L_task`` holds only this rank's shares of
        the draws' groups (the ranks' values add up to the global one).
    """
    rs, nu = draws.rs, draws.nu
    l_task = reg = penalty = torch.zeros((), device=rs.device)
    for g, rows, share in parts:
        losses = torch.stack([t.loss(out[t.name][rows], batch[t.name][rows]) for t in tasks])
        l_task = l_task + share * task_loss(losses, rs[g], scales) / s1.draws
    for g in range(s1.draws):
        choice = nu[g] if s1.regularise == "alpha" else draws.v[g]
        regulariser = omega if s1.objective == "paper" else omega_budget
        term = regulariser(
            choice,
            affinity,
            rs[g],
            p_use(nu[g]).detach(),
            draws.cs[g],  # paper: c on L_active; budget: the tightness on all of Omega
            lambda_a=s1.lambda_active,
            lambda_i=s1.lambda_inactive,
        )
        reg = reg + term / s1.draws
        b = float(draws.bs[g])
        if s1.objective == "paper":
            over = budget_penalty(nu[g], flops.nodes, flops.heads, b, flops.full)
        else:
            over = budget_target(nu[g], flops.nodes, flops.heads, b, flops.full, s1.lambda_under)
        penalty = penalty + over / s1.draws
    return l_task, reg, penalty
