"""Task tensioners (Nakamura, Grassi, Wolf, Neurocomputing 2022; METHOD.md section 5).

Per step, with ``g_i`` the gradient of task ``i`` on the shared part and ``L_i`` its loss:

1. Bisector (the "EDM" direction): ``w`` = min-norm weights of the *unit* gradients
   ``u_i = g_i / ||g_i||``, rescaled as the authors' code does,

       d = gamma * sum_i w_i u_i,   gamma = 1 / sum_i (w_i / ||g_i||),

   i.e. ``d = sum_i b_i g_i`` with ``b_i = gamma w_i / ||g_i||`` summing to 1: a convex
   combination of the raw gradients that makes equal angles with all gradients it uses.
2. A window of the last ``window`` gradient norms per task; with ``S_i(k)`` the window sum
   at step ``k``,

       delta_i = S_i(k) / S_i(k - 1) + log10(L_i).

3. Tension ``tau_i = max(0, 1 - alpha + alpha * sigmoid(e * (delta_i - 1)))``. In the
   authors' code (``1 / (1 + exp(-p e + e))`` with ``e = np.exp(1)``) ``e`` is Euler's
   number; it is the option ``steepness``.
4. ``d_n = d + sum_i tau_i (g_i - d) / ||g_i - d||``.
5. Conflict repair, the authors' single pass over the tasks in order: if ``g_t`` makes an
   angle above 90 degrees with ``d_n`` (``<g_t, d_n> < 0``), ``d_n`` is replaced by the
   point where the segment from ``g_t`` to ``d_n`` crosses the hyperplane orthogonal to
   ``g_t``,

       d_n <- g_t + s (d_n - g_t),   s = ||g_t||^2 / (||g_t||^2 - <g_t, d_n>),

   which is the authors' ``tan(a) ||g_t|| w / ||w||`` (``w`` the part of ``d_n``
   orthogonal to ``g_t``, ``a`` the angle at ``g_t`` between ``-g_t`` and ``d_n - g_t``)
   in closed form: ``<g_t, d_n>`` becomes exactly 0. For two tasks one pass leaves both
   inner products non-negative (Cauchy-Schwarz); with three or more, a later repair can
   undo an earlier one, so dymu adds a safeguard: if some ``<g_t, d_n>`` is still
   negative, ``d_n`` moves back towards the bisector ``d`` (whose inner products are all
   ``>= 0``) just far enough, ``d_n <- d + lambda (d_n - d)`` with the largest
   ``lambda in [0, 1]`` that makes them all ``>= 0``.

Tasks whose gradients grow, or whose loss stays high, pull harder. Tensions start once the
window has ``window + 1`` steps of history (the authors' ``iterations > 10``); before that
the update is the bisector. Every step is linear in the ``g_i``, so it runs on their Gram
matrix and returns coefficients ``c`` with ``d_n = sum_i c_i g_i``.

Edge cases (the authors' code divides by zero there): a task with a zero gradient is left
out of the bisector; a task whose ``g_i - d`` vanishes (one task, or ``g_i = d``) adds no
tension direction; a zero previous window sum gives the ratio 1; losses are clamped to
``1e-30`` before ``log10``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from dymu.weighting.base import GradientWeighting, check_number, register
from dymu.weighting.min_norm import min_norm_weights

_RELATIVE_ZERO = 1e-6
"""``||g_i - d||`` below this fraction of ``max(||g_i||, ||d||)`` counts as zero: the Gram
matrix gives it only to ~1e-8 relative, so its direction is noise there."""


def tension(delta: np.ndarray, *, alpha: float, steepness: float = math.e) -> np.ndarray:
    """``tau = max(0, 1 - alpha + alpha * sigmoid(steepness * (delta - 1)))`` elementwise."""
    sigmoid = 0.5 * (1.0 + np.tanh(0.5 * steepness * (np.asarray(delta, dtype=float) - 1.0)))
    return np.maximum(0.0, 1.0 - alpha + alpha * sigmoid)


def bisector_coefficients(gram: np.ndarray) -> np.ndarray:
    """``b`` [T] with ``d = sum_i b_i g_i`` the rescaled min-norm bisector (step 1).

    Tasks with a zero gradient get 0; all zero gradients give ``b = 0``.
    """
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    used = np.flatnonzero(norms > 0)
    coef = np.zeros(len(norms))
    if used.size == 0:
        return coef
    unit_gram = gram[np.ix_(used, used)] / np.outer(norms[used], norms[used])  # [U, U]
    weights = min_norm_weights(unit_gram)
    raw = weights / norms[used]  # b_i before the gamma rescale
    coef[used] = raw / raw.sum()
    return coef


def tension_coefficients(
    gram: np.ndarray, bisector: np.ndarray, tensions: np.ndarray
) -> np.ndarray:
    """``c`` with ``sum_i c_i g_i = d + sum_i tau_i (g_i - d) / ||g_i - d||`` (step 4)."""
    m_b = gram @ bisector  # [T]: <g_i, d>
    d_sq = float(bisector @ m_b)
    coef = bisector.copy()
    for i, tau in enumerate(tensions):
        dist_sq = float(gram[i, i] - 2.0 * m_b[i] + d_sq)  # ||g_i - d||^2
        scale = max(gram[i, i], d_sq)
        if dist_sq <= (_RELATIVE_ZERO**2) * scale or tau == 0.0:
            continue
        step = tau / math.sqrt(dist_sq)
        coef -= step * bisector
        coef[i] += step
    return coef


def repair_conflicts(
    gram: np.ndarray, coef: np.ndarray, bisector: np.ndarray
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Step 5: the authors' repair pass, then dymu's safeguard towards the bisector.

    Args:
        gram: [T, T] Gram matrix of the task gradients.
        coef: [T] coefficients of ``d_n``.
        bisector: [T] coefficients of ``d`` (inner products with all ``g_t`` >= 0).

    Returns:
        ``(coefficients of the repaired d_n, [T] bool: tasks the pass repaired, whether
        the safeguard moved d_n)``.
    """
    coef = coef.copy()
    repaired = np.zeros(len(coef), dtype=bool)
    for t in range(len(coef)):
        inner = float(gram[t] @ coef)  # <g_t, d_n>
        if inner < 0.0:
            s = gram[t, t] / (gram[t, t] - inner)
            coef *= s
            coef[t] += 1.0 - s
            repaired[t] = True
    inner = gram @ coef  # [T]
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    slack = 1e-12 * norms * math.sqrt(max(float(coef @ inner), 0.0))
    violated = inner < -slack
    if not violated.any():
        return coef, repaired, False
    base = gram @ bisector  # [T] >= 0
    lam = float(np.min(base[violated] / (base[violated] - inner[violated])))
    lam = min(max(lam, 0.0), 1.0)
    return bisector + lam * (coef - bisector), repaired, True


