"""Pareto hypernetworks: generated parameters, PHN-BN selection, EPO weights, toy fronts."""

from __future__ import annotations

import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from dymu.errors import UserError
from dymu.pareto.epo import EPOSolver, epo_adjustments, linear_weights, task_gradients
from dymu.pareto.phn import ParetoHypernet, check_ray, norm_affine_names, phn_bn, train_phn


class TwoHeads(nn.Module):
    """A small multi-task net with BatchNorm (buffers) and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 6)
        self.heads = nn.ModuleDict({"a": nn.Linear(6, 3), "b": nn.Linear(6, 2)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))  # [B, 4, H, W] -> [B, 4]
        z = torch.relu(self.fc(z))
        return {k: head(z) for k, head in self.heads.items()}


class Norms(nn.Module):
    """Every kind of normalisation layer, with and without affine parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.bn_plain = nn.BatchNorm2d(4, affine=False)
        self.inorm = nn.InstanceNorm2d(4, affine=True)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.ln_plain = nn.LayerNorm(4, elementwise_affine=False)
        self.rms = nn.RMSNorm(4)
        self.fc = nn.Linear(4, 2)


def _perturb(model: ParetoHypernet, seed: int = 0) -> None:
    """Give the zero-initialised output layer random values, so offsets depend on the ray."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(0.05 * torch.randn(model.head.weight.shape, generator=g))
        model.head.bias.copy_(0.05 * torch.randn(model.head.bias.shape, generator=g))


def _loss_fn(out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ce = nn.functional.cross_entropy
    return torch.stack([ce(out["a"], batch["a"]), ce(out["b"], batch["b"])])


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randn(6, 1, 6, 6, generator=g),
        "a": torch.randint(0, 3, (6,), generator=g),
        "b": torch.randint(0, 2, (6,), generator=g),
    }


# --------------------------------------------------------------------------- the hypernet


def test_generated_parameters_are_the_selected_ones_in_shape_and_count():
    torch.manual_seed(0)
    target = TwoHeads()
    own = {n: p for n, p in target.named_parameters()}
    model = ParetoHypernet(target, num_tasks=2, select=["heads", "fc.weight"], chunk_size=10)
    expected = ["fc.weight", "heads.a.weight", "heads.a.bias", "heads.b.weight", "heads.b.bias"]
    assert list(model.names) == expected
    assert model.total == 24 + 18 + 3 + 12 + 2  # fc [6, 4], heads [3, 6] + 3 and [2, 6] + 2
    assert (model.num_chunks, model.chunk_size) == (6, 10)
    generated = model.generate(torch.tensor([0.4, 0.6]))
    assert list(generated) == expected
    assert all(generated[n].shape == own[n].shape for n in expected)
    assert model.offsets([0.4, 0.6]).shape == (59,)
    # Selected: frozen constants theta^0. Unselected: the target's own, still trained.
    assert all(not own[n].requires_grad for n in expected)
    shared = [n for n in own if n not in expected]
    assert shared == ["conv.weight", "conv.bias", "bn.weight", "bn.bias", "fc.bias"]
    assert all(own[n].requires_grad for n in shared)
    # A predicate selects the same way; None selects everything.
    by_rule = ParetoHypernet(TwoHeads(), num_tasks=2, select=lambda n, p: n.startswith("heads."))
    assert list(by_rule.names) == expected[1:]
    everything = ParetoHypernet(TwoHeads(), num_tasks=2)
    assert everything.total == sum(p.numel() for p in TwoHeads().parameters())
    assert everything.num_chunks == 1  # fewer values than chunk_size: PHN's unchunked head


def test_output_equals_the_target_with_the_generated_parameters_loaded_by_hand():
    torch.manual_seed(1)
    model = ParetoHypernet(TwoHeads(), num_tasks=2, select=["conv", "heads.b"], chunk_size=16)
    _perturb(model)
    ray = torch.tensor([0.7, 0.3])
    x = torch.randn(5, 1, 6, 6)
    by_hand = copy.deepcopy(model.target)
    state = by_hand.state_dict()
    with torch.no_grad():
        generated = model.generate(ray)
    assert not torch.equal(generated["conv.weight"], model.target.conv.weight)  # really moved
    state.update(generated)
    by_hand.load_state_dict(state)
    # Train mode: same outputs and the same BatchNorm running statistics afterwards.
    out, ref = model(x, ray), by_hand(x)
    for k in ("a", "b"):
        torch.testing.assert_close(out[k], ref[k])
    torch.testing.assert_close(model.target.bn.running_mean, by_hand.bn.running_mean)
    assert model.target.bn.num_batches_tracked.item() == 1
    assert not torch.equal(model.target.bn.running_mean, torch.zeros(4))
    model.eval()
    by_hand.eval()
    with torch.no_grad():
        out, ref = model(x, ray), by_hand(x)
        exported = model.materialize(ray)(x)
    for k in ("a", "b"):
        torch.testing.assert_close(out[k], ref[k])
        torch.testing.assert_close(exported[k], ref[k])
    # Another ray gives other parameters, hence other outputs.
    with torch.no_grad():
        other = model(x, torch.tensor([0.1, 0.9]))
    assert not torch.allclose(other["b"], out["b"])


def test_generated_parameters_start_at_the_target_initialisation_for_every_ray():
    torch.manual_seed(2)
    target = TwoHeads().eval()
    init = {n: p.detach().clone() for n, p in target.named_parameters()}
    x = torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        plain = target(x)
    model = ParetoHypernet(target, num_tasks=2, chunk_size=32).eval()
    for ray in ([1.0, 0.0], [0.5, 0.5], [0.03, 0.97]):
        generated = model.generate(torch.tensor(ray))
        for name, value in generated.items():
            assert torch.equal(value, init[name])  # exactly, not approximately
        with torch.no_grad():
            out = model(x, torch.tensor(ray))
        for k in plain:
            torch.testing.assert_close(out[k], plain[k], rtol=0, atol=0)


def test_gradients_reach_the_hypernet_and_the_shared_parameters_only():
    torch.manual_seed(3)
    model = ParetoHypernet(TwoHeads(), num_tasks=2, select=["heads"], chunk_size=8)
    batch = _batch()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Step 0: the output layer is zero, so only it (not the MLP behind it) gets gradient.
    losses = _loss_fn(model(batch["image"], torch.tensor([0.5, 0.5])), batch)
    losses.sum().backward()
    assert model.head.weight.grad.abs().sum() > 0
    assert all(p.grad.abs().sum() == 0 for p in model.mlp.parameters())
    torch.optim.Adam(trainable, lr=1e-2).step()
    model.zero_grad(set_to_none=True)
    losses = _loss_fn(model(batch["image"], torch.tensor([0.2, 0.8])), batch)
    losses.sum().backward()
    for p in model.hypernet_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    target = dict(model.target.named_parameters())
    assert all(target[n].grad is None for n in model.names)  # theta^0 stays constant
    assert target["conv.weight"].grad.abs().sum() > 0  # shared, trained normally


def test_phn_bn_selects_exactly_the_norm_affine_parameters():
    model = phn_bn(Norms(), num_tasks=3, chunk_size=5)
    expected = [
        "bn.weight",
        "bn.bias",
        "inorm.weight",
        "inorm.bias",
        "gn.weight",
        "gn.bias",
        "ln.weight",
        "ln.bias",
        "rms.weight",
    ]
    assert list(model.names) == expected
    assert norm_affine_names(Norms()) == expected
    assert model.total == 4 * 9
    assert model.num_chunks == math.ceil(36 / 5)
    with pytest.raises(UserError, match="no normalisation layer"):
        phn_bn(nn.Sequential(nn.Linear(2, 2)), num_tasks=2)


def test_bad_rays_and_selections_are_one_line_user_errors():
    assert torch.equal(check_ray([0.25, 0.75], 2), torch.tensor([0.25, 0.75]))
    for ray, message in [
        ([0.5, 0.25, 0.25], "2 weights"),
        ([[0.5, 0.5]], "2 weights"),
        ([float("nan"), 1.0], "finite"),
        ([-0.5, 1.5], ">= 0"),
        ([0.5, 0.6], "sum to 1"),
    ]:
        with pytest.raises(UserError, match=message):
            check_ray(ray, 2)
    model = ParetoHypernet(TwoHeads(), num_tasks=2, select="heads")
    with pytest.raises(UserError, match="sum to 1"):
        model(torch.zeros(1, 1, 6, 6), torch.tensor([0.2, 0.2]))
    with pytest.raises(UserError, match="'head'"):
        ParetoHypernet(TwoHeads(), num_tasks=2, select=["head"])
    with pytest.raises(UserError, match="picks no parameter"):
        ParetoHypernet(TwoHeads(), num_tasks=2, select=lambda n, p: False)
    with pytest.raises(UserError, match="chunk_size"):
        ParetoHypernet(TwoHeads(), num_tasks=2, chunk_size=0)


# --------------------------------------------------------------------------- scalarisations


def _gram_rows(gram: np.ndarray) -> torch.Tensor:
    """Gradient rows G [T, P] with G G^T = gram (Cholesky), in float64."""
    return torch.from_numpy(np.linalg.cholesky(gram))


def test_linear_weights_are_the_ray():
    ray = torch.tensor([0.2, 0.8], requires_grad=True)
    w = linear_weights(ray)
    assert torch.equal(w, ray.detach()) and not w.requires_grad


def test_epo_on_the_ray_is_pure_descent_hand_derived():
    # r = (1/4, 3/4), L = (3, 1): r * L = (3/4, 3/4) is uniform, so mu = 0 and a = 0 (descent).
    solver = EPOSolver()
    losses, ray = torch.tensor([3.0, 1.0]), torch.tensor([0.25, 0.75])
    _, mu, a = epo_adjustments(losses.double().numpy(), ray.double().numpy())
    assert mu == pytest.approx(0.0, abs=1e-12) and np.allclose(a, 0.0)
    # Conflicting gradients, C = [[4, -3], [-3, 9]]: maximise 1^T C alpha = 1 + 5 alpha_2
    # subject to C alpha >= 0, i.e. 4 alpha_1 >= 3 alpha_2 and 9 alpha_2 >= 3 alpha_1:
    # the vertex alpha = (3/7, 4/7), w = 2 alpha = (6/7, 8/7).
    grads = _gram_rows(np.array([[4.0, -3.0], [-3.0, 9.0]]))
    w = solver.weights(losses, grads, ray)
    assert solver.last_move == "descent"
    torch.testing.assert_close(w, torch.tensor([6 / 7, 8 / 7]), rtol=0, atol=1e-6)
    d = grads.T @ w.double()  # the update direction: no task ascends, task 1 stays put
    assert (grads @ d).min() >= -1e-5 and abs(float(grads[0] @ d)) < 1e-5
    # Orthogonal gradients, C = diag(4, 1): 1^T C alpha = 4 alpha_1 + alpha_2 -> alpha = (1, 0).
    w = solver.weights(losses, _gram_rows(np.diag([4.0, 1.0])), ray)
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0]), rtol=0, atol=1e-6)


def test_epo_off_the_ray_balances_hand_derived():
    solver = EPOSolver()
    ray = torch.tensor([0.5, 0.5])
    # L = (2, 1): lhat = (2/3, 1/3), mu = 2/3 log(4/3) + 1/3 log(2/3),
    # a = 0.5 (log(2 lhat) - mu) = (+0.1155, -0.2310). With C = I, Ca = a: task 1 (the worse
    # one, J*) must not ascend, task 2 only as far as Ca_2; max alpha.Ca -> alpha = (1, 0).
    _, mu, a = epo_adjustments(np.array([2.0, 1.0]), ray.double().numpy())
    assert mu == pytest.approx(2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3))
    np.testing.assert_allclose(a, 0.5 * (np.log([4 / 3, 2 / 3]) - mu))
    w = solver.weights(torch.tensor([2.0, 1.0]), _gram_rows(np.eye(2)), ray)
    assert solver.last_move == "balance"
    torch.testing.assert_close(w, torch.tensor([2.0, 0.0]), rtol=0, atol=1e-6)
    # L = (1, 2), C = [[1, .8], [.8, 1]]: Ca = (a_1 + .8 a_2, .8 a_1 + a_2) < 0 both, so all
    # constraints are C alpha >= 0 (always true here) and alpha.Ca is largest at (0, 1).
    w = solver.weights(
        torch.tensor([1.0, 2.0]), _gram_rows(np.array([[1.0, 0.8], [0.8, 1.0]])), ray
    )
    torch.testing.assert_close(w, torch.tensor([0.0, 2.0]), rtol=0, atol=1e-6)


def _brute_force_epo(losses, gram, ray, eps=1e-4, grid=20001):
    """EPO's LP for T = 2 solved by scanning alpha_1 on a grid (no LP solver).

    Returns (best objective or None when nothing is feasible, balancing?, Ca).
    """
    rl, mu, a = epo_adjustments(losses, ray)
    ca = gram @ a
    alphas = np.stack([np.linspace(0, 1, grid), 1 - np.linspace(0, 1, grid)], axis=1)  # [K, 2]
    c_alpha = alphas @ gram  # [K, 2] (C symmetric)
    if mu > eps:  # balance
        rhs = np.zeros(2)
        if np.any(ca > 0):
            rhs = np.where(ca > 0, -np.inf, ca)
            rhs[rl == rl.max()] = 0.0
        feasible = np.all(c_alpha >= rhs - 1e-12, axis=1)
        objective = alphas @ ca
    else:  # descent
        feasible = np.all(c_alpha >= -1e-12, axis=1) & (alphas @ ca >= min(ca.max(), 0) - 1e-12)
        objective = c_alpha.sum(axis=1)
    best = objective[feasible].max() if feasible.any() else None
    return best, mu > eps, ca


def test_epo_lp_matches_a_brute_force_scan_on_random_two_task_problems():
    rng = np.random.default_rng(0)
    solver = EPOSolver()
    checked = 0
    for _ in range(40):
        g = rng.normal(size=(2, 5))
        gram = g @ g.T
        losses = rng.uniform(0.1, 3.0, size=2)
        ray = rng.dirichlet([1.0, 1.0])
        if rng.random() < 0.3:  # some problems exactly on the ray (descent)
            losses = 1.0 / ray
        best, balancing, ca = _brute_force_epo(losses, gram, ray)
        alpha = solver.alpha(losses, gram, ray)
        if best is None:
            assert solver.last_move == "fallback"
            continue
        assert solver.last_move == ("balance" if balancing else "descent")
        value = alpha @ ca if balancing else (gram @ alpha).sum()
        assert value >= best - 1e-6  # the LP optimum is at least the grid's best
        assert value <= best + 1e-3 * (1 + abs(best))  # and the grid gets close to it
        checked += 1
    assert checked >= 30


def test_task_gradients_are_the_per_task_autograd_gradients():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    unused = torch.zeros(3, requires_grad=True)
    losses = torch.stack([(w**2).sum(), 3 * w[0]])
    g = task_gradients(losses, [w, unused])
    torch.testing.assert_close(g, torch.tensor([[2.0, -4.0, 0, 0, 0], [3.0, 0, 0, 0, 0]]))


# --------------------------------------------------------------------------- training


class Point(nn.Module):
    """A 'network' that is just a point theta in R^2 (the input is ignored)."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.theta


