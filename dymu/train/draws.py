"""What the hypernetwork stages draw each step: preferences and budgets (mixed with what
the evaluation asks for), stage 1's parent samples, and where each draw's group of the
global batch lies in a ``torchrun`` rank's part of it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dymu import dist
from dymu.config import Stage1Config
from dymu.hypernet.edge import EdgeHypernet, sample_parents, temperature


def group_parts(batch_size: int, groups: int, part: dist.Shard) -> list[tuple[int, slice, float]]:
    """Where each draw's group of a global batch lies in this rank's part of it.

    The global batch of ``batch_size`` images is split into ``groups`` equal consecutive
    groups (group g runs with draw g); the rank holds the contiguous ``part``.

    Returns:
        ``(g, local slice, share)`` for every group the rank holds images of: the slice
        indexes the rank's part, and ``share`` is the fraction of group g it holds, so that
        ``sum over ranks of share * (mean loss over the held images)`` is the group's mean.
    """
    size = batch_size // groups
    mine = part.part(batch_size)
    out = []
    for g in range(groups):
        lo, hi = max(g * size, mine.start), min((g + 1) * size, mine.stop)
        if lo < hi:
            out.append((g, slice(lo - mine.start, hi - mine.start), (hi - lo) / size))
    return out


@dataclass(frozen=True)
class Draws:
    """One step's G draws of (r, b) and the parent weights sampled for them."""

    rs: torch.Tensor  # [G, N] preferences
    bs: np.ndarray  # [G] budgets
    nu: torch.Tensor  # [G, L-1, N, N] parent probabilities alpha(r, b)
    v: torch.Tensor  # [G, L-1, N, N] Gumbel-softmax samples of nu
    cs: list[float]  # [G] the paper's frugality knob c implied by each b
    tau: float  # the Gumbel-softmax temperature of this step


def draw_preferences_budgets(
    s1: Stage1Config, num_tasks: int, low: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """G pairs (r [G, N], b [G]) for one step.

    ``objective: paper``: r ~ Dirichlet(dirichlet), b ~ U(low, 1). ``objective: budget``
    mixes in what the evaluation asks for (METHOD.md 1.9): a share ``uniform_share`` of the
    preferences is uniform on the simplex, and a share ``full_budget_share`` of the budgets
    is exactly 1 (:func:`mix_evaluation_draws`).
    """
    g = s1.draws
    rs = rng.dirichlet([s1.dirichlet] * num_tasks, size=g)  # [G, N]
    bs = rng.uniform(low, 1.0, size=g)  # [G]
    if s1.objective == "paper":
        return rs, bs
    return mix_evaluation_draws(rs, bs, s1.uniform_share, s1.full_budget_share, rng)


def mix_evaluation_draws(
    rs: np.ndarray,
    bs: np.ndarray,
    uniform_share: float,
    full_budget_share: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace a share of the draws (r [G, N], b [G]) by what the evaluation asks for: a
    preference uniform on the simplex (``uniform_share``), a budget of exactly 1
    (``full_budget_share``). Both replacements are drawn every time, then picked, so the
    generator's sequence does not depend on the shares (stages 1 and 2)."""
    g, num_tasks = rs.shape
    flat = rng.dirichlet([1.0] * num_tasks, size=g)  # [G, N] uniform on the simplex
    coins = rng.uniform(size=(2, g))  # [2, G]
    rs = np.where((coins[0] < uniform_share)[:, None], flat, rs)
    bs = np.where(coins[1] < full_budget_share, 1.0, bs)
    return rs, bs


def draw_parents(
    hypernet,
    edge: EdgeHypernet,
    s1: Stage1Config,
    step: int,
    low: float,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
) -> Draws:
    """Stage 1's draws for one step: G pairs (r ~ Dirichlet, b ~ U(low, 1)), alpha(r, b)
    from ``hypernet`` (``edge`` itself, or its DDP wrapper), and Gumbel-softmax samples.

    Consumes ``rng`` and ``gen`` in a fixed order, so equal seeds give equal draws on every
    rank and a resumed run continues the same sequence.
    """
    rs, bs = draw_preferences_budgets(s1, edge.num_tasks, low, rng)
    rs = torch.tensor(rs, dtype=torch.float32, device=device)  # [G, N]
    b_t = torch.tensor(bs, dtype=torch.float32, device=device)
    logits = hypernet(rs, b_t)  # [G, L-1, N, N]
    tau = temperature(step, s1.temperature, s1.temperature_decay, s1.temperature_every)
    v = sample_parents(logits, tau, hard=s1.hard, generator=gen)  # [G, L-1, N, N]
    return Draws(rs, bs, logits.softmax(-1), v, edge.frugality(b_t).tolist(), tau)
