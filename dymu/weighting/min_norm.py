"""The min-norm point of a convex hull of task gradients (Sener & Koltun, NeurIPS 2018).

Both MGDA and the task tensioner's bisector need

    w* = argmin_{w in simplex} || sum_t w_t g_t ||^2 = argmin_w  w^T M w,   M = G G^T,

the point of the convex hull of the task gradients ``g_t`` closest to the origin. It only
depends on the Gram matrix ``M`` [T, T], so the solver works there (float64, numpy) and
never touches the [T, P] gradients again.

Algorithm (Sener & Koltun, Algorithm 2 "FrankWolfeSolver", as in their public code):

1. Start from the best pair: for every pair (i, j) take the exact minimiser on the segment
   between ``g_i`` and ``g_j``; keep the pair with the smallest norm. For two tasks this is
   already the exact answer.
2. Frank-Wolfe: the vertex ``t = argmin_t (M w)_t`` (the task gradient most opposed to
   the current point ``v = G^T w``), then the exact line search between ``v`` and ``g_t``
   (the same two-vector formula), until the L1 change of ``w`` is below ``tol`` or
   ``max_iter`` steps.

The two-vector formula: ``min_{c in [0,1]} ||c x1 + (1 - c) x2||^2`` is

    c = 1                                     if <x1, x2> >= <x1, x1>,
    c = 0                                     if <x1, x2> >= <x2, x2>,
    c = (<x2,x2> - <x1,x2>) / ||x1 - x2||^2   otherwise.

The reference code returns 0.999 / 0.001 instead of the exact 1 / 0 at the two ends; dymu
uses the exact values, so a Frank-Wolfe step that cannot improve the point stops the loop.

3. dymu's addition: Frank-Wolfe converges sublinearly (after 250 steps a relative gap of
   ~1e-3 in the squared norm is common for 4-6 tasks), so its result is finished exactly
   by Wolfe's min-norm-point iterations started from it (``refine=False`` gives the
   reference algorithm alone). The answer is then exact to rounding for any T.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MAX_ITER = 250
"""Frank-Wolfe steps at most (the reference code's value)."""
TOL = 1e-5
"""Stop when the L1 change of the weights in one step is below this (the reference value)."""


def min_norm_pair(v11: float, v12: float, v22: float) -> tuple[float, float]:
    """Exact ``c`` minimising ``||c x1 + (1 - c) x2||^2`` on [0, 1], and that minimum.

    Args:
        v11: ``<x1, x1>``.
        v12: ``<x1, x2>``.
        v22: ``<x2, x2>``.

    Returns:
        ``(c, squared norm at c)``.
    """
    if v12 >= v11:
        return 1.0, v11
    if v12 >= v22:
        return 0.0, v22
    c = (v22 - v12) / (v11 + v22 - 2.0 * v12)
    return c, v22 + c * (v12 - v22)


def min_norm_weights(
    gram: np.ndarray, *, max_iter: int = MAX_ITER, tol: float = TOL, refine: bool = True
) -> np.ndarray:
    """Simplex weights of the min-norm point of the hull of vectors with Gram matrix ``gram``.

    Args:
        gram: [T, T] symmetric positive semi-definite ``M = G G^T``.
        max_iter: Frank-Wolfe steps at most (only used for ``T >= 3``).
        tol: stop when a step changes the weights by less than this in L1.
        refine: finish with Wolfe's exact iterations (see the module docstring); False
            gives Sener & Koltun's Frank-Wolfe alone.

    Returns:
        [T] float64 weights ``w >= 0``, ``sum(w) = 1``; exact for ``T <= 2`` and, with
        ``refine``, for any ``T``.
    """
    gram = np.asarray(gram, dtype=np.float64)
    num = gram.shape[0]
    if gram.shape != (num, num) or num < 1:
        raise ValueError(f"gram must be a square [T, T] matrix, got shape {gram.shape}")
    weights = np.zeros(num)
    if num == 1:
        weights[0] = 1.0
        return weights
    best: tuple[float, int, int, float] | None = None  # (cost, i, j, c)
    for i in range(num):
        for j in range(i + 1, num):
            c, cost = min_norm_pair(gram[i, i], gram[i, j], gram[j, j])
            if best is None or cost < best[0]:
                best = (cost, i, j, c)
    assert best is not None
    _, i, j, c = best
    weights[i], weights[j] = c, 1.0 - c
    if num == 2:
        return weights
    for _ in range(max_iter):
        m_w = gram @ weights  # [T]: <g_t, v>
        t = int(np.argmin(m_w))
        c, _ = min_norm_pair(float(weights @ m_w), float(m_w[t]), float(gram[t, t]))
        new = c * weights
        new[t] += 1.0 - c
        change = float(np.abs(new - weights).sum())
        weights = new
        if change < tol:
            break
    return _refine(gram, weights) if refine else weights


def _affine_minimiser(gram: np.ndarray, support: list[int]) -> np.ndarray:
    """Coefficients of the min-norm point of the affine hull of the ``support`` vectors.

    Solves ``[[M_SS, 1], [1^T, 0]] @ [a; -mu] = [0; 1]`` by least squares, so affinely
    dependent supports still give a point (then one of its representations).
    """
    k = len(support)
    system = np.zeros((k + 1, k + 1))
    system[:k, :k] = gram[np.ix_(support, support)]
    system[:k, k] = system[k, :k] = 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    return np.linalg.lstsq(system, rhs, rcond=None)[0][:k]


def _refine(gram: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Finish Frank-Wolfe exactly with Wolfe's min-norm-point iterations; keep only a gain.

    Frank-Wolfe converges sublinearly: after 250 steps a relative gap of ~1e-3 in the
    squared norm is common for 4-6 tasks, and every vertex it ever picked keeps a decaying
    weight. Wolfe's algorithm (Math. Programming 11, 1976) is exact and finite: on the
    current support ``S`` it moves to the min-norm point of the affine hull of ``S``
    (dropping vertices whose weight would turn negative, "minor cycles"), then adds the
    vertex most opposed to the point while one improves it ("major cycles"). It starts from
    the Frank-Wolfe weights, so it only has a few vertices to drop. The result is kept only
    if its norm is not larger than the Frank-Wolfe point's.
    """
    num = len(weights)
    scale = max(float(np.max(np.diag(gram))), np.finfo(float).tiny)
    lam = weights.copy()
    support = [int(i) for i in np.flatnonzero(lam > 0)]
    for _ in range(8 * num + 16):  # cycles; finite in exact arithmetic, capped for safety
        while True:  # minor cycles: reach the affine minimiser of the support, or drop one
            alpha = _affine_minimiser(gram, support)
            if not np.all(np.isfinite(alpha)):
                return weights
            current = lam[support]
            if np.all(alpha > 1e-15):
                lam[:] = 0.0
                lam[support] = alpha
                break
            shrinking = alpha < current
            theta = float(np.min(current[shrinking] / (current[shrinking] - alpha[shrinking])))
            lam[support] = theta * alpha + (1.0 - theta) * current
            lam[lam <= 1e-15] = 0.0
            support = [i for i in support if lam[i] > 0.0]
        m_lam = gram @ lam  # [T]: <g_t, x>
        t = int(np.argmin(m_lam))
        if m_lam[t] >= float(lam @ m_lam) - 1e-13 * scale or t in support:
            break
        support.append(t)
    lam = np.clip(lam, 0.0, None)
    if not lam.sum() > 0:
        return weights
    lam /= lam.sum()
    if float(lam @ gram @ lam) <= float(weights @ gram @ weights):
        return lam
    return weights


def gram_matrix(grads: Tensor, *, chunk: int = 1 << 22) -> Tensor:
    """``G G^T`` in float64, summed over column chunks so no float64 copy of ``G`` is made.

    Args:
        grads: [T, P] one flattened gradient per row.
        chunk: columns per chunk.

    Returns:
        [T, T] float64 on ``grads.device``.
    """
    gram = grads.new_zeros((grads.shape[0], grads.shape[0]), dtype=torch.float64)
    for part in grads.split(chunk, dim=1):  # [T, <=chunk]
        part = part.double()
        gram += part @ part.T
    return gram


def min_norm_point(grads: Tensor, *, max_iter: int = MAX_ITER, tol: float = TOL) -> Tensor:
    """Weights of the min-norm point of the convex hull of the rows of ``grads``.

    Args:
        grads: [T, P] one flattened task gradient per row.
        max_iter: Frank-Wolfe steps at most.
        tol: stop when a step changes the weights by less than this in L1.

    Returns:
        [T] weights on the simplex (``grads``' dtype and device) such that
        ``weights @ grads`` is the point of the hull closest to the origin.
    """
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"grads must have shape [T, P] with T >= 1, got {tuple(grads.shape)}")
    gram = gram_matrix(grads).cpu().numpy()
    weights = min_norm_weights(gram, max_iter=max_iter, tol=tol)
    return torch.as_tensor(weights, dtype=grads.dtype, device=grads.device)
