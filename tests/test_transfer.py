"""ParetoSet, the transfer matrix and the multi-task-optimisation trainer (METHOD.md 3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dymu.errors import UserError
from dymu.evaluate.metrics import hypervolume
from dymu.pareto.stacked import ParetoSet
from dymu.pareto.transfer import (
    evaluate_losses,
    pareto_step,
    time_to_fraction,
    train_pareto_set,
    transfer_,
    transfer_matrix,
)

PREFS = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])


class TwoHeadNet(nn.Module):
    """Conv + BatchNorm trunk and two classification heads: a dict task -> logits."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten()
        )  # [B, 1, 8, 8] -> [B, 4 * 6 * 6]
        self.left = nn.Linear(144, 3)
        self.right = nn.Linear(144, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(x)
        return {"left": self.left(h), "right": self.right(h)}


def two_task_loss(out: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([F.cross_entropy(out[t], y[t]) for t in ("left", "right")])  # [T]


def data(seed: int = 0, batch: int = 6) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    y = {t: torch.randint(0, 3, (batch,), generator=g) for t in ("left", "right")}
    return x, y


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


# --------------------------------------------------------------------------- transfer matrix


def test_transfer_matrix_hand_values() -> None:
    # cos([1,0],[1,1]) = 1/sqrt2 =: c, weight 2c/(1+c); cos([1,0],[0,1]) = 0.
    w = 2 * (1 / math.sqrt(2)) / (1 + 1 / math.sqrt(2))
    m = transfer_matrix([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], neighbours=1, strength=0.5)
    # Row 1 has two equally similar neighbours: the lower index (0) wins.
    expected = torch.tensor(
        [[1 - 0.5 * w, 0.5 * w, 0.0], [0.5 * w, 1 - 0.5 * w, 0.0], [0.0, 0.5 * w, 1 - 0.5 * w]],
        dtype=torch.float64,
    )
    torch.testing.assert_close(m, expected, atol=1e-12, rtol=0)


def test_transfer_matrix_row_stochastic_and_zero_outside_neighbours() -> None:
    prefs = np.random.default_rng(0).dirichlet(np.ones(3), size=7)  # [K=7, T=3]
    m = transfer_matrix(prefs, neighbours=2, strength=0.3)
    torch.testing.assert_close(m.sum(dim=1), torch.ones(7, dtype=torch.float64))
    assert (m >= 0).all()
    assert (m.diagonal() >= 0.7 - 1e-12).all()
    unit = prefs / np.linalg.norm(prefs, axis=1, keepdims=True)
    cos = unit @ unit.T
    for k in range(7):
        others = [j for j in range(7) if j != k]
        nearest = sorted(others, key=lambda j: -cos[k, j])[:2]
        outside = [j for j in others if j not in nearest]
        assert (m[k, outside] == 0).all()
        assert (m[k, nearest] > 0).all()


def test_transfer_matrix_identity_without_transfer() -> None:
    eye = torch.eye(3, dtype=torch.float64)
    assert torch.equal(transfer_matrix(PREFS, neighbours=2, strength=0.0), eye)
    assert torch.equal(transfer_matrix(PREFS, neighbours=0, strength=0.7), eye)


@pytest.mark.parametrize(
    ("prefs", "neighbours", "strength", "message"),
    [
        (PREFS, 3, 0.1, "neighbours"),
        (PREFS, 1, 1.5, "strength"),
        ([[1.0, -0.1], [0.5, 0.5]], 1, 0.1, ">= 0"),
        ([[0.0, 0.0], [0.5, 0.5]], 1, 0.1, "all zeros"),
        ([1.0, 0.0], 0, 0.1, "2-D"),
    ],
)
def test_transfer_matrix_bad_input(prefs, neighbours, strength, message) -> None:
    with pytest.raises(UserError, match=message):
        transfer_matrix(prefs, neighbours=neighbours, strength=strength)


def test_transfer_mixes_parameters_and_float_buffers() -> None:
    torch.manual_seed(0)
    pset = ParetoSet(TwoHeadNet(), 3, init="seeded")
    pset(data()[0])  # train-mode forward: distinct running statistics per model
    before = {name: t.detach().clone() for name, t in pset.stacked_tensors()}
    m = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.6, 0.2], [0.0, 0.0, 1.0]])
    transfer_(pset, m)
    for name, value in pset.stacked_tensors():
        if value.is_floating_point():
            old = before[name]
            expected = torch.stack([sum(m[k, j] * old[j] for j in range(3)) for k in range(3)])
            torch.testing.assert_close(value.detach(), expected, atol=1e-6, rtol=0)
        else:  # batch counters are not mixed
            assert torch.equal(value, before[name])
    with pytest.raises(UserError, match="sum to 1"):
        transfer_(pset, torch.full((3, 3), 0.5))


