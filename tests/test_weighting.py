"""Task weightings: hand-computed weights and gradients, the min-norm solver against a QP,
a reference tensioner step, the XOR/AND toy of the tensioner paper, and bad input."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dymu.errors import RuntimeFailure, UserError
from dymu.weighting import (
    WEIGHTINGS,
    build_weighting,
    min_norm_point,
    min_norm_weights,
    pcgrad_coefficients,
    weighting_options,
)
from dymu.weighting.tensioner import (
    bisector_coefficients,
    repair_conflicts,
    tension,
    tension_coefficients,
)

GRADIENT_METHODS = ("mgda_ub", "pcgrad", "tensioner")
LOSS_METHODS = ("equal", "uncertainty", "dwa")


class Probe(nn.Module):
    """Losses with known gradients: ``L_t = c_t + <g_t, theta> + a_t h_t`` at 0.

    ``dL_t/dtheta = g_t`` (theta is the shared parameter), ``dL_t/dh_t = a_t`` (``h_t`` is
    task t's own parameter), and ``L_t = c_t``.
    """

    def __init__(self, grads: list[list[float]], values: list[float], slopes: list[float]):
        super().__init__()
        self.g = torch.tensor(grads, dtype=torch.float64)  # [T, P]
        self.c = torch.tensor(values, dtype=torch.float64)  # [T]
        self.a = torch.tensor(slopes, dtype=torch.float64)  # [T]
        self.theta = nn.Parameter(torch.zeros(self.g.shape[1], dtype=torch.float64))
        self.heads = nn.Parameter(torch.zeros(len(values), dtype=torch.float64))

    def forward(self) -> Tensor:
        return self.c + self.g @ self.theta + self.a * self.heads  # [T]


def step(name: str, probe: Probe, **options) -> Tensor:
    weighting = build_weighting(name, num_tasks=len(probe.c), **options).double()
    return weighting.backward(probe(), [probe.theta])


# ----------------------------------------------------------------------------- registry


def test_registry_lists_every_strategy():
    assert WEIGHTINGS.names() == sorted(LOSS_METHODS + GRADIENT_METHODS)
    assert weighting_options("tensioner") == {"window": 10, "alpha": 0.3, "steepness": math.e}


def test_unknown_name_lists_the_strategies():
    with pytest.raises(UserError, match=r"unknown weighting 'gradnorm'; choose one of: dwa, "):
        build_weighting("gradnorm", num_tasks=2)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(UserError, match=r"unknown option\(s\) alfa; valid options: window, alpha"):
        build_weighting("tensioner", num_tasks=2, alfa=0.3)
    with pytest.raises(UserError, match=r"valid options: \(none\)|valid options: seed"):
        build_weighting("pcgrad", num_tasks=2, temperature=2.0)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("tensioner", {"alpha": 1.5}, r"alpha must be in \[0.0, 1.0\], got 1.5"),
        ("tensioner", {"window": 0}, r"window must be in \[1, inf\]"),
        ("tensioner", {"window": 2.5}, r"window must be an integer"),
        ("dwa", {"temperature": 0.0}, r"temperature must be in \(0.0, inf\]"),
        ("equal", {"weights": [1.0]}, r"one entry per task \(2\), got 1"),
        ("equal", {"weights": [1.0, -1.0]}, r"weights must be in \[0.0, inf\]"),
        ("equal", {"weights": [0.0, 0.0]}, r"must not all be zero"),
        ("mgda_ub", {"normalization": "l1"}, r"unknown normalization 'l1'; choose one of: none"),
        ("uncertainty", {"init_log_var": "0"}, r"init_log_var must be a finite number"),
    ],
)
def test_bad_option_values(name, options, message):
    with pytest.raises(UserError, match=message):
        build_weighting(name, num_tasks=2, **options)


def test_bad_task_count_and_loss_shape():
    with pytest.raises(UserError, match="num_tasks must be an integer >= 1"):
        build_weighting("equal", num_tasks=0)
    weighting = build_weighting("pcgrad", num_tasks=3)
    theta = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"losses must be a \[3\] tensor, got \(2,\)"):
        weighting.backward(theta * 1.0, [theta])


def test_non_finite_gradient_is_a_runtime_failure():
    theta = nn.Parameter(torch.zeros(2))
    # A list, not a stacked tensor: backward of one stacked entry multiplies the other
    # task's NaN by a zero and would blame both tasks.
    losses = [theta @ torch.tensor([1.0, 0.0]), theta @ torch.tensor([float("nan"), 1.0])]
    weighting = build_weighting("mgda_ub", num_tasks=2)
    with pytest.raises(
        RuntimeFailure, match=r"mgda_ub: task gradients are not finite \(tasks \[1\]\)"
    ):
        weighting.backward(losses, [theta])


# --------------------------------------------------------------------------- min norm


def brute_force_min_norm(gram: np.ndarray) -> float:
    """Smallest squared norm over every support's affine minimiser that is feasible."""
    num = len(gram)
    best = math.inf
    for size in range(1, num + 1):
        for support in itertools.combinations(range(num), size):
            sub = gram[np.ix_(support, support)]
            system = np.block([[sub, np.ones((size, 1))], [np.ones((1, size)), np.zeros((1, 1))]])
            rhs = np.zeros(size + 1)
            rhs[-1] = 1.0
            w = np.linalg.lstsq(system, rhs, rcond=None)[0][:size]
            if np.all(w >= -1e-12):
                best = min(best, float(w @ sub @ w))
    return best


def test_min_norm_of_two_orthogonal_unit_vectors_is_the_midpoint():
    weights = min_norm_point(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5]))


