"""Metrics of a controllable multi-task model over a preference sweep (METHOD.md 1.7, 6).

All functions are pure: numpy arrays in, numbers or arrays out, no torch. Shapes use
``P`` for the number of evaluated preferences (points), ``N`` for the number of tasks
(objectives) and ``K`` for the number of evaluated trees (FLOPs).

Protocol (METHOD.md 1.7): evaluate the model at the preferences of :func:`preference_sweep`
(20 draws from the uniform distribution on the simplex, fixed seed), collect the per-task
losses ``L[P, N]``, divide them by the single-task baseline losses
(:func:`normalised_losses`) and report

- the exact hypervolume (:func:`hypervolume`) with respect to a declared reference point
  (:func:`reference_point`, recorded in report.json by the caller);
- the uniformity mu (:func:`uniformity`);
- the per-task controllability (:func:`controllability`);
- the FLOPs fractions' summary and budget adherence (:func:`flops_stats`,
  :func:`budget_adherence`).

Delta_m is :func:`dymu.tasks.delta.delta_m` (re-exported by :mod:`dymu.evaluate`).

The hypervolume is computed exactly by ``moocore`` (HV3D+/HV4D+ for 3-4 objectives, exact
algorithms such as inclusion-exclusion above). Its cost grows exponentially with the
number of objectives: 20 points in 14-D take ~0.3 s, 20-D (CIFAR-100's 20 tasks) may take
a minute (METHOD.md 6); ``hvwfg`` or ``pygmo`` are the exact alternatives there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from dymu.errors import UserError

__all__ = [
    "budget_adherence",
    "controllability",
    "flops_stats",
    "hypervolume",
    "normalised_losses",
    "preference_sweep",
    "reference_point",
    "uniformity",
]

FLOPS_QUANTILES = (5, 50, 95)
"""Percentiles reported by :func:`flops_stats` (as keys ``q05``, ``q50``, ``q95``)."""


def _matrix(name: str, values: np.ndarray, columns: int | None = None) -> np.ndarray:
    """``values`` as a finite float64 array [rows, columns]; UserError otherwise."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 2:
        raise UserError(f"{name}: expected a 2-D array [points, tasks], got shape {array.shape}")
    if columns is not None and array.shape[1] != columns:
        raise UserError(f"{name}: expected {columns} columns, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise UserError(f"{name}: contains non-finite values")
    return array


def _vector(name: str, values: np.ndarray, length: int | None = None) -> np.ndarray:
    """``values`` as a finite float64 vector; UserError otherwise."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise UserError(f"{name}: expected a 1-D array, got shape {array.shape}")
    if length is not None and array.shape[0] != length:
        raise UserError(f"{name}: expected length {length}, got {array.shape[0]}")
    if not np.all(np.isfinite(array)):
        raise UserError(f"{name}: contains non-finite values")
    return array


def preference_sweep(num_tasks: int, count: int = 20, seed: int = 0) -> np.ndarray:
    """Preferences drawn uniformly from the probability simplex, reproducibly.

    r_k ~ Dirichlet(1, ..., 1) (the uniform distribution on {r >= 0, sum_j r_j = 1}),
    k = 1..count, from ``numpy.random.default_rng(seed)``; METHOD.md 1.7 uses count = 20.

    Args:
        num_tasks: N >= 1, the simplex dimension (N = 1 gives rows [1.0]).
        count: number of preferences P >= 1.
        seed: the generator seed; the same (num_tasks, count, seed) give the same sweep.

    Returns:
        float64 array [count, num_tasks], rows nonnegative and summing to 1.

    Raises:
        UserError: num_tasks < 1 or count < 1.
    """
    if num_tasks < 1:
        raise UserError(f"preference_sweep: num_tasks must be >= 1, got {num_tasks}")
    if count < 1:
        raise UserError(f"preference_sweep: count must be >= 1, got {count}")
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.ones(num_tasks), size=count)


def normalised_losses(losses: np.ndarray, baselines: np.ndarray) -> np.ndarray:
    """Losses divided by the single-task baseline loss of their task.

    Lnorm[p, j] = L[p, j] / B_j, so 1.0 means "as good as the single-task model" on task j
    and the objectives of different tasks become comparable (METHOD.md 6).

    Args:
        losses: [P, N] (or [N] for a single point) task losses.
        baselines: [N] single-task baseline losses, all > 0.

    Returns:
        float64 array of the shape of ``losses``.

    Raises:
        UserError: shape mismatch, non-finite values, or a baseline <= 0.
    """
    array = np.asarray(losses, dtype=np.float64)
    single = array.ndim == 1
    matrix = _matrix("normalised_losses: losses", array[None, :] if single else array)
    base = _vector("normalised_losses: baselines", baselines, matrix.shape[1])
    if np.any(base <= 0):
        raise UserError(f"normalised_losses: baselines must be > 0, got {base.tolist()}")
    out = matrix / base
    return out[0] if single else out


def reference_point(normalised: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """The declared hypervolume reference point: per objective, max over all points x (1 + margin).

    ref_j = (1 + margin) * max_p Lnorm[p, j].

    Rule and why: with objectives normalised by the single-task baselines, a fixed constant
    (e.g. 2.0) would silently drop every point worse than twice the single-task loss on some
    task, which happens at extreme preferences (a task with weight ~0 is barely trained), and
    would give HV = 0 to a weak method. The data rule keeps every evaluated point inside the
    box (each contributes) and the margin gives the extreme points a nonzero slab. To keep HV
    comparable across methods, pass the **union of the normalised losses of all methods
    being compared** (and all budgets c), compute the point once, and record it in
    report.json; HVs computed with different reference points must not be compared.

    Args:
        normalised: [P, N] normalised losses (all methods' points stacked), P >= 1.
        margin: relative margin >= 0.

    Returns:
        float64 array [N].

    Raises:
        UserError: empty input, non-finite values, or a negative margin.
    """
    matrix = _matrix("reference_point: normalised", normalised)
    if matrix.shape[0] == 0:
        raise UserError("reference_point: no points given")
    if not (math.isfinite(margin) and margin >= 0):
        raise UserError(f"reference_point: margin must be finite and >= 0, got {margin}")
    return matrix.max(axis=0) * (1.0 + margin)


def hypervolume(losses: np.ndarray, reference: np.ndarray) -> float:
    """Exact hypervolume of a set of points (minimisation) with respect to a reference point.

    HV(S, ref) = Lebesgue measure of  union_{s in S} [s_1, ref_1] x ... x [s_N, ref_N],

    i.e. the volume dominated by S and bounded by ref. A point that does not strictly
    dominate ref in every objective (s_j >= ref_j for some j) contributes nothing; those
    points are dropped before calling ``moocore.hypervolume`` (exact). Dominated and
    duplicate points are allowed and change nothing.

    Args:
        losses: [P, N] objective values (lower is better), P >= 0; usually normalised.
        reference: [N] reference point.

    Returns:
        The hypervolume (0.0 when no point dominates the reference).

    Raises:
        UserError: shape mismatch or non-finite values.
    """
    points = np.asarray(losses, dtype=np.float64)
    if points.ndim == 2 and points.shape[0] == 0:
        _vector("hypervolume: reference", reference)
        return 0.0
    points = _matrix("hypervolume: losses", points)
    ref = _vector("hypervolume: reference", reference, points.shape[1])
    inside = points[np.all(points < ref, axis=1)]
    if inside.shape[0] == 0:
        return 0.0
    import moocore  # deferred: only the hypervolume needs it

    return float(moocore.hypervolume(inside, ref=ref))


def uniformity(losses: np.ndarray, preferences: np.ndarray) -> float:
    """Mean over the sweep of mu_r = 1 - KL(Lhat || uniform) (METHOD.md 1.7, Lin et al.).

    For each preference r (row) with losses L:

        Lhat_j = r_j L_j / sum_i r_i L_i,
        KL(Lhat || u) = sum_j Lhat_j ln(Lhat_j / (1/N)) = ln N + sum_j Lhat_j ln Lhat_j,
        mu_r = 1 - KL(Lhat || u),

    natural log, 0 ln 0 = 0, u the uniform distribution on the N tasks. mu_r = 1 exactly when
    r_j L_j is the same for every task (the loss is spread in inverse proportion to the
    preference); the minimum is 1 - ln N (all of the weighted loss on one task), which is
    negative for N >= 3. Use normalised losses so the tasks' scales do not dominate.

    Args:
        losses: [P, N] nonnegative losses at the preferences.
        preferences: [P, N] nonnegative preferences (rows need not sum to 1: Lhat is
            invariant to the scale of r).

    Returns:
        (1/P) sum_p mu_{r_p}.

    Raises:
        UserError: shape mismatch, negative or non-finite values, no rows, or a row with
            sum_i r_i L_i = 0 (Lhat undefined).
    """
    loss = _matrix("uniformity: losses", losses)
    pref = _matrix("uniformity: preferences", preferences, loss.shape[1])
    if pref.shape[0] != loss.shape[0]:
        raise UserError(
            f"uniformity: {loss.shape[0]} loss rows but {pref.shape[0]} preference rows"
        )
    if loss.shape[0] == 0:
        raise UserError("uniformity: no points given")
    if np.any(loss < 0) or np.any(pref < 0):
        raise UserError("uniformity: losses and preferences must be nonnegative")
    weighted = pref * loss
    totals = weighted.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        bad = int(np.flatnonzero(totals[:, 0] <= 0)[0])
        raise UserError(f"uniformity: row {bad} has sum_i r_i L_i = 0, Lhat undefined")
    lhat = weighted / totals
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(lhat > 0, lhat * np.log(lhat), 0.0)
    kl = math.log(loss.shape[1]) + plogp.sum(axis=1)
    return float(np.mean(1.0 - kl))


def controllability(
    performance: np.ndarray, preferences: np.ndarray, higher_is_better: Sequence[bool]
) -> np.ndarray:
    """Per task, the Spearman rank correlation between its preference weight and its performance.

    For task j over the P preferences of the sweep:

        y_pj = s_j M_pj  with s_j = +1 if higher is better else -1   (higher = better),
        ytilde_pj = (y_pj - min_p y_pj) / (max_p y_pj - min_p y_pj)  (min-max normalised),
        C_j = Spearman rho(r_{.j}, ytilde_{.j})  (scipy.stats.spearmanr, ties averaged).

    C_j = +1: the more weight task j gets, the better it does (perfectly controllable);
    0: no monotone relation; -1: inverted. The normalisation does not change the ranks (it
    is there so the per-task values can also be plotted on one scale). If the weights or
    the performance of a task are constant over the sweep (or P < 2) the correlation is
    undefined (scipy gives NaN); it is reported as 0.0 (no control observed).

    Args:
        performance: [P, N] one metric per task (a loss or a score) at each preference.
        preferences: [P, N] the preferences the model was evaluated at.
        higher_is_better: N flags, the direction of each task's metric.

    Returns:
        float64 array [N] in [-1, 1].

    Raises:
        UserError: shape mismatch or non-finite values.
    """
    perf = _matrix("controllability: performance", performance)
    pref = _matrix("controllability: preferences", preferences, perf.shape[1])
    if pref.shape[0] != perf.shape[0]:
        raise UserError(
            f"controllability: {perf.shape[0]} performance rows but {pref.shape[0]} preference rows"
        )
    flags = [bool(h) for h in higher_is_better]
    if len(flags) != perf.shape[1]:
        raise UserError(
            f"controllability: {len(flags)} higher_is_better flags for {perf.shape[1]} tasks"
        )
    out = np.zeros(perf.shape[1], dtype=np.float64)
    for j, higher in enumerate(flags):
        y = perf[:, j] if higher else -perf[:, j]
        x = pref[:, j]
        if y.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
            continue
        y = (y - y.min()) / np.ptp(y)
        rho = stats.spearmanr(x, y).statistic
        out[j] = float(rho) if np.isfinite(rho) else 0.0
    return out


def flops_stats(flops_fractions: np.ndarray) -> dict[str, float]:
    """Summary of the FLOPs fractions (tree FLOPs / full anchor FLOPs) of the evaluated trees.

    Returns mean, std (population, ddof = 0), min, max and the percentiles 5, 50, 95
    (numpy's linear interpolation) as keys ``mean, std, min, max, q05, q50, q95``.

    Args:
        flops_fractions: [K] fractions, K >= 1.

    Raises:
        UserError: empty, not 1-D, or non-finite.
    """
    values = _vector("flops_stats: flops_fractions", flops_fractions)
    if values.size == 0:
        raise UserError("flops_stats: no values given")
    out = {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }
    for q in FLOPS_QUANTILES:
        out[f"q{q:02d}"] = float(np.percentile(values, q))
    return out


def budget_adherence(
    flops_fractions: np.ndarray, budgets: np.ndarray | float, tol: float = 1e-9
) -> float:
    """Fraction of trees within their budget: (1/K) sum_k [f_k <= c_k + tol].

    Args:
        flops_fractions: [K] FLOPs fractions f_k of the trees.
        budgets: [K] budgets c_k (same units) or one scalar for all.
        tol: absolute tolerance for rounding.

    Returns:
        A number in [0, 1].

    Raises:
        UserError: empty input, shape mismatch or non-finite values.
    """
    values = _vector("budget_adherence: flops_fractions", flops_fractions)
    if values.size == 0:
        raise UserError("budget_adherence: no values given")
    limits = np.asarray(budgets, dtype=np.float64)
    if limits.ndim == 0:
        limits = np.full_like(values, float(limits))
    limits = _vector("budget_adherence: budgets", limits, values.size)
    return float(np.mean(values <= limits + tol))