# --------------------------------------------------------------------------- ParetoSet


@pytest.mark.parametrize("execution", ["vmap", "loop"])
@pytest.mark.parametrize("training", [True, False])
def test_forward_equals_each_model_alone(training: bool, execution: str) -> None:
    torch.manual_seed(0)
    pset = ParetoSet(TwoHeadNet(), 3, init="seeded", execution=execution).train(training)
    if not training:  # give eval mode non-trivial running statistics first
        pset.train()
        pset(data(seed=1)[0])
        pset.eval()
    alone = [pset.model(k) for k in range(3)]
    x = data(seed=2)[0]
    out = pset(x)
    for k, model in enumerate(alone):
        ref = model(x)
        for task in ("left", "right"):
            torch.testing.assert_close(out[task][k], ref[task], atol=1e-6, rtol=0)
        # In training mode each model's running statistics moved as if it ran alone.
        assert_state_close(state(pset.model(k)), state(model))


@pytest.mark.parametrize("execution", ["vmap", "loop"])
def test_per_model_inputs(execution: str) -> None:
    torch.manual_seed(0)
    pset = ParetoSet(TwoHeadNet(), 2, init="seeded", execution=execution).eval()
    x = torch.randn(2, 4, 1, 8, 8)  # [K, B, 1, 8, 8]
    out = pset(x, per_model=True)
    for k in range(2):
        ref = pset.model(k)(x[k])
        torch.testing.assert_close(out["left"][k], ref["left"], atol=1e-6, rtol=0)


def test_init_same_and_seeded() -> None:
    torch.manual_seed(5)
    template = TwoHeadNet()
    same = ParetoSet(template, 3)
    for k in range(3):
        assert_state_close(state(same.model(k)), state(template), atol=0)
    seeded = ParetoSet(template, 3, init="seeded", seed=10)
    for k in range(3):
        torch.manual_seed(10 + k)  # the same draws as constructing the network afresh
        assert_state_close(state(seeded.model(k)), state(TwoHeadNet()), atol=0)
    assert not torch.equal(seeded.stacked.left.weight[0], seeded.stacked.left.weight[1])


def test_model_round_trip_and_parameters_are_stacked_leaves() -> None:
    torch.manual_seed(0)
    pset = ParetoSet(TwoHeadNet(), 4, init="seeded")
    params = list(pset.parameters())
    assert all(p.is_leaf and p.shape[0] == 4 for p in params)
    assert sum(p.numel() for p in params) == 4 * sum(p.numel() for p in TwoHeadNet().parameters())
    copy2 = pset.model(2)
    assert type(copy2) is TwoHeadNet and copy2.training
    for name, value in copy2.state_dict().items():
        assert torch.equal(value, pset.stacked.state_dict()[name][2])
    with torch.no_grad():
        copy2.left.weight.zero_()  # an independent copy: the set is untouched
    assert pset.stacked.left.weight[2].abs().sum() > 0
    with pytest.raises(UserError, match="k must be in"):
        pset.model(4)