def test_min_norm_two_vector_closed_form():
    # g1 = (1, 0), g2 = (0, 2): c = (4 - 0) / (1 + 4) = 0.8, point (0.8, 0.4).
    np.testing.assert_allclose(min_norm_weights(np.array([[1.0, 0.0], [0.0, 4.0]])), [0.8, 0.2])
    # g2 = (2, 2) lies beyond g1 = (1, 0) (<g1, g2> = 2 >= |g1|^2): the answer is g1.
    np.testing.assert_allclose(min_norm_weights(np.array([[1.0, 2.0], [2.0, 8.0]])), [1.0, 0.0])
    np.testing.assert_allclose(min_norm_weights(np.array([[3.0]])), [1.0])


def test_min_norm_matches_brute_force_and_scipy_qp():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    for _ in range(40):
        num, dim = int(rng.integers(3, 6)), int(rng.integers(2, 6))
        grads = rng.normal(size=(num, dim)) + rng.normal(size=dim) * rng.uniform(0.0, 2.0)
        gram = grads @ grads.T
        w = min_norm_weights(gram)
        assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
        qp = minimize(
            lambda x, m=gram: x @ m @ x,
            np.full(num, 1.0 / num),
            jac=lambda x, m=gram: 2.0 * m @ x,
            bounds=[(0.0, 1.0)] * num,
            constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1.0}],
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        )
        scale = np.trace(gram) / num
        assert w @ gram @ w == pytest.approx(brute_force_min_norm(gram), abs=1e-12 * scale)
        assert w @ gram @ w <= qp.x @ gram @ qp.x + 1e-12 * scale
        # Frank-Wolfe alone (the reference code) is close but not exact.
        fw = min_norm_weights(gram, refine=False)
        assert w @ gram @ w <= fw @ gram @ fw + 1e-15 * scale
        assert fw @ gram @ fw == pytest.approx(w @ gram @ w, abs=5e-3 * scale)


def test_min_norm_kkt_with_many_tasks_and_degenerate_rows():
    rng = np.random.default_rng(1)
    for trial in range(30):
        num, dim = 20, int(rng.choice([3, 50]))
        grads = rng.normal(size=(num, dim)) + rng.normal(size=dim)
        grads[1] = grads[0]  # a duplicate
        if trial % 3 == 0:
            grads[5] = 0.0  # a zero gradient: the optimum is 0
        gram = grads @ grads.T
        w = min_norm_weights(gram)
        m_w = gram @ w
        # Optimality on the simplex: no vertex is more opposed to the point than itself.
        assert m_w.min() >= w @ m_w - 1e-12 * gram.diagonal().max()


