"""Stage-1 losses of the edge hypernet as pure tensor functions (METHOD.md 1.4-1.5).

Conventions (N tasks = streams, L layers per stream):

- ``nu`` [L-1, N, N]: parent distribution from the edge hypernet;
  ``nu[l - 1, j, i] = P(node (l, j) picks parent (l - 1, i))`` for ``l = 1..L-1``; rows
  (last dim) sum to 1.
- ``v`` [L-1, N, N]: the parent weights actually used (Gumbel-softmax samples, soft or
  hard), indexed like ``nu``. METHOD.md's ``v[l, i]`` (node ``i``'s parent-weight vector
  at layer ``l``, ``l = 1..L-1``) is ``v[l - 1, i]`` here.
- ``p_use`` [L, N]: ``p_use[l, i]`` = probability that node ``(l, i)`` is used (feeds a
  head), ``l = 0..L-1``.
- ``A`` [N, N]: task affinity; ``r`` [N]: preference on the simplex.

All functions are differentiable in their tensor arguments and hold no state.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_parents(x: Tensor, name: str) -> tuple[int, int]:
    """``(N, L)`` of a parent tensor [L-1, N, N]; ValueError on another shape."""
    if x.dim() != 3 or x.shape[1] != x.shape[2] or x.shape[0] < 1:
        raise ValueError(f"{name} must have shape [L-1, N, N], got {tuple(x.shape)}")
    return x.shape[1], x.shape[0] + 1


def p_use(nu: Tensor) -> Tensor:
    """Probability that each node is used, by dynamic programming from the top (METHOD 1.5).

    ``P_use(L-1, i) = 1`` (every last-layer node feeds its head) and, going down,

        P_use(l, i) = 1 - prod_k (1 - P_use(l+1, k) * nu[l, k, i]),   l = L-2..0,

    where ``nu[l, k, i] = P(node (l+1, k) picks parent (l, i))``.

    Exactness: parent choices are independent, and the choice of node ``(l+1, k)`` is
    independent of whether ``(l+1, k)`` is used (that depends only on choices of layers
    ``> l+1``), so each term ``P_use(l+1, k) * nu[l, k, i]`` is exact. The product assumes
    the events "``(l+1, k)`` is used" are independent across ``k``, which holds only when
    they are deterministic. Hence the recursion is exact (a) for layer ``L-2`` (so for
    every layer when ``L = 2``), (b) for every layer when ``nu`` is one-hot (a fixed tree),
    and (c) when ``N = 1``. Elsewhere (layers ``<= L-3`` with soft ``nu``) it is METHOD's
    mean-field approximation: usage events of one layer are correlated through the shared
    choices above them (e.g. at least one node of every layer is always used).

    Args:
        nu: [L-1, N, N] parent distribution.

    Returns:
        [L, N] ``P_use``; gradients flow into ``nu``.
    """
    _, num_layers = _check_parents(nu, "nu")
    rows = [torch.ones_like(nu[0, 0])]  # [N]: layer L-1
    for layer in range(num_layers - 2, -1, -1):
        above = rows[-1]  # [N]: P_use(layer + 1, k)
        reach = above[:, None] * nu[layer]  # [N(k), N(i)]: P((layer+1, k) used, picks i)
        rows.append(1.0 - torch.prod(1.0 - reach, dim=0))  # [N]
    return torch.stack(rows[::-1])  # [L, N]


def task_loss(losses: Tensor, r: Tensor, scales: Tensor) -> Tensor:
    """Preference-weighted task loss ``L_task(r) = sum_i r_i w_i L_i`` (METHOD 1.5).

    Args:
        losses: [N] per-task losses ``L_i``.
        r: [N] preference.
        scales: [N] ``w_i`` (dymu: ``1 / single-task loss of stream i``).

    Returns:
        Scalar.
    """
    return (r * scales * losses).sum()


def active_mask(r: Tensor, tau: float | None = None) -> Tensor:
    """Active tasks ``r_i >= tau``, ``tau = 0.6 / N`` by default (METHOD 1.5).

    Args:
        r: [N] preference.
        tau: activity threshold.

    Returns:
        [N] bool.
    """
    if tau is None:
        tau = 0.6 / r.shape[-1]
    return r >= tau


def _sq_dists(v: Tensor) -> Tensor:
    """[L-1, N, N] ``d[l, i, j] = ||v[l, i] - v[l, j]||^2`` (differentiable, exact zeros)."""
    diff = v[:, :, None, :] - v[:, None, :, :]  # [L-1, N, N, N]
    return (diff * diff).sum(-1)


def l_active(
    v: Tensor,
    A: Tensor,
    r: Tensor,
    p_use_detached: Tensor,
    tau: float | None = None,
    *,
    mean: bool = False,
) -> Tensor:
    """Sharing pressure between similar active tasks, ``L_active`` (METHOD 1.5).

        L_active = sum_{l=1}^{L-1} sum_{i != j, both active}
                   ((L - l) / L) * A(i, j) * P_use(l, i) P_use(l, j) * ||v[l, i] - v[l, j]||^2

    ``l`` is the node layer (``1..L-1``, the layers that choose a parent): ``v[l - 1]`` and
    ``p_use_detached[l]`` here. Pairs are ordered (each unordered pair counts twice with a
    symmetric ``A``). Early layers weigh more: ``(L-1)/L`` at layer 1 down to ``1/L``.

    Args:
        v: [L-1, N, N] parent weights used.
        A: [N, N] task affinity.
        r: [N] preference (defines the active set).
        p_use_detached: [L, N] ``p_use(nu)``, normally detached (METHOD's choice).
        tau: activity threshold (default ``0.6 / N``).
        mean: divide by the number of layers and of ordered active pairs (METHOD 1.9), so
            the term stays on the scale of one pair at one layer whatever N and L are.

    Returns:
        Scalar (0 with fewer than two active tasks).
    """
    n, num_layers = _check_parents(v, "v")
    if p_use_detached.shape != (num_layers, n):
        raise ValueError(
            f"p_use must have shape [{num_layers}, {n}], got {tuple(p_use_detached.shape)}"
        )
    act = active_mask(r, tau).to(v.dtype)  # [N]
    pair = act[:, None] * act[None, :] * (1.0 - torch.eye(n, dtype=v.dtype, device=v.device))
    layers = torch.arange(1, num_layers, dtype=v.dtype, device=v.device)  # [L-1]: l
    depth_w = (num_layers - layers) / num_layers  # [L-1]
    pu = p_use_detached[1:]  # [L-1, N]: P_use of the nodes that choose parents
    both = pu[:, :, None] * pu[:, None, :]  # [L-1, N, N]: P(l, i, j)
    w = depth_w[:, None, None] * (A * pair)[None] * both  # [L-1, N, N]
    total = (w * _sq_dists(v)).sum()
    if not mean:
        return total
    return total / ((num_layers - 1) * pair.sum().clamp_min(1.0))


def l_inactive(v: Tensor, r: Tensor, tau: float | None = None, *, mean: bool = False) -> Tensor:
    """Inactive tasks copy their nearest active task's branching, ``L_inactive`` (METHOD 1.5).

        L_inactive = sum_{l=1}^{L-1} sum_{j inactive} min_{i active} ||v[l, i] - v[l, j]||^2

    Args:
        v: [L-1, N, N] parent weights used.
        r: [N] preference.
        tau: activity threshold (default ``0.6 / N``).
        mean: divide by the number of layers and of inactive tasks (METHOD 1.9).

    Returns:
        Scalar (0 when no task is inactive or none is active).
    """
    _check_parents(v, "v")
    act = active_mask(r, tau)  # [N] bool
    if bool(act.all()) or not bool(act.any()):
        return v.sum() * 0.0  # keeps the graph and the dtype
    d = _sq_dists(v)[:, act][:, :, ~act]  # [L-1, N_active, N_inactive]
    total = d.min(dim=1).values.sum()
    return total / (d.shape[0] * d.shape[2]) if mean else total


def omega(
    v: Tensor,
    A: Tensor,
    r: Tensor,
    p_use_detached: Tensor,
    c: float,
    lambda_a: float = 1.0,
    lambda_i: float = 0.1,
    tau: float | None = None,
) -> Tensor:
    """Branching regulariser ``Omega = c * lambda_A * L_active + lambda_I * L_inactive``.

    METHOD 1.5 (``lambda_A = 1``, ``lambda_I = 0.1``; the patent's 0.05 is a setting).

    Args:
        v: [L-1, N, N] parent weights used.
        A: [N, N] task affinity.
        r: [N] preference.
        p_use_detached: [L, N] node usage probabilities (detached).
        c: the paper's relative frugality knob in [0, 1].
        lambda_a: weight of ``L_active``.
        lambda_i: weight of ``L_inactive``.
        tau: activity threshold (default ``0.6 / N``).

    Returns:
        Scalar.
    """
    return c * lambda_a * l_active(v, A, r, p_use_detached, tau) + lambda_i * l_inactive(v, r, tau)


def omega_budget(
    v: Tensor,
    A: Tensor,
    r: Tensor,
    p_use_detached: Tensor,
    pressure: float,
    lambda_a: float = 1.0,
    lambda_i: float = 0.1,
    tau: float | None = None,
) -> Tensor:
    """dymu's branching regulariser for an absolute budget (METHOD 1.9, ``objective: budget``).

        Omega_b = pressure * (lambda_A * mean L_active + lambda_I * mean L_inactive)

    Means over layers and pairs (or inactive tasks) instead of sums keep Omega on the scale
    of the normalised task term (~1 at the anchor) whatever N and L are; ``pressure`` is the
    budget's tightness ``(1 - b) / (1 - b_min)`` in [0, 1], so sharing is pushed hard at the
    cheapest tree's budget and not at all at b = 1, where the anchor tree is feasible.

    Args:
        v, A, r, p_use_detached, tau: as in :func:`omega`.
        pressure: the budget's tightness in [0, 1].
        lambda_a: weight of the mean ``L_active``.
        lambda_i: weight of the mean ``L_inactive``.

    Returns:
        Scalar.
    """
    active = l_active(v, A, r, p_use_detached, tau, mean=True)
    inactive = l_inactive(v, r, tau, mean=True)
    return pressure * (lambda_a * active + lambda_i * inactive)


def budget_target(
    nu: Tensor,
    node_flops: Tensor,
    head_flops: Tensor,
    budget: float,
    anchor_flops: float,
    under: float,
) -> Tensor:
    """Two-sided pull of the expected FLOPs fraction towards the budget (METHOD 1.9).

        relu(f - b) ** 2 + under * relu(b - f) ** 2,   f = E[FLOPs] / anchor_flops

    The first part is :func:`budget_penalty` (over the budget); ``under`` > 0 also charges
    for compute left unspent, so the budget is a target rather than a ceiling alone. The
    derived tree is repaired to fit after the argmax, so ``under`` may be small.

    Returns:
        Scalar.
    """
    frac = expected_flops(nu, node_flops, head_flops) / anchor_flops
    return torch.relu(frac - budget) ** 2 + under * torch.relu(budget - frac) ** 2


def expected_flops(nu: Tensor, node_flops: Tensor, head_flops: Tensor) -> Tensor:
    """Expected FLOPs of the sampled tree (DESIGN.md "Budget"; fvcore counts).

        E[FLOPs] = sum_{l, i} P_use(l, i) * flops[l, i] + sum_j head_flops[j]

    ``P_use`` is not detached: this is the budget penalty's gradient path into ``nu``. For a
    one-hot ``nu`` it equals ``TreeSpec.flops`` of that tree exactly (see :func:`p_use`).

    Args:
        nu: [L-1, N, N] parent distribution.
        node_flops: [L, N] FLOPs of node ``(l, i)`` (``dymu.space.graph.costs``).
        head_flops: [N] FLOPs of each head.

    Returns:
        Scalar, in FLOPs.
    """
    pu = p_use(nu)  # [L, N]
    if node_flops.shape != pu.shape:
        raise ValueError(
            f"node_flops must have shape {tuple(pu.shape)}, got {tuple(node_flops.shape)}"
        )
    return (pu * node_flops.to(pu)).sum() + head_flops.to(pu).sum()


def budget_penalty(
    nu: Tensor, node_flops: Tensor, head_flops: Tensor, budget: float, anchor_flops: float
) -> Tensor:
    """Squared hinge on the expected FLOPs fraction (dymu's term, DESIGN.md "Budget").

        penalty = relu(E[FLOPs] / anchor_flops - budget) ** 2

    Args:
        nu: [L-1, N, N] parent distribution.
        node_flops: [L, N] node FLOPs.
        head_flops: [N] head FLOPs.
        budget: ``b`` in (0, 1], a fraction of the anchor's FLOPs.
        anchor_flops: FLOPs of the anchor (all streams and heads).

    Returns:
        Scalar; 0 while the expected FLOPs fit the budget.
    """
    frac = expected_flops(nu, node_flops, head_flops) / anchor_flops
    return torch.relu(frac - budget) ** 2