A, B = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def _quadratics(theta: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Two quadratics with conflicting minima A and B: L_t = ||theta - m_t||^2."""
    return torch.stack([((theta - A) ** 2).sum(), ((theta - B) ** 2).sum()])


@pytest.mark.parametrize("solver", ["linear", "epo"])
def test_training_on_two_conflicting_quadratics_orders_solutions_as_the_rays_ask(solver):
    torch.manual_seed(0)
    model = ParetoHypernet(Point(), num_tasks=2, hidden=32, chunk_embedding=4)
    history = train_phn(
        model, itertools.repeat(torch.zeros(1)), _quadratics, steps=600, lr=1e-2, solver=solver
    )
    assert len(history["losses"]) == 600 and history["total_s"] > 0
    if solver == "epo":
        assert sum(history["epo_moves"].values()) == 600
    rays = [0.9, 0.7, 0.5, 0.3, 0.1]  # weight on task 1, decreasing
    with torch.no_grad():
        front = [_quadratics(model(None, torch.tensor([r, 1 - r])), None) for r in rays]
    l1 = [float(f[0]) for f in front]
    l2 = [float(f[1]) for f in front]
    assert l1 == sorted(l1) and l2 == sorted(l2, reverse=True)  # less weight -> higher loss
    assert l1[0] < 0.25 < l1[-1] and l2[-1] < 0.25 < l2[0]
    for r in rays:  # every solution lies near the Pareto set
        theta = model.generate(torch.tensor([r, 1 - r]))["theta"].detach()
        assert abs(float(theta.sum()) - 1.0) < 0.1, (r, theta)  # the segment from A to B
        if solver == "linear":  # argmin r L_1 + (1 - r) L_2 = r A + (1 - r) B
            torch.testing.assert_close(theta, r * A + (1 - r) * B, rtol=0, atol=0.05)
        else:  # the EPO point: r L_1 = (1 - r) L_2, i.e. s = sqrt(1-r) / (sqrt(r) + sqrt(1-r)).
            # EPO's balancing steps are bang-bang (w = (2, 0) or (0, 2)) and one hypernet
            # serves every ray, so it lands less precisely than LS (0.08 here).
            s = math.sqrt(1 - r) / (math.sqrt(r) + math.sqrt(1 - r))
            torch.testing.assert_close(theta, A + s * (B - A), rtol=0, atol=0.12)


def test_train_phn_with_dict_outputs_batchnorm_and_a_reiterated_loader():
    torch.manual_seed(4)
    model = ParetoHypernet(TwoHeads(), num_tasks=2, select=["heads", "bn"], chunk_size=16)
    loader = [_batch(0), _batch(1)]  # re-iterated: 5 steps = 2.5 epochs
    seen = []
    history = train_phn(
        model, loader, _loss_fn, steps=5, solver="epo", seed=3, on_step=lambda i, r: seen.append(i)
    )
    assert seen == list(range(5))
    assert np.array(history["rays"]).shape == (5, 2)
    np.testing.assert_allclose(np.array(history["rays"]).sum(axis=1), 1.0, atol=1e-6)
    assert np.allclose(np.array(history["weights"]).sum(axis=1), 2.0, atol=1e-5)  # T * alpha
    assert model.target.bn.num_batches_tracked.item() == 5
    again = train_phn(
        ParetoHypernet(TwoHeads(), num_tasks=2, select=["heads"]), loader, _loss_fn, steps=2, seed=3
    )
    assert again["rays"] == history["rays"][:2]  # rays depend on the seed only


def test_an_epo_step_equals_a_manual_step_on_the_weighted_loss():
    torch.manual_seed(5)
    model = ParetoHypernet(TwoHeads(), num_tasks=2, select=["heads", "conv"], chunk_size=16)
    _perturb(model)
    manual = copy.deepcopy(model)
    batch = _batch(2)
    history = train_phn(model, [batch], _loss_fn, steps=1, lr=1e-2, solver="epo", seed=7)
    # By hand: the same ray, EPO weights from the task gradients, backward of sum w L, Adam.
    ray = torch.tensor(history["rays"][0])
    params = [p for p in manual.parameters() if p.requires_grad]
    losses = _loss_fn(manual(batch["image"], ray), batch)
    solver = EPOSolver()
    w = solver.weights(losses, task_gradients(losses, params), ray)
    losses = _loss_fn(manual(batch["image"], ray), batch)  # a fresh graph for the backward
    optimizer = torch.optim.Adam(params, lr=1e-2)
    (w * losses).sum().backward()
    optimizer.step()
    torch.testing.assert_close(torch.tensor(history["weights"][0]), w)
    for (name, a), b in zip(model.named_parameters(), manual.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_train_phn_rejects_bad_arguments_in_one_line():
    model = ParetoHypernet(TwoHeads(), num_tasks=2, select="heads")
    batch = _batch()
    with pytest.raises(UserError, match="choose one of: linear, epo"):
        train_phn(model, [batch], _loss_fn, steps=1, solver="pcgrad")
    with pytest.raises(UserError, match=r"tensor \[2\]"):
        train_phn(model, [batch], lambda out, b: _loss_fn(out, b).sum(), steps=1)
    with pytest.raises(UserError, match="ran out after 1 of 3"):
        train_phn(model, iter([batch]), _loss_fn, steps=3)
    with pytest.raises(UserError, match="'image'"):
        train_phn(model, [{"x": batch["image"]}], _loss_fn, steps=1)
    with pytest.raises(UserError, match="alpha"):
        train_phn(model, [batch], _loss_fn, steps=1, alpha=0.0)