# --------------------------------------------------------------------- loss weightings


def test_equal_with_a_preference_vector():
    probe = Probe([[1.0, 2.0], [3.0, -1.0]], [1.0, 2.0], [5.0, 7.0])
    weights = step("equal", probe, weights=[0.2, 0.8])
    torch.testing.assert_close(weights, torch.tensor([0.2, 0.8], dtype=torch.float64))
    torch.testing.assert_close(probe.theta.grad, torch.tensor([2.6, -0.4], dtype=torch.float64))
    torch.testing.assert_close(probe.heads.grad, torch.tensor([1.0, 5.6], dtype=torch.float64))


def test_uncertainty_weights_and_gradient_of_log_variances():
    probe = Probe([[1.0, 0.0], [0.0, 1.0]], [1.0, 4.0], [1.0, 1.0])
    weighting = build_weighting("uncertainty", num_tasks=2, init_log_var=math.log(2.0)).double()
    weights = weighting.backward(probe(), [probe.theta])
    torch.testing.assert_close(weights, torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(probe.theta.grad, torch.tensor([0.5, 0.5], dtype=torch.float64))
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L = 1 - L / 2.
    torch.testing.assert_close(
        weighting.log_vars.grad, torch.tensor([0.5, -1.0], dtype=torch.float64)
    )
    assert [n for n, _ in weighting.named_parameters()] == ["log_vars"]
    # 1 + 0.5 * 1 + ln 2 + 0.5 * 4 + ln 2: the logged scalarised loss.
    assert float(weighting.log["total"]) == pytest.approx(2.5 + 2 * math.log(2.0))


def test_dwa_weights_from_epoch_losses():
    weighting = build_weighting("dwa", num_tasks=2)
    probe = Probe([[1.0], [1.0]], [1.0, 1.0], [1.0, 1.0])
    assert step_with(weighting, probe).tolist() == [1.0, 1.0]  # epoch 1
    weighting.epoch_end(torch.tensor([1.0, 1.0]))
    assert step_with(weighting, probe).tolist() == [1.0, 1.0]  # epoch 2
    weighting.epoch_end(torch.tensor([0.5, 1.0]))
    # r = (0.5, 1.0); w = 2 softmax(r / 2) = 2 (e^0.25, e^0.5) / (e^0.25 + e^0.5).
    expected = 2 * np.exp([0.25, 0.5]) / np.exp([0.25, 0.5]).sum()
    np.testing.assert_allclose(step_with(weighting, probe).numpy(), expected, rtol=1e-6)
    resumed = build_weighting("dwa", num_tasks=2)
    resumed.load_state_dict(weighting.state_dict())
    np.testing.assert_allclose(resumed.epoch_weights().numpy(), expected, rtol=1e-12)
    weighting.epoch_end(torch.tensor([0.25, 1.0]))  # now r = (0.25 / 0.5, 1 / 1)
    expected = 2 * np.exp([0.25, 0.5]) / np.exp([0.25, 0.5]).sum()
    np.testing.assert_allclose(weighting.epoch_weights().numpy(), expected, rtol=1e-12)


def step_with(weighting, probe: Probe) -> Tensor:
    probe.zero_grad()
    return weighting.backward(probe().float(), [probe.theta])


# ----------------------------------------------------------------- gradient weightings


@pytest.mark.parametrize(
    ("normalization", "grads", "values", "alpha"),
    [
        ("none", [[2.0, 0.0], [0.0, 1.0]], [1.0, 1.0], [0.2, 0.8]),  # c = 1 / (4 + 1)
        ("l2", [[2.0, 0.0], [0.0, 1.0]], [1.0, 1.0], [0.5, 0.5]),
        ("loss", [[2.0, 0.0], [0.0, 1.0]], [2.0, 1.0], [0.5, 0.5]),
        ("loss+", [[2.0, 0.0], [0.0, 1.0]], [3.0, 2.0], [9 / 13, 4 / 13]),  # n = (6, 2)
    ],
)
def test_mgda_weights_and_raw_gradient_combination(normalization, grads, values, alpha):
    probe = Probe(grads, values, [3.0, 5.0])
    weights = step("mgda_ub", probe, normalization=normalization)
    expected = torch.tensor(alpha, dtype=torch.float64)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(probe.theta.grad, expected @ probe.g)  # raw g_t
    torch.testing.assert_close(probe.heads.grad, probe.a)  # heads unscaled


def test_pcgrad_two_conflicting_gradients():
    # g1 = (1, 0), g2 = (-1, 1), <g1, g2> = -1:
    # g1' = g1 + g2 / 2 = (0.5, 0.5); g2' = g2 + g1 = (0, 1); sum (0.5, 1.5) = 2 g1 + 1.5 g2.
    probe = Probe([[1.0, 0.0], [-1.0, 1.0]], [1.0, 1.0], [3.0, 5.0])
    weights = step("pcgrad", probe)
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.5], dtype=torch.float64))
    torch.testing.assert_close(probe.theta.grad, torch.tensor([0.5, 1.5], dtype=torch.float64))
    torch.testing.assert_close(probe.heads.grad, probe.a)