@register("tensioner")
class Tensioner(GradientWeighting):
    """Task tensioners: the bisector pulled towards struggling tasks (see the module doc).

    Heads get their own gradient unscaled (the authors' code steps each head on its own
    loss).

    Args:
        num_tasks: ``T``.
        window: gradient norms per task in the sliding window (10 in the paper).
        alpha: tension strength in [0, 1] (0.3 in the authors' demo; 0: tensions of 1,
            1: tensions in [0, 1]).
        steepness: ``e`` of the tension sigmoid (Euler's number in the authors' code).

    Returns (from ``backward``): ``c`` [T] with shared gradient ``sum_t c_t g_t``.
    ``log`` adds ``"tensions"`` [T] (zeros while the window fills), ``"delta"`` [T] (NaN
    while the window fills), ``"bisector"`` [T] (the coefficients ``b`` of ``d``),
    ``"repaired"`` [T] (tasks the repair pass fixed) and ``"fallback"`` (the safeguard
    moved ``d_n``).
    """

    def __init__(
        self, *, num_tasks: int, window: int = 10, alpha: float = 0.3, steepness: float = math.e
    ) -> None:
        super().__init__(num_tasks=num_tasks)
        self.window = int(check_number("tensioner", "window", window, low=1, integer=True))
        self.alpha = float(check_number("tensioner", "alpha", alpha, low=0.0, high=1.0))
        self.steepness = float(check_number("tensioner", "steepness", steepness))
        # norm_window[k % window, i] = ||g_i|| of step k; previous_sum = S_i of the last step.
        self.register_buffer(
            "norm_window", torch.zeros(self.window, num_tasks, dtype=torch.float64)
        )
        self.register_buffer("previous_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self._log: dict[str, np.ndarray | bool] = {}

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        num = self.num_tasks
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        bisector = bisector_coefficients(gram)
        window = self.norm_window.cpu().numpy()  # [W, T]
        step = int(self.steps)
        window[step % self.window] = norms
        window_sum = window.sum(axis=0)  # [T]: S_i(k)
        step += 1
        tensions, delta = np.zeros(num), np.full(num, np.nan)
        coef, repaired, fallback = bisector, np.zeros(num, dtype=bool), False
        if step > self.window:  # S_i(k - 1) exists
            previous = self.previous_sum.cpu().numpy()
            ratio = np.divide(window_sum, previous, out=np.ones(num), where=previous > 0)
            delta = ratio + np.log10(np.clip(losses, 1e-30, None))
            tensions = tension(delta, alpha=self.alpha, steepness=self.steepness)
            pulled = tension_coefficients(gram, bisector, tensions)
            coef, repaired, fallback = repair_conflicts(gram, pulled, bisector)
        self.norm_window.copy_(torch.from_numpy(window))
        self.previous_sum.copy_(torch.from_numpy(window_sum))
        self.steps.fill_(step)
        self._log = {
            "tensions": tensions,
            "delta": delta,
            "bisector": bisector,
            "repaired": repaired,
            "fallback": fallback,
        }
        return coef

    def _extra_log(self) -> dict[str, Tensor]:
        return {key: torch.as_tensor(value) for key, value in self._log.items()}

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, window={self.window}, alpha={self.alpha}, "
            f"steepness={self.steepness:.6g}"
        )
