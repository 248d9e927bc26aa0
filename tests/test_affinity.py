"""Affinity estimators against numpy and hand-computed values; the record and its PNG."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dymu.affinity import (
    AffinityResult,
    RunningMean,
    affinity_png,
    gradient_cosine,
    load,
    lookahead_affinity,
    normalise_rows,
    rsa,
    rsa_layer,
    similarity_matrix,
    virtual_step_losses,
)
from dymu.errors import UserError

R2 = 1 / math.sqrt(2)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- RSA -----------------------------------------------------------------------------------


def test_similarity_matrix_is_numpy_corrcoef():
    x = torch.randn(7, 3, 2, 2, generator=_gen())
    s = similarity_matrix(x)
    assert s.dtype == torch.float64 and s.shape == (7, 7)
    np.testing.assert_allclose(s.numpy(), np.corrcoef(x.reshape(7, -1).numpy()), atol=1e-6)
    # float64 input: agreement to float64 precision
    x64 = x.double()
    np.testing.assert_allclose(
        similarity_matrix(x64).numpy(), np.corrcoef(x64.reshape(7, -1).numpy()), atol=1e-12
    )


def test_constant_image_correlates_zero_not_nan():
    x = torch.randn(4, 10, generator=_gen(), dtype=torch.float64)
    x[2] = 0.1  # constant: a centring residue must not turn into a direction
    s = similarity_matrix(x)
    assert torch.isfinite(s).all()
    assert (s[2] == 0).all() and (s[:, 2] == 0).all()
    keep = [0, 1, 3]
    np.testing.assert_allclose(s[keep][:, keep].numpy(), np.corrcoef(x[keep].numpy()), atol=1e-12)


def test_identical_streams_give_all_ones():
    layers = [torch.randn(12, 4, 3, 3, generator=_gen(li)) for li in range(3)]
    per_layer, mean = rsa([[f.clone() for _ in range(4)] for f in layers])
    assert per_layer.shape == (3, 4, 4) and mean.shape == (4, 4)
    assert torch.equal(mean, torch.ones(4, 4, dtype=torch.float64))
    assert torch.equal(per_layer, torch.ones(3, 4, 4, dtype=torch.float64))


def test_row_normalisation_by_hand():
    # K = 1 "similarity matrices" 0, 3, 4: D = |a - b| = [[0, 3, 4], [3, 0, 1], [4, 1, 0]]
    sims = torch.tensor([0.0, 3.0, 4.0]).reshape(3, 1, 1)
    expected = 1 - torch.tensor(
        [[0, 3 / 4, 4 / 4], [3 / 3, 0, 1 / 3], [4 / 4, 1 / 4, 0]], dtype=torch.float64
    )
    torch.testing.assert_close(rsa_layer(sims), expected, rtol=0, atol=1e-15)
    assert not torch.equal(expected, expected.T)  # row normalisation: not symmetric
    d = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    assert torch.equal(normalise_rows(d), torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


def test_frobenius_distance_on_full_matrices():
    a = torch.eye(2, dtype=torch.float64)
    sims = torch.stack([a, a + 1.0, a + 2.0])  # ||S_0 - S_1|| = 2, ||S_0 - S_2|| = 4, ...
    expected = torch.tensor([[1, 0.5, 0], [0, 1, 0], [0, 0.5, 1]], dtype=torch.float64)
    torch.testing.assert_close(rsa_layer(sims), expected, rtol=0, atol=1e-15)


def test_permuting_tasks_permutes_the_matrix():
    feats = [[torch.randn(10, 6, generator=_gen(10 * li + i)) for i in range(4)] for li in range(2)]
    per_layer, mean = rsa(feats)
    p = [2, 0, 3, 1]
    per_layer_p, mean_p = rsa([[layer[i] for i in p] for layer in feats])
    torch.testing.assert_close(mean_p, mean[p][:, p], rtol=0, atol=1e-12)
    torch.testing.assert_close(per_layer_p, per_layer[:, p][:, :, p], rtol=0, atol=1e-12)


def test_more_noise_means_less_affinity():
    g = _gen(3)
    base = torch.randn(40, 8, 4, 4, generator=g)
    noise = (0.0, 0.3, 0.8, 2.0)
    feats = [[base + s * torch.randn(base.shape, generator=g) for s in noise] for _ in range(2)]
    _, a = rsa(feats)
    assert a[0, 1] > a[0, 2] > a[0, 3] == 0.0
    assert torch.equal(a.diagonal(), torch.ones(4, dtype=torch.float64))
    assert ((a >= 0) & (a <= 1)).all()


def test_rsa_rejects_inconsistent_input():
    f = torch.randn(5, 3)
    with pytest.raises(ValueError, match="streams"):
        rsa([[f, f], [f]])
    with pytest.raises(ValueError, match="K=5"):
        rsa([[f, f], [f, torch.randn(6, 3)]])
    with pytest.raises(ValueError, match="NaN"):
        similarity_matrix(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError):
        rsa([])


# --- gradients -----------------------------------------------------------------------------


def test_gradient_cosine_by_hand():
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [-2.0, 0.0]])
    expected = torch.tensor(
        [[1, R2, 0, -1], [R2, 1, 0, -R2], [0, 0, 0, 0], [-1, -R2, 0, 1]], dtype=torch.float64
    )
    torch.testing.assert_close(gradient_cosine(grads), expected, rtol=0, atol=1e-15)


def test_lookahead_by_hand():
    before = torch.tensor([2.0, 4.0])
    after = torch.tensor([[1.0, 5.0], [3.0, 2.0]])
    # Z[i, j] = (1 - after[i, j] / before[j]) / lr with lr = 0.5
    expected = torch.tensor([[1.0, -0.5], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(lookahead_affinity(before, after, 0.5), expected)
    z = lookahead_affinity(torch.tensor([2.0, 0.0]), after, 0.5)  # a solved task: column 0
    assert torch.equal(z[:, 1], torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="lr"):
        lookahead_affinity(before, after, 0.0)
    with pytest.raises(ValueError, match=r"loss_before must be \[N\]"):
        lookahead_affinity(before, after[:1], 0.5)


def _quadratic_losses(values: list[torch.Tensor]) -> torch.Tensor:
    """L_0 = ||w - (3, 2)||^2 + b^2, L_1 = ||w - (1, 0)||^2 (b unused by task 1)."""
    w, b = values
    l0 = ((w - torch.tensor([3.0, 2.0])) ** 2).sum() + b**2
    l1 = ((w - torch.tensor([1.0, 0.0])) ** 2).sum()
    return torch.stack([l0, l1])


def test_virtual_step_losses_on_a_quadratic():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor(0.5, requires_grad=True)
    params = [w, b]
    losses = _quadratic_losses(params)  # before: [4 + 0.25, 4]
    task_grads = [
        list(torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True))
        for i in range(2)
    ]
    # g_0 = (2(w - (3, 2)), 2b) = ((-4, 0), 1); g_1 = ((0, 4), 0)
    assert task_grads[1][1].item() == 0.0
    task_grads[1][1] = None  # what autograd gives for a parameter a task does not reach
    versions = [p._version for p in params]
    after = virtual_step_losses(params, task_grads, _quadratic_losses, lr=0.25)
    # row 0: w = (2, 2), b = 0.25 -> L_0 = 1 + 0.0625, L_1 = 1 + 4
    # row 1: w = (1, 1), b = 0.5  -> L_0 = 4 + 1 + 0.25, L_1 = 1
    expected = torch.tensor([[1.0625, 5.0], [5.25, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(after, expected)
    assert torch.equal(w, torch.tensor([1.0, 2.0])) and b.item() == 0.5
    assert [p._version for p in params] == versions and w.grad is None
    z = lookahead_affinity(losses.detach(), after, 0.25)
    torch.testing.assert_close(
        z, torch.tensor([[4 * (1 - 1.0625 / 4.25), -1.0], [4 * (1 - 5.25 / 4.25), 3.0]]).double()
    )


def test_virtual_step_losses_checks_shapes():
    w = torch.zeros(2)
    with pytest.raises(ValueError, match="shape"):
        virtual_step_losses([w], [[torch.zeros(3)]], lambda v: v[0][:1], lr=0.1)
    with pytest.raises(ValueError, match="one loss per task"):
        virtual_step_losses([w], [[torch.zeros(2)], [None]], lambda v: v[0].sum(), lr=0.1)


def test_running_mean():
    avg = RunningMean()
    with pytest.raises(ValueError):
        avg.value()
    avg.update(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    avg.update(torch.tensor([[3.0, 0.0], [1.0, 0.0]]))
    assert avg.count == 2
    assert torch.equal(avg.value(), torch.tensor([[2.0, 1.0], [2.0, 2.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="shape"):
        avg.update(torch.zeros(3, 3))


# --- the record and its picture --------------------------------------------------------------

TASKS = ["semseg", "depth", "normals"]


def _result(method: str = "rsa", layers: int = 2) -> AffinityResult:
    feats = [[torch.randn(8, 5, generator=_gen(10 * li + i)) for i in range(3)] for li in range(2)]
    per_layer, mean = rsa(feats)
    if method != "rsa":
        return AffinityResult.from_tensors(TASKS, method, mean * 3 - 1, None, {"batches": 4})
    return AffinityResult.from_tensors(TASKS, method, mean, per_layer[:layers], {"images": 8})


def test_result_round_trip(tmp_path):
    result = _result()
    path = result.save(tmp_path / "affinity.json")
    obj = json.loads(path.read_text())
    assert list(obj) == ["tasks", "method", "mean", "per_layer", "meta"]
    assert obj["tasks"] == TASKS and obj["method"] == "rsa" and obj["meta"] == {"images": 8}
    assert np.asarray(obj["per_layer"]).shape == (2, 3, 3)
    back = load(path)
    assert back == result == AffinityResult.load(path)
    torch.testing.assert_close(back.mean_tensor(), torch.tensor(result.mean, dtype=torch.float64))
    assert back.per_layer_tensor().shape == (2, 3, 3)
    assert [p.name for p in tmp_path.iterdir()] == ["affinity.json"]  # no temporary left


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda o: o.pop("mean"), "missing mean"),
        (lambda o: o.update(extra=1), "unknown extra"),
        (lambda o: o.update(method="cka"), "unknown method 'cka'"),
        (lambda o: o.update(tasks=["a", "a", "b"]), "duplicate"),
        (lambda o: o.update(tasks=["a", "b"]), "mean must be a list of 2 rows"),
        (lambda o: o["mean"][1].pop(), "mean row 1"),
        (lambda o: o["per_layer"][1].pop(), r"per_layer\[1\]"),
        (lambda o: o["mean"][0].__setitem__(0, "x"), "not a finite number"),
        (lambda o: o["mean"][0].__setitem__(0, float("nan")), "not a finite number"),
        (lambda o: o.update(meta=[]), "meta"),
    ],
)
def test_load_rejects_malformed_records(tmp_path, change, message):
    obj = _result().to_json()
    change(obj)
    path = tmp_path / "affinity.json"
    path.write_text(json.dumps(obj))
    with pytest.raises(UserError, match=message) as info:
        load(path)
    assert str(path) in str(info.value)


def test_load_names_missing_and_broken_files(tmp_path):
    with pytest.raises(UserError, match="not found") as info:
        load(tmp_path / "nope.json")
    assert "nope.json" in str(info.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=r"bad\.json: not valid JSON"):
        load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match=r"bad\.json: expected a JSON object"):
        load(bad)


@pytest.mark.parametrize(("method", "layers"), [("rsa", 2), ("lookahead", 0)])
def test_png_is_written(tmp_path, method, layers):
    out = affinity_png(_result(method, layers), tmp_path / "sub" / "affinity.png")
    assert out == tmp_path / "sub" / "affinity.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["affinity.png"]