def test_pcgrad_order_matters_and_matches_vector_projection():
    grads = np.array([[1.0, 0.0], [-1.0, 1.0], [0.0, -1.0]])
    gram = grads @ grads.T
    # Task 0 against (1, 2): (1,0) -> (0.5, 0.5) -> (0.5, 0); against (2, 1): only g1 -> (0.5, 0.5).
    first = pcgrad_coefficients(gram, [[1, 2], [0, 2], [0, 1]])
    second = pcgrad_coefficients(gram, [[2, 1], [0, 2], [0, 1]])
    np.testing.assert_allclose(first[0] @ grads, [0.5, 0.0], atol=1e-15)
    np.testing.assert_allclose(second[0] @ grads, [0.5, 0.5], atol=1e-15)
    rng = np.random.default_rng(2)
    for _ in range(20):
        grads = rng.normal(size=(4, 3))
        orders = [list(rng.permutation([j for j in range(4) if j != i])) for i in range(4)]
        projected = grads.copy()
        for i in range(4):  # the paper's Algorithm 1 on vectors
            for j in orders[i]:
                inner = projected[i] @ grads[j]
                if inner < 0:
                    projected[i] -= inner / (grads[j] @ grads[j]) * grads[j]
        coef = pcgrad_coefficients(grads @ grads.T, orders)
        np.testing.assert_allclose(coef @ grads, projected, atol=1e-12)


def test_pcgrad_order_is_seeded_and_resumable():
    rng = np.random.default_rng(3)
    grads = rng.normal(size=(4, 3)).tolist()
    runs = []
    for _ in range(2):
        weighting = build_weighting("pcgrad", num_tasks=4, seed=7).double()
        probe = Probe(grads, [1.0] * 4, [1.0] * 4)
        runs.append([step_double(weighting, probe) for _ in range(5)])
    torch.testing.assert_close(torch.stack(runs[0]), torch.stack(runs[1]))
    weighting = build_weighting("pcgrad", num_tasks=4, seed=7).double()
    for _ in range(2):
        step_double(weighting, probe)
    resumed = build_weighting("pcgrad", num_tasks=4, seed=0).double()
    resumed.load_state_dict(weighting.state_dict())
    torch.testing.assert_close(step_double(resumed, probe), runs[0][2])


def step_double(weighting, probe: Probe) -> Tensor:
    probe.zero_grad()
    return weighting.backward(probe(), [probe.theta])


# --------------------------------------------------------------------------- tensioner


def test_tension_formula():
    # The authors' code: a / (1 + exp(-p e + e)) + 1 - a.
    alpha = 0.3
    for delta in (-3.0, 0.0, 1.0, 1.5, 4.0):
        authors = alpha / (1 + math.exp(-delta * math.e + math.e)) + 1 - alpha
        assert tension(np.array([delta]), alpha=alpha)[0] == pytest.approx(authors, rel=1e-12)
    assert tension(np.array([1.0]), alpha=0.3)[0] == pytest.approx(0.85)
    np.testing.assert_allclose(tension(np.array([-1e6, 1e6]), alpha=0.3), [0.7, 1.0])
    np.testing.assert_allclose(tension(np.array([1.0]), alpha=1.0, steepness=5.0), [0.5])


