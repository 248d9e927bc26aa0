"""Scalarisations that turn T task losses into one training loss for a preference ray.

Both return task weights ``w`` [T] (detached) and the training loss is ``sum_t w_t L_t``:

* :func:`linear_weights`: linear scalarisation (LS), ``w = r``.
* :class:`EPOSolver`: Exact Pareto Optimal search (EPO; Mahapatra & Rajan, "Multi-Task
  Learning with User Preferences: Gradient Descent with Controlled Ascent in Pareto
  Optimization", ICML 2020), the solver of PHN-EPO (Navon et al., ICLR 2021). EPO steers the
  losses onto the ray ``r_1 L_1 = ... = r_T L_T`` (so a larger ``r_t`` asks for a lower
  ``L_t``) and, once there, descends along it; each step solves a small linear program over
  the Gram matrix of the task gradients.

The LP follows the public reference code line by line (``multiMNIST/epo_lp.py`` of
github.com/dbmptr/EPOSearch, copied into ``solvers/epo.py`` of
github.com/AvivNavon/pareto-hypernetworks), with ``scipy.optimize.linprog`` (HiGHS) in place
of cvxpy + GLPK.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from dymu.errors import RuntimeFailure, UserError

__all__ = ["SOLVERS", "EPOSolver", "epo_adjustments", "linear_weights", "task_gradients"]

SOLVERS = ("linear", "epo")
"""Names of the scalarisations :func:`dymu.pareto.phn.train_phn` accepts."""

Move = Literal["balance", "descent", "fallback"]


def linear_weights(ray: Tensor) -> Tensor:
    """Linear scalarisation: ``w = r``, i.e. the loss ``sum_t r_t L_t``.

    Args:
        ray: preference [T] on the simplex.

    Returns:
        ``ray`` detached, as a new tensor [T].
    """
    return ray.detach().clone()


def epo_adjustments(losses: np.ndarray, ray: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """The EPO non-uniformity and the balancing direction's task weights (EPO eq. 5-7).

    With ``rl = r * l`` and ``lhat = rl / sum(rl)``:

        mu  = KL(lhat || 1/T) = sum_t lhat_t log(T lhat_t)     (0 exactly on the ray)
        a_t = r_t (log(T lhat_t) - mu)

    ``G^T a`` is the gradient of mu (up to a positive factor), so descending along it moves
    the losses towards the ray. Terms with ``lhat_t <= eps`` are left out of mu (as in the
    reference); the log is clipped there too, so that a zero ray component gives
    ``a_t = 0`` instead of ``0 * log(0) = nan``.

    Args:
        losses: [T] positive task losses.
        ray: [T] preference.

    Returns:
        ``(rl [T], mu, a [T])``.
    """
    t = len(losses)
    rl = ray * losses
    lhat = rl / rl.sum()
    eps = np.finfo(lhat.dtype).eps
    kept = lhat[lhat > eps]
    mu = float(np.sum(kept * np.log(kept * t)))
    a = ray * (np.log(np.maximum(lhat, eps) * t) - mu)
    return rl, mu, a


def task_gradients(losses: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Per-task gradients flattened over ``params``: G [T, P].

    One ``autograd.grad`` call per task, as in the reference; the graph is kept for all but
    the last task, so it is freed afterwards (no further ``backward`` through it). A
    parameter a task does not reach contributes zeros to that task's row.
    """
    rows = []
    last = len(losses) - 1
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, list(params), retain_graph=i < last, allow_unused=True)
        flat = [
            torch.zeros_like(p).reshape(-1) if g is None else g.reshape(-1)
            for p, g in zip(params, grads, strict=True)
        ]
        rows.append(torch.cat(flat))  # sum_k numel(p_k) = P
    return torch.stack(rows)  # T x [P] -> [T, P]