def test_bad_templates() -> None:
    with pytest.raises(UserError, match="momentum=None"):
        ParetoSet(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, momentum=None)), 2)
    with pytest.raises(UserError, match="no parameters"):
        ParetoSet(nn.ReLU(), 2)
    with pytest.raises(UserError, match="init"):
        ParetoSet(nn.Linear(2, 2), 2, init="random")
    with pytest.raises(UserError, match="execution"):
        ParetoSet(nn.Linear(2, 2), 2, execution="threads")

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.s = nn.Parameter(torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.s

    with pytest.raises(UserError, match="reset_parameters"):
        ParetoSet(Scale(), 2, init="seeded")


# --------------------------------------------------------------------------- training steps


@pytest.mark.parametrize(
    ("vmap_loss", "execution"), [(False, "vmap"), (True, "vmap"), (True, "loop")]
)
def test_step_without_transfer_equals_separate_models(vmap_loss: bool, execution: str) -> None:
    torch.manual_seed(0)
    pset = ParetoSet(TwoHeadNet(), 3, init="seeded", execution=execution)
    alone = [pset.model(k) for k in range(3)]
    opt = torch.optim.SGD(pset.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3) for m in alone]
    for step in range(2):  # two steps, so the momentum buffers matter too
        x, y = data(seed=step)
        losses = pareto_step(
            pset,
            opt,
            x,
            y,
            preferences=PREFS,
            loss_fn=two_task_loss,
            matrix=torch.eye(3) if step else None,  # M = I and "no mix" are the same
            vmap_loss=vmap_loss,
        )
        for k, (model, o) in enumerate(zip(alone, opts, strict=True)):
            o.zero_grad()
            own = two_task_loss(model(x), y)
            torch.testing.assert_close(losses[k], own.detach(), atol=1e-6, rtol=0)
            (PREFS[k] * own).sum().backward()
            o.step()
    for k, model in enumerate(alone):
        assert_state_close(state(pset.model(k)), state(model))