def test_bisector_is_the_rescaled_min_norm_of_unit_gradients():
    # Unit gradients (1, 0), (0, 1): w = (1/2, 1/2); b ~ w / |g| = (1/4, 1/2) -> (1/3, 2/3);
    # d = (2/3, 2/3): equal angles with both gradients.
    grads = np.array([[2.0, 0.0], [0.0, 1.0]])
    coef = bisector_coefficients(grads @ grads.T)
    np.testing.assert_allclose(coef, [1 / 3, 2 / 3])
    np.testing.assert_allclose(coef @ grads, [2 / 3, 2 / 3])
    # A zero gradient is left out; all zero gives 0.
    grads = np.array([[2.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(bisector_coefficients(grads @ grads.T), [1.0, 0.0])
    np.testing.assert_allclose(bisector_coefficients(np.zeros((2, 2))), [0.0, 0.0])


def test_repair_matches_the_authors_rotation():
    # g = (1, 0), d_n = (-1, 1): the segment from g to d_n crosses g's normal plane at (0, 0.5);
    # the authors: w = (0, 1), a = angle at g = arctan(1 / 2): tan(a) |g| w = (0, 0.5).
    grads = np.array([[1.0, 0.0], [-1.0, 1.0]])
    gram = grads @ grads.T
    coef, repaired, fallback = repair_conflicts(gram, np.array([0.0, 1.0]), np.array([0.5, 0.5]))
    np.testing.assert_allclose(coef @ grads, [0.0, 0.5], atol=1e-15)
    assert repaired.tolist() == [True, False] and not fallback
    rng = np.random.default_rng(4)
    for _ in range(50):
        grads = rng.normal(size=(2, 5))
        d_n = rng.normal(size=5)
        g = grads[0]
        if d_n @ g >= 0:
            d_n = -d_n
        u = g / np.linalg.norm(g)
        w = d_n - (d_n @ u) * u
        diff = d_n - g
        angle = np.pi - np.arccos(g @ diff / (np.linalg.norm(g) * np.linalg.norm(diff)))
        authors = np.tan(angle) * np.linalg.norm(g) * w / np.linalg.norm(w)
        # Basis (g, w): d_n = (<d_n, g> / |g|^2) g + w, and the repair cannot conflict with w.
        basis = np.vstack([g, w])
        coef, repaired, _ = repair_conflicts(
            basis @ basis.T, np.array([d_n @ g / (g @ g), 1.0]), np.array([1.0, 0.0])
        )
        assert repaired.tolist() == [True, False]
        np.testing.assert_allclose(coef @ basis, authors, rtol=1e-9, atol=1e-12)


def test_repair_leaves_no_conflict():
    rng = np.random.default_rng(5)
    fallbacks = 0
    for trial in range(200):
        num = 2 if trial < 50 else int(rng.integers(3, 6))
        grads = rng.normal(size=(num, 4)) + rng.normal(size=4) * rng.uniform(0, 1)
        gram = grads @ grads.T
        bisector = bisector_coefficients(gram)
        assert np.all(gram @ bisector >= -1e-12)
        pulled = tension_coefficients(gram, bisector, rng.uniform(0.0, 3.0, size=num))
        coef, _, fallback = repair_conflicts(gram, pulled, bisector)
        fallbacks += fallback
        assert fallback is False or num >= 3  # two tasks never need the safeguard
        inner = gram @ coef
        assert np.all(inner >= -1e-12 * gram.diagonal().max())
    assert fallbacks > 0  # the safeguard was exercised


def reference_tensioner(grads, losses, window: int, alpha: float):
    """The authors' algorithm on explicit vectors (a sliding window, their repair with tan)."""
    history, previous = [], None
    for g_step, loss_step in zip(grads, losses, strict=True):
        unit = g_step / np.linalg.norm(g_step, axis=1, keepdims=True)
        w = min_norm_weights(unit @ unit.T)
        gamma = 1.0 / np.sum(w / np.linalg.norm(g_step, axis=1))
        d = gamma * (w @ unit)
        history.append(np.linalg.norm(g_step, axis=1))
        direction = d
        if len(history) >= window:
            total = np.sum(history[-window:], axis=0)
            if previous is not None:
                delta = total / previous + np.log10(loss_step)
                tau = alpha / (1 + np.exp(-delta * np.e + np.e)) + 1 - alpha
                direction = d + sum(
                    tau[i] * (g_step[i] - d) / np.linalg.norm(g_step[i] - d)
                    for i in range(len(tau))
                )
                for g in g_step:
                    if direction @ g < 0:
                        u = g / np.linalg.norm(g)
                        perp = direction - (direction @ u) * u
                        diff = direction - g
                        cos = g @ diff / (np.linalg.norm(g) * np.linalg.norm(diff))
                        angle = np.pi - np.arccos(cos)
                        direction = np.tan(angle) * np.linalg.norm(g) * perp / np.linalg.norm(perp)
            previous = total
        yield direction


def test_tensioner_matches_the_reference_algorithm_step_by_step():
    rng = np.random.default_rng(6)
    window, steps = 3, 8
    base = rng.normal(size=(2, 4))
    grads = [
        base * rng.uniform(0.5, 2.0, size=(2, 1)) + 0.3 * rng.normal(size=(2, 4))
        for _ in range(steps)
    ]
    losses = [rng.uniform(0.01, 5.0, size=2) for _ in range(steps)]
    weighting = build_weighting("tensioner", num_tasks=2, window=window, alpha=0.3).double()
    for k, expected in enumerate(reference_tensioner(grads, losses, window, 0.3)):
        probe = Probe(grads[k].tolist(), losses[k].tolist(), [1.0, 1.0])
        weights = weighting.backward(probe(), [probe.theta])
        np.testing.assert_allclose(probe.theta.grad.numpy(), expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(weights.numpy() @ grads[k], expected, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(probe.heads.grad, probe.a)
        active = k + 1 > window
        assert bool(np.any(weighting.log["tensions"].numpy() > 0)) == active
    assert int(weighting.steps) == steps


def test_tensioner_hand_step_with_equal_norms_and_unequal_losses():
    # Window 1, constant gradients: ratio 1, delta_i = 1 + log10(L_i) = (2, 1);
    # tau = (0.7 + 0.3 sigmoid(e), 0.85). Gradients (1, 0) and (0, 1): d = (0.5, 0.5), and
    # (g_1 - d) / |g_1 - d| = -(g_2 - d) / |g_2 - d| = (1, -1) / sqrt(2).
    weighting = build_weighting("tensioner", num_tasks=2, window=1).double()
    for k in range(2):
        probe = Probe([[1.0, 0.0], [0.0, 1.0]], [10.0, 1.0], [1.0, 1.0])
        weighting.backward(probe(), [probe.theta])
        if k == 0:
            torch.testing.assert_close(
                probe.theta.grad, torch.tensor([0.5, 0.5], dtype=torch.float64)
            )
    tau = np.array([0.7 + 0.3 / (1 + math.exp(-math.e)), 0.85])
    pull = (tau[0] - tau[1]) / math.sqrt(2.0)
    np.testing.assert_allclose(probe.theta.grad.numpy(), [0.5 + pull, 0.5 - pull], rtol=1e-12)
    np.testing.assert_allclose(weighting.log["tensions"].numpy(), tau, rtol=1e-12)
    np.testing.assert_allclose(weighting.log["delta"].numpy(), [2.0, 1.0], rtol=1e-12)


def test_tensioner_with_one_task_follows_its_gradient():
    weighting = build_weighting("tensioner", num_tasks=1, window=1).double()
    for _ in range(3):
        probe = Probe([[3.0, -4.0]], [0.5], [2.0])
        weights = weighting.backward(probe(), [probe.theta])
        torch.testing.assert_close(weights, torch.tensor([1.0], dtype=torch.float64))
        torch.testing.assert_close(probe.theta.grad, torch.tensor([3.0, -4.0], dtype=torch.float64))


# ------------------------------------------------------------- the XOR / AND toy model


X_LOGIC = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
Y_LOGIC = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])  # [task: xor, and; sample]


class Logic(nn.Module):
    """The tensioner paper's demo: a shared encoder of two binary inputs, one head per gate."""

    def __init__(self, hidden: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(2, hidden), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(2)])

    def losses(self, z: Tensor | None = None, *, stacked: bool = True) -> Tensor | list[Tensor]:
        device = self.heads[0].weight.device
        z = self.encoder(X_LOGIC.to(device)) if z is None else z  # [4, hidden]
        logits = [head(z).squeeze(1) for head in self.heads]  # 2 x [4]
        targets = Y_LOGIC.to(device)
        losses = [
            F.binary_cross_entropy_with_logits(lg, y) for lg, y in zip(logits, targets, strict=True)
        ]
        return torch.stack(losses) if stacked else losses  # [2] or 2 scalars


def test_tensioner_solves_xor_and_and():
    model = Logic(hidden=4, seed=0)
    weighting = build_weighting("tensioner", num_tasks=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(600):
        optimizer.zero_grad()
        losses = model.losses()
        if bool((losses < 1e-3).all()):
            break
        weighting.backward(losses, list(model.encoder.parameters()))
        optimizer.step()
    steps = int(weighting.steps)
    assert bool((losses < 1e-3).all()), f"losses {losses.tolist()} after {steps} steps"
    assert steps > weighting.window  # the tensions took part


@pytest.mark.parametrize("name", LOSS_METHODS + GRADIENT_METHODS)
@pytest.mark.parametrize("through_representation", [False, True])
def test_gradients_follow_the_contract(name, through_representation):
    """Shared .grad = old + sum_t c_t g_t with c the returned weights; heads h_t * own grad."""
    model = Logic(hidden=3, seed=5)  # gradients conflict, in parameters and representation
    weighting = build_weighting(
        name, num_tasks=2, **({"init_log_var": 0.4} if name == "uncertainty" else {})
    )
    if name == "dwa":
        weighting.epoch_end(torch.tensor([1.0, 1.0]))
        weighting.epoch_end(torch.tensor([0.6, 0.9]))
    shared = list(model.encoder.parameters())
    heads = list(model.heads.parameters())
    for p in shared + heads:
        p.grad = torch.full_like(p, 0.25)  # .grad accumulates
    z = model.encoder(X_LOGIC)
    losses = model.losses(z)
    per_task = [
        [
            g if g is not None else torch.zeros_like(p)
            for g, p in zip(
                torch.autograd.grad(
                    losses[t], shared + heads, retain_graph=True, allow_unused=True
                ),
                shared + heads,
                strict=True,
            )
        ]
        for t in range(2)
    ]  # [task][parameter]
    rep_grads = torch.stack(
        [torch.autograd.grad(losses[t], z, retain_graph=True)[0].reshape(-1) for t in range(2)]
    )  # [2, 4 * hidden]
    weights = weighting.backward(
        losses, shared, representation=z if through_representation else None
    )
    n = len(shared)
    for i, p in enumerate(shared):
        expected = 0.25 + sum(weights[t] * per_task[t][i] for t in range(2))
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    head_factor = weights if name in LOSS_METHODS else torch.ones(2)
    for i, p in enumerate(heads):
        t = i // 2  # weight and bias of head 0, then of head 1
        expected = 0.25 + head_factor[t] * per_task[t][n + i]
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
        assert torch.count_nonzero(per_task[1 - t][n + i]) == 0  # heads see only their task
    # The weights each method prescribes, computed independently.
    if name == "equal":
        torch.testing.assert_close(weights, torch.ones(2))
    elif name == "uncertainty":
        torch.testing.assert_close(weights, torch.full((2,), math.exp(-0.4)))
    elif name == "dwa":
        expected = 2 * torch.softmax(torch.tensor([0.6, 0.9]) / 2, dim=0)
        torch.testing.assert_close(weights, expected)
    elif name == "mgda_ub":
        grads = (
            rep_grads
            if through_representation
            else torch.stack(
                [torch.cat([g.reshape(-1) for g in per_task[t][:n]]) for t in range(2)]
            )
        )
        g1, g2 = grads.double()
        c = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
        assert 0.0 < c < 1.0  # an interior point of the segment, not a clipped end
        torch.testing.assert_close(weights, torch.tensor([c, 1 - c]), rtol=1e-5, atol=1e-7)
    elif name == "pcgrad":
        assert weights.min() >= 1.0 and weights.max() > 1.1  # projections add to the ones
    else:  # tensioner before its window fills: the bisector, a convex combination
        assert weights.min() >= 0 and float(weights.sum()) == pytest.approx(1.0)
    assert torch.equal(weighting.log["weights"], weights)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_a_list_of_losses_equals_the_stacked_tensor(name):
    grads = []
    for as_list in (False, True):
        model = Logic(hidden=3, seed=2)
        weighting = build_weighting(name, num_tasks=2)
        weighting.backward(model.losses(stacked=not as_list), list(model.encoder.parameters()))
        grads.append([p.grad for p in model.parameters()])
    for stacked, listed in zip(*grads, strict=True):
        torch.testing.assert_close(listed, stacked)


def train_logic(name: str, device: str, steps: int = 4) -> list[Tensor]:
    """Parameters after a few steps of ``name`` on ``device`` (state buffers included)."""
    model = Logic(hidden=3, seed=5).to(device)
    options = {"window": 2} if name == "tensioner" else {}
    weighting = build_weighting(name, num_tasks=2, **options).to(device)
    optimizer = torch.optim.SGD([*model.parameters(), *weighting.parameters()], lr=0.1)
    for k in range(steps):
        optimizer.zero_grad()
        losses = model.losses()
        weighting.backward(losses, list(model.encoder.parameters()))
        optimizer.step()
        weighting.epoch_end(losses.detach() * (k + 1))
    return [p.detach().cpu() for p in [*model.parameters(), *weighting.parameters()]]


@pytest.mark.gpu
@pytest.mark.parametrize("name", LOSS_METHODS + GRADIENT_METHODS)
def test_cuda_matches_cpu(name):
    for on_cpu, on_gpu in zip(train_logic(name, "cpu"), train_logic(name, "cuda"), strict=True):
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_several_representations_with_a_skip_connection(name):
    """Heads read the last features and, by a skip, the first layer's: pass both."""
    torch.manual_seed(3)
    layer1, layer2 = nn.Linear(2, 3), nn.Linear(3, 3)
    heads = [nn.Linear(6, 1) for _ in range(2)]
    z1 = torch.tanh(layer1(X_LOGIC))  # [4, 3]
    z2 = torch.tanh(layer2(z1))  # [4, 3]
    feats = torch.cat([z2, z1], dim=1)  # [4, 6]
    losses = [
        F.binary_cross_entropy_with_logits(h(feats).squeeze(1), y)
        for h, y in zip(heads, Y_LOGIC, strict=True)
    ]
    shared = [*layer1.parameters(), *layer2.parameters()]
    per_task = [torch.autograd.grad(loss, shared, retain_graph=True) for loss in losses]
    weighting = build_weighting(name, num_tasks=2)
    weights = weighting.backward(losses, shared, representation=[z2, z1])
    for i, p in enumerate(shared):
        expected = weights[0] * per_task[0][i] + weights[1] * per_task[1][i]
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)


def test_representation_must_carry_its_graph():
    model = Logic()
    z = model.encoder(X_LOGIC).detach().requires_grad_()
    with pytest.raises(
        ValueError, match=r"representation must be the shared encoder's output\(s\)"
    ):
        build_weighting("mgda_ub", num_tasks=2).backward(
            model.losses(z), list(model.encoder.parameters()), representation=z
        )
