"""Hand-computed values for the evaluation metrics (dymu.evaluate.metrics)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dymu.errors import UserError
from dymu.evaluate import (
    budget_adherence,
    controllability,
    delta_m,
    flops_stats,
    hypervolume,
    normalised_losses,
    preference_sweep,
    reference_point,
    uniformity,
)

# ---------------------------------------------------------------- preference sweep


def test_preference_sweep_shape_simplex_and_seed():
    a = preference_sweep(3)
    assert a.shape == (20, 3)
    assert np.all(a >= 0)
    np.testing.assert_allclose(a.sum(axis=1), 1.0)
    np.testing.assert_array_equal(a, preference_sweep(3, 20, 0))
    assert not np.array_equal(a, preference_sweep(3, 20, 1))
    assert preference_sweep(5, count=7, seed=3).shape == (7, 5)
    np.testing.assert_array_equal(preference_sweep(1, 4), np.ones((4, 1)))


def test_preference_sweep_is_uniform_on_simplex():
    # Dirichlet(1,1,1): each marginal is Beta(1, 2), mean 1/3, variance 2/36
    r = preference_sweep(3, count=20000, seed=0)
    np.testing.assert_allclose(r.mean(axis=0), 1 / 3, atol=0.01)
    np.testing.assert_allclose(r.var(axis=0), 2 / 36, atol=0.005)


@pytest.mark.parametrize("args", [(0, 20), (3, 0)])
def test_preference_sweep_rejects_bad_sizes(args):
    with pytest.raises(UserError):
        preference_sweep(*args)


# ---------------------------------------------------------------- hypervolume


def test_hypervolume_2d_hand():
    assert hypervolume(np.array([[1.0, 2.0], [2.0, 1.0]]), np.array([3.0, 3.0])) == 3.0
    # one point: a box
    assert hypervolume(np.array([[1.0, 1.0]]), np.array([3.0, 2.5])) == pytest.approx(3.0)
    # a dominated point and a duplicate change nothing
    pts = np.array([[1.0, 2.0], [2.0, 1.0], [2.5, 2.5], [1.0, 2.0]])
    assert hypervolume(pts, np.array([3.0, 3.0])) == pytest.approx(3.0)


def test_hypervolume_points_outside_reference_contribute_nothing():
    ref = np.array([3.0, 3.0])
    assert hypervolume(np.array([[3.0, 2.0], [4.0, 1.0]]), ref) == 0.0
    assert hypervolume(np.array([[1.0, 2.0], [4.0, 0.0]]), ref) == pytest.approx(2.0)
    assert hypervolume(np.zeros((0, 2)), ref) == 0.0


def test_hypervolume_3d_hand():
    ref = np.array([3.0, 3.0, 3.0])
    assert hypervolume(np.array([[1.0, 1.0, 1.0]]), ref) == pytest.approx(8.0)
    # boxes 2*2*1 = 4 and 1*1*2 = 2 overlapping in [2,3]^3 = 1 -> 5
    pts = np.array([[1.0, 1.0, 2.0], [2.0, 2.0, 1.0]])
    assert hypervolume(pts, ref) == pytest.approx(5.0)
    # boxes [0,3]x[2,3]x[2,3] and its two rotations, 3 each; every pairwise overlap and the
    # triple overlap are [2,3]^3 = 1 -> inclusion-exclusion 9 - 3 + 1
    pts = np.array([[0.0, 2.0, 2.0], [2.0, 0.0, 2.0], [2.0, 2.0, 0.0]])
    assert hypervolume(pts, ref) == pytest.approx(7.0)


def test_hypervolume_3d_matches_exact_cell_count():
    # integer points: HV = number of unit cells whose lower corner is weakly dominated
    rng = np.random.default_rng(0)
    ref = np.array([6.0, 6.0, 6.0])
    for _ in range(5):
        pts = rng.integers(0, 6, size=(8, 3)).astype(float)
        cells = sum(
            1
            for c in itertools.product(range(6), repeat=3)
            if np.any(np.all(pts <= np.array(c, dtype=float), axis=1))
        )
        assert hypervolume(pts, ref) == pytest.approx(float(cells))


def test_hypervolume_3d_matches_monte_carlo():
    rng = np.random.default_rng(1)
    pts = rng.random((10, 3))
    ref = np.ones(3)
    samples = rng.random((200_000, 3))
    dominated = np.zeros(len(samples), dtype=bool)
    for p in pts:
        dominated |= np.all(samples >= p, axis=1)
    assert hypervolume(pts, ref) == pytest.approx(dominated.mean(), abs=0.005)


def test_hypervolume_rejects_bad_input():
    with pytest.raises(UserError):
        hypervolume(np.array([[1.0, 2.0]]), np.array([3.0, 3.0, 3.0]))
    with pytest.raises(UserError):
        hypervolume(np.array([[1.0, np.nan]]), np.array([3.0, 3.0]))
    with pytest.raises(UserError):
        hypervolume(np.array([1.0, 2.0]), np.array([3.0, 3.0]))


# ---------------------------------------------------------------- normalisation, reference


def test_normalised_losses_and_reference_point():
    losses = np.array([[2.0, 3.0], [4.0, 1.5]])
    norm = normalised_losses(losses, np.array([2.0, 1.5]))
    np.testing.assert_allclose(norm, [[1.0, 2.0], [2.0, 1.0]])
    np.testing.assert_allclose(normalised_losses(np.array([2.0, 3.0]), [2.0, 1.5]), [1.0, 2.0])
    np.testing.assert_allclose(reference_point(norm), [2.2, 2.2])
    np.testing.assert_allclose(reference_point(norm, margin=0.0), [2.0, 2.0])
    # both points lie strictly inside the box and contribute: boxes 1.2*0.2 and 0.2*1.2
    # overlapping in 0.2*0.2
    ref = reference_point(norm)
    assert hypervolume(norm, ref) == pytest.approx(1.2 * 0.2 * 2 - 0.2 * 0.2)


def test_normalised_losses_rejects_bad_baselines():
    with pytest.raises(UserError):
        normalised_losses(np.ones((2, 2)), np.array([1.0, 0.0]))
    with pytest.raises(UserError):
        normalised_losses(np.ones((2, 2)), np.array([1.0, 1.0, 1.0]))
    with pytest.raises(UserError):
        reference_point(np.ones((2, 2)), margin=-0.1)
    with pytest.raises(UserError):
        reference_point(np.zeros((0, 2)))


# ---------------------------------------------------------------- uniformity


def test_uniformity_equal_weighted_losses_is_one():
    prefs = np.array([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]])
    losses = 1.0 / prefs  # r_j L_j = 1 for all j
    assert uniformity(losses, prefs) == pytest.approx(1.0)


def test_uniformity_hand_values():
    # all weighted loss on one task: KL = ln N -> mu = 1 - ln N
    assert uniformity(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]])) == pytest.approx(
        1 - math.log(2)
    )
    assert uniformity(np.array([[1.0, 0.0, 0.0]]), np.ones((1, 3))) == pytest.approx(
        1 - math.log(3)
    )
    # r = (0.5, 0.5), L = (3, 1): Lhat = (3/4, 1/4),
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    mu1 = 1 - kl
    assert uniformity(np.array([[3.0, 1.0]]), np.array([[0.5, 0.5]])) == pytest.approx(mu1)
    # mean over rows, scale of r irrelevant
    losses = np.array([[3.0, 1.0], [1.0, 1.0]])
    prefs = np.array([[1.0, 1.0], [0.3, 0.3]])
    assert uniformity(losses, prefs) == pytest.approx((mu1 + 1.0) / 2)


def test_uniformity_rejects_bad_input():
    with pytest.raises(UserError):
        uniformity(np.zeros((1, 2)), np.array([[0.5, 0.5]]))
    with pytest.raises(UserError):
        uniformity(np.array([[-1.0, 1.0]]), np.array([[0.5, 0.5]]))
    with pytest.raises(UserError):
        uniformity(np.ones((2, 2)), np.ones((3, 2)))


# ---------------------------------------------------------------- controllability


def test_controllability_monotone_cases():
    r1 = np.linspace(0.1, 0.9, 9)
    prefs = np.stack([r1, 1 - r1], axis=1)
    score = 10 + r1**2  # task 0: accuracy rises with its weight
    loss = np.exp(r1 - 1)  # task 1: loss falls as its own weight 1 - r1 rises
    perf = np.stack([score, loss], axis=1)
    np.testing.assert_allclose(controllability(perf, prefs, [True, False]), [1.0, 1.0])
    # the wrong direction flags invert both
    np.testing.assert_allclose(controllability(perf, prefs, [False, True]), [-1.0, -1.0])


def test_controllability_hand_value_and_constant_columns():
    prefs = np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]])
    # ranks of task 0 performance: (1, 3, 2, 4) vs weights (1, 2, 3, 4): rho = 1 - 6*2/(4*15)
    perf = np.array([[1.0, 5.0], [3.0, 5.0], [2.0, 5.0], [4.0, 5.0]])
    out = controllability(perf, prefs, [True, True])
    np.testing.assert_allclose(out, [0.8, 0.0])  # constant column -> 0
    # constant weights -> 0, no warning, no NaN
    const = np.full((4, 2), 0.5)
    np.testing.assert_array_equal(controllability(perf, const, [True, True]), [0.0, 0.0])
    # a single point -> 0
    np.testing.assert_array_equal(controllability(perf[:1], prefs[:1], [True, False]), [0, 0])


def test_controllability_rejects_bad_input():
    with pytest.raises(UserError):
        controllability(np.ones((3, 2)), np.ones((3, 2)), [True])
    with pytest.raises(UserError):
        controllability(np.ones((3, 2)), np.ones((4, 2)), [True, True])


# ---------------------------------------------------------------- FLOPs


def test_flops_stats_hand_values():
    f = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    s = flops_stats(f)
    assert set(s) == {"mean", "std", "min", "max", "q05", "q50", "q95"}
    assert s["mean"] == pytest.approx(0.6)
    assert s["std"] == pytest.approx(math.sqrt(0.08))  # population std
    assert (s["min"], s["max"]) == (0.2, 1.0)
    assert s["q50"] == pytest.approx(0.6)
    assert s["q05"] == pytest.approx(0.2 + 0.05 * 4 * 0.2)  # linear interpolation
    assert s["q95"] == pytest.approx(0.8 + 0.8 * 0.2)
    with pytest.raises(UserError):
        flops_stats(np.array([]))


def test_budget_adherence_hand_values():
    f = np.array([0.3, 0.5, 0.7, 0.9])
    assert budget_adherence(f, np.array([0.5, 0.5, 0.5, 1.0])) == pytest.approx(0.75)
    assert budget_adherence(f, 0.6) == pytest.approx(0.5)
    # tolerance absorbs rounding at the boundary
    assert budget_adherence(np.array([0.5 + 1e-12]), 0.5) == 1.0
    assert budget_adherence(np.array([0.5 + 1e-6]), 0.5) == 0.0
    with pytest.raises(UserError):
        budget_adherence(f, np.array([0.5, 0.5]))


def test_delta_m_is_reexported():
    results = {"a": {"acc": 0.9}}
    baselines = {"a": {"acc": 0.8}}
    assert delta_m(results, baselines, {"a": {"acc": True}}) == pytest.approx(12.5)


def test_corner_gains_size_the_lever_in_each_metrics_better_direction():
    from types import SimpleNamespace

    from dymu.evaluate.search import corner_gains, corner_preferences

    np.testing.assert_allclose(
        corner_preferences(3),
        [[1 / 3, 1 / 3, 1 / 3], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]],
    )
    tasks = [
        SimpleNamespace(name="seg", primary_metric="miou", metric_directions={"miou": True}),
        SimpleNamespace(name="depth", primary_metric="err", metric_directions={"err": False}),
    ]

    def row(corner, miou, err, losses):
        metrics = {"seg": {"miou": miou}, "depth": {"err": err}}
        return {
            "budget": 0.5,
            "corner": corner,
            "tree": f"t{corner}",
            "losses": losses,
            "metrics": metrics,
        }

    rows = [
        row(0, 50.0, 2.0, [1.0, 1.0]),
        row(1, 53.0, 2.5, [0.8, 1.3]),
        row(2, 49.0, 1.5, [1.2, 0.7]),
    ]
    gains = corner_gains(tasks, [0.5], rows)["0.5"]
    assert gains["trees"] == 3
    seg, depth = gains["tasks"]["seg"], gains["tasks"]["depth"]
    assert seg["gain"] == pytest.approx(3.0) and seg["vs_others"] == pytest.approx(4.0)
    assert seg["loss_gain"] == pytest.approx(0.2)
    # Lower is better for depth's error: 2.0 -> 1.5 at its corner is a gain of +0.5.
    assert depth["gain"] == pytest.approx(0.5) and depth["vs_others"] == pytest.approx(1.0)
    assert depth["loss_gain"] == pytest.approx(0.3)