def test_step_with_transfer_equals_hand_computation() -> None:
    # theta_k <- sum_j M[k, j] theta_j - lr * grad F_k(theta_k), gradient before the mix.
    k_models, lr = 3, 0.1
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 2))  # [B, D], [B, T]
    thetas = rng.normal(size=(k_models, 2, 3))  # [K, T, D]: model k's weight, one row per task
    prefs = np.array([[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]])
    m = np.array([[0.7, 0.3, 0.0], [0.1, 0.8, 0.1], [0.0, 0.4, 0.6]])

    template = nn.Linear(3, 2, bias=False)
    pset = ParetoSet(template, k_models)
    with torch.no_grad():
        pset.stacked.weight.copy_(torch.from_numpy(thetas))

    def mse_per_task(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (out - target).square().mean(dim=0)  # [B, T] -> [T]

    opt = torch.optim.SGD(pset.parameters(), lr=lr)
    pareto_step(
        pset,
        opt,
        torch.from_numpy(x).float(),
        torch.from_numpy(y).float(),
        preferences=torch.from_numpy(prefs).float(),
        loss_fn=mse_per_task,
        matrix=torch.from_numpy(m),
    )
    # L_t = mean_b (x_b . W_t - y_bt)^2, so dL_t/dW_t = (2 / B) sum_b (x_b . W_t - y_bt) x_b.
    expected = np.empty_like(thetas)
    for k in range(k_models):
        residual = x @ thetas[k].T - y  # [B, T]
        grad = prefs[k][:, None] * (2.0 / len(x)) * residual.T @ x  # [T, D]
        expected[k] = np.tensordot(m[k], thetas, axes=1) - lr * grad
    np.testing.assert_allclose(pset.stacked.weight.detach().numpy(), expected, atol=1e-6)


def test_train_scales_transfer_with_learning_rate() -> None:
    torch.manual_seed(0)
    template = TwoHeadNet()
    batches = [data(seed=s) for s in range(3)]
    eval_batches = [data(seed=10, batch=8)]

    def eval_fn(p: ParetoSet) -> np.ndarray:
        return evaluate_losses(p, eval_batches, two_task_loss)

    run = ParetoSet(template, 3)
    result = train_pareto_set(
        run,
        PREFS,
        batches,
        two_task_loss,
        epochs=2,
        lr=0.2,
        schedule="cosine",
        neighbours=1,
        strength=0.5,
        eval_fn=eval_fn,
        reference=[3.0, 3.0],
    )
    # The same steps by hand: M_t = I + (lr_t / lr_0) (M - I), cosine lr over 6 steps.
    manual = ParetoSet(template, 3)
    opt = torch.optim.SGD(manual.parameters(), lr=0.2)
    base = transfer_matrix(PREFS, neighbours=1, strength=0.5)
    eye = torch.eye(3, dtype=torch.float64)
    for step in range(6):
        factor = 0.5 * (1 + math.cos(math.pi * step / 6))
        opt.param_groups[0]["lr"] = 0.2 * factor
        x, y = batches[step % 3]
        matrix = eye + factor * (base - eye)
        pareto_step(manual, opt, x, y, preferences=PREFS, loss_fn=two_task_loss, matrix=matrix)
    for k in range(3):
        assert_state_close(state(run.model(k)), state(manual.model(k)), atol=1e-6)

    history = result["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[1]["elapsed_s"] <= history[2]["elapsed_s"]
    final = np.asarray(history[-1]["eval_losses"])
    np.testing.assert_allclose(final, eval_fn(run), atol=1e-6)
    assert result["final_hv"] == pytest.approx(hypervolume(final, np.array([3.0, 3.0])))
    torch.testing.assert_close(torch.tensor(result["matrix"], dtype=torch.float64), base)


def test_train_is_deterministic_and_independent_mode_has_no_matrix() -> None:
    torch.manual_seed(0)
    template = TwoHeadNet()
    batches = [data(seed=s) for s in range(2)]
    results = []
    for _ in range(2):
        pset = ParetoSet(template, 3, init="seeded")
        out = train_pareto_set(
            pset, PREFS, batches, two_task_loss, epochs=1, lr=0.1, transfer=False
        )
        results.append((out, state(pset)))
    assert results[0][0]["matrix"] is None and results[0][0]["final_hv"] is None
    assert (
        results[0][0]["history"][1]["train_losses"] == results[1][0]["history"][1]["train_losses"]
    )
    assert_state_close(results[0][1], results[1][1], atol=0)


def test_train_resumes_from_its_checkpoint(tmp_path, monkeypatch) -> None:
    """Stopped after epoch 1 and run again, the set ends exactly where one run ends."""
    import dymu.pareto.transfer as transfer_module
    import dymu.train.engine as engine

    torch.manual_seed(0)
    template = TwoHeadNet()
    batches = [data(seed=s) for s in range(2)]
    eval_batches = [data(seed=10, batch=8)]
    kwargs = dict(
        epochs=3,
        lr=0.1,
        optimizer="adam",
        schedule="cosine",
        eval_fn=lambda p: evaluate_losses(p, eval_batches, two_task_loss),
        reference=[3.0, 3.0],
    )
    whole = ParetoSet(template, 3)
    straight = train_pareto_set(whole, PREFS, batches, two_task_loss, **kwargs)

    ckpt = tmp_path / "set.pt"
    save = engine.save_checkpoint

    def save_then_stop(path, config_hash, step, *args, **extra):
        save(path, config_hash, step, *args, **extra)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_pareto_set(
            ParetoSet(template, 3),
            PREFS,
            batches,
            two_task_loss,
            checkpoint=ckpt,
            checkpoint_hash="h",
            **kwargs,
        )
    monkeypatch.setattr(engine, "save_checkpoint", save)
    steps = []
    step = transfer_module.pareto_step
    monkeypatch.setattr(
        transfer_module, "pareto_step", lambda *a, **k: steps.append(1) or step(*a, **k)
    )
    resumed = ParetoSet(template, 3)
    again = train_pareto_set(
        resumed, PREFS, batches, two_task_loss, checkpoint=ckpt, checkpoint_hash="h", **kwargs
    )
    assert_state_close(state(resumed), state(whole), atol=1e-6)
    assert len(steps) == 2 * len(batches)  # epochs 2 and 3 only
    assert [h["epoch"] for h in again["history"]] == [0, 1, 2, 3]
    np.testing.assert_allclose(
        [h["hv"] for h in again["history"]], [h["hv"] for h in straight["history"]], atol=1e-6
    )
    with pytest.raises(UserError, match="another config"):
        train_pareto_set(
            ParetoSet(template, 3),
            PREFS,
            batches,
            two_task_loss,
            checkpoint=ckpt,
            checkpoint_hash="other",
            **kwargs,
        )


def test_train_bad_input() -> None:
    pset = ParetoSet(nn.Linear(2, 2), 2)
    batches = [(torch.zeros(1, 2), torch.zeros(1, 2))]
    with pytest.raises(UserError, match="one row per model"):
        train_pareto_set(pset, PREFS, batches, lambda o, t: o.mean(0), epochs=1, lr=0.1)
    with pytest.raises(UserError, match="reference"):
        train_pareto_set(
            pset, PREFS[:2], batches, lambda o, t: o.mean(0), epochs=1, lr=0.1, eval_fn=len
        )
    with pytest.raises(UserError, match="unknown optimizer"):
        train_pareto_set(
            pset,
            PREFS[:2],
            batches,
            lambda o, t: o.mean(0),
            epochs=1,
            lr=0.1,
            optimizer="lbfgs",
            transfer=False,
        )
    with pytest.raises(UserError, match="neighbours must be in"):
        train_pareto_set(pset, PREFS[:2], batches, lambda o, t: o.mean(0), epochs=1, lr=0.1)


def test_evaluate_losses_weights_batches_by_size() -> None:
    pset = ParetoSet(nn.Linear(1, 2, bias=False), 2)
    with torch.no_grad():
        pset.stacked.weight.copy_(torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]]))  # [K, T, 1]

    def mean_output(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.mean(dim=0)  # [B, T] -> [T]

    batches = [(torch.tensor([[1.0]]), None), (torch.tensor([[2.0], [2.0], [3.0]]), None)]
    # Mean input over the 4 samples is 2.0, so model k's losses are 2 * its weights.
    np.testing.assert_allclose(
        evaluate_losses(pset, batches, mean_output), [[2.0, 4.0], [6.0, 8.0]], atol=1e-12
    )
    assert pset.training


# --------------------------------------------------------------------------- time to fraction


def test_time_to_fraction_hand_history() -> None:
    hvs = [0.0, 1.0, 2.5, 3.0, 2.9, 3.2]
    history = [{"epoch": e, "hv": hv, "elapsed_s": 10.0 * e} for e, hv in enumerate(hvs)]
    own = time_to_fraction(history, 0.9)  # threshold 0.9 * 3.2 = 2.88: first met at epoch 3
    assert (own["epoch"], own["elapsed_s"]) == (3, 30.0)
    assert own["threshold"] == pytest.approx(2.88)
    assert time_to_fraction(history, 0.75)["epoch"] == 2  # 2.4 <= 2.5
    never = time_to_fraction(history, 0.9, target=4.0)  # 3.6 is never reached
    assert never["epoch"] is None and never["elapsed_s"] is None
    with pytest.raises(UserError, match="fraction"):
        time_to_fraction(history, 1.5)
    with pytest.raises(UserError, match="'hv'"):
        time_to_fraction([{"epoch": 0, "hv": None, "elapsed_s": 0.0}])