class EPOSolver:
    """Task weights of one EPO step from the losses, the task gradients and the ray.

    One step (Mahapatra & Rajan 2020, Algorithm 1; ``C = G G^T`` [T, T], ``Ca = C a``),
    over ``alpha`` on the simplex (``alpha >= 0, sum alpha = 1``):

    * *balance* (``mu > eps``, losses off the ray): maximise ``alpha . Ca`` subject to
      ``(C alpha)_j >= 0`` for the tasks ``j`` whose relative loss ``r_j L_j`` is largest and
      ``(C alpha)_j >= Ca_j`` for the tasks with ``Ca_j <= 0`` (the others are free); when
      every ``Ca_j <= 0`` all constraints are ``C alpha >= 0``. The direction ``G^T alpha``
      then decreases the non-uniformity fastest while the worst task does not get worse.
    * *descent* (on the ray): maximise ``sum_j (C alpha)_j`` subject to ``C alpha >= 0``
      (every task descends) and ``alpha . Ca >= min(max_j Ca_j, 0)`` (the step does not
      leave the ray); ``relax=True`` drops the last constraint.

    The weights are ``w = T * alpha`` (the reference's scaling, so that ``w = 1`` for equal
    tasks matches the mean of the losses). When the LP has no solution the reference falls
    back to ``r / sum(r)``; so does this solver, and it says so in :attr:`last_move`.

    Attributes:
        last_move: ``"balance"``, ``"descent"`` or ``"fallback"`` for the latest call.
        last_mu: the non-uniformity mu of the latest call.
    """

    def __init__(self, *, eps: float = 1e-4, relax: bool = False) -> None:
        """
        Args:
            eps: mu above which a step balances rather than descends (reference: 1e-4).
            relax: drop the "stay on the ray" constraint of the descent LP.
        """
        if not eps >= 0:
            raise UserError(f"EPOSolver: eps must be >= 0, got {eps}")
        self.eps = eps
        self.relax = relax
        self.last_move: Move | None = None
        self.last_mu: float | None = None

    def weights(self, losses: Tensor, grads: Tensor, ray: Tensor) -> Tensor:
        """EPO task weights ``w`` [T]; train with ``sum_t w_t L_t`` (``w`` is detached).

        Args:
            losses: [T] current task losses (positive).
            grads: [T, P] task gradients (see :func:`task_gradients`); only their Gram
                matrix ``G G^T`` [T, T] enters the LP.
            ray: [T] preference.

        Returns:
            Weights [T] on ``losses``' device and dtype, summing to T.
        """
        t = losses.shape[0]
        if losses.ndim != 1 or grads.ndim != 2 or grads.shape[0] != t or ray.shape != (t,):
            raise UserError(
                f"EPOSolver.weights: expected losses [T], grads [T, P], ray [T]; got "
                f"{tuple(losses.shape)}, {tuple(grads.shape)}, {tuple(ray.shape)}"
            )
        g = grads.detach().double()
        gram = (g @ g.T).cpu().numpy()  # [T, P] @ [P, T] -> [T, T]
        l_np = losses.detach().double().cpu().numpy()
        r_np = ray.detach().double().cpu().numpy()
        if not (np.all(np.isfinite(l_np)) and np.all(l_np > 0)):
            raise RuntimeFailure(f"EPO needs finite positive losses, got {l_np.tolist()}")
        alpha = self.alpha(l_np, gram, r_np)
        return torch.as_tensor(t * alpha, dtype=losses.dtype, device=losses.device)

    def alpha(self, losses: np.ndarray, gram: np.ndarray, ray: np.ndarray) -> np.ndarray:
        """The LP solution ``alpha`` [T] on the simplex (numpy in, numpy out; float64)."""
        rl, mu, a = epo_adjustments(losses, ray)
        self.last_mu = mu
        ca = gram @ a  # [T, T] @ [T] -> [T]
        if mu > self.eps:
            self.last_move = "balance"
            if np.any(ca > 0):
                rhs = ca.copy()
                rhs[ca > 0] = -np.inf  # free
                rhs[rl == rl.max()] = 0.0  # the worst tasks must not get worse
            else:
                rhs = np.zeros_like(ca)
            # max alpha.Ca  s.t. C alpha >= rhs  <=>  min -Ca.alpha  s.t. -C alpha <= -rhs
            rows = np.isfinite(rhs)
            solution = _simplex_lp(-ca, -gram[rows], -rhs[rows])
        else:
            self.last_move = "descent"
            a_ub, b_ub = -gram, np.zeros(len(ca))  # C alpha >= 0
            if not self.relax:  # alpha.Ca >= min(max Ca, 0)
                a_ub = np.vstack([a_ub, -ca[None, :]])
                b_ub = np.append(b_ub, -min(ca.max(), 0.0))
            solution = _simplex_lp(-gram.sum(axis=0), a_ub, b_ub)  # max 1^T C alpha
        if solution is None:
            self.last_move = "fallback"
            return ray / ray.sum()
        return solution


def _simplex_lp(c: np.ndarray, a_ub: np.ndarray, b_ub: np.ndarray) -> np.ndarray | None:
    """``argmin c.x`` over ``{x >= 0, sum x = 1, a_ub x <= b_ub}``; None if infeasible.

    ``scipy.optimize.linprog`` with HiGHS; the solution is clipped to >= 0 and renormalised
    to remove the solver's ~1e-12 round-off.
    """
    from scipy.optimize import linprog  # deferred: only EPO needs scipy

    t = len(c)
    result = linprog(
        c,
        A_ub=a_ub if len(a_ub) else None,
        b_ub=b_ub if len(b_ub) else None,
        A_eq=np.ones((1, t)),
        b_eq=np.ones(1),
        bounds=[(0.0, None)] * t,
        method="highs",
    )
    if result.status != 0:
        return None
    x = np.clip(result.x, 0.0, None)
    return x / x.sum()
