"""Stages 1 and 2 on a tiny anchor: they train, write their files, the budget term pulls
FLOPs down, and an interrupted run resumes to the same weights."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY as _TINY

import dymu.train.draws as draws
import dymu.train.stage0 as stage0
import dymu.train.stage1 as stage1
import dymu.train.stage2 as stage2
from dymu.config import load_config
from dymu.data import get_builder
from dymu.errors import UserError
from dymu.hypernet.edge import EdgeHypernet
from dymu.losses import expected_flops
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import anchor_flops, costs, min_flops
from dymu.train.curves import read_log
from dymu.train.stage1 import EDGE_JSON, EDGE_WEIGHTS, train_stage1
from dymu.train.stage2 import WEIGHT_WEIGHTS, train_stage2

TINY = [*_TINY, "stage1.steps=40", "stage1.lr=0.01", "stage2.steps=8", "stage1.lambda_budget=100"]


def _scales(anchor, val):
    """[N] w_i as dymu search computes them (dymu.train.scales)."""
    from dymu.train.scales import loss_scales

    return loss_scales(anchor, val, torch.device("cpu"))


def _expected_fraction(edge, space, r, b) -> float:
    """E[FLOPs] / anchor's of the hypernet's parent distribution (continuous: no argmax)."""
    flops, _, heads, _ = costs(space)
    flops = torch.tensor(flops, dtype=torch.float64)
    heads = torch.tensor(heads, dtype=torch.float64)
    with torch.no_grad():
        return (expected_flops(edge.alpha(r, b), flops, heads) / anchor_flops(space)).item()


def test_stage1_and_stage2_train_and_the_budget_pulls_flops_down(tmp_path):
    cfg = load_config(None, [*TINY, f"data.cache_dir={tmp_path / 'c'}", "stage1.objective=paper"])
    anchor, _ = stage0.train_stage0(cfg, tmp_path)
    space = anchor_space(anchor, (32, 32))
    builder = get_builder("synthscenes")
    train, val = builder.load(cfg.data, "train"), builder.load(cfg.data, "val")
    w = _scales(anchor, val)  # [N] loss scales
    edge, _ = train_stage1(cfg, tmp_path, anchor, space, torch.eye(3), train, w)
    assert (tmp_path / EDGE_WEIGHTS).is_file()
    saved = json.loads((tmp_path / EDGE_JSON).read_text())
    assert saved["steps"] == 40 and saved["tasks"] == ["semseg", "depth", "normals"]
    assert all(torch.isfinite(torch.tensor(v)) for v in saved["final"].values())
    state = load_file(str(tmp_path / EDGE_WEIGHTS))
    assert set(state) == set(edge.state_dict())

    low = min_flops(space) / anchor_flops(space)
    r = torch.full((3,), 1 / 3)
    torch.manual_seed(cfg.run.seed)  # the start train_stage1 draws
    start = EdgeHypernet(3, anchor.num_layers, self_bias=2.0, min_budget=low)
    before = _expected_fraction(start, space, r, low)
    assert _expected_fraction(edge, space, r, low) < before - 0.05  # the ceiling pulled down

    weights, record = train_stage2(cfg, tmp_path, anchor, space, edge, train, w)
    assert (tmp_path / WEIGHT_WEIGHTS).is_file() and record["steps"] == 8
    assert weights.out.weight.abs().sum() > 0  # it moved away from the zero start


def test_budget_objective_spends_the_budget(tmp_path):
    """From uniform parents (no bias to the anchor tree), the budget objective drives the
    expected FLOPs to the anchor's at b = 1 with the regulariser off, and to more at b = 1
    than at the cheapest tree's budget with it on; the paper's ceiling leaves b = 1 alone."""
    base = [
        *TINY,
        f"data.cache_dir={tmp_path / 'c'}",
        "stage1.self_bias=0.0",
        "stage1.lr=0.003",
        "stage1.lambda_budget=10",
    ]
    cfg = load_config(None, base)
    anchor, _ = stage0.train_stage0(cfg, tmp_path / "anchor")
    space = anchor_space(anchor, (32, 32))
    builder = get_builder("synthscenes")
    train, val = builder.load(cfg.data, "train"), builder.load(cfg.data, "val")
    w = _scales(anchor, val)  # [N] loss scales
    low = min_flops(space) / anchor_flops(space)
    r = torch.full((3,), 1 / 3)
    torch.manual_seed(cfg.run.seed)
    start = _expected_fraction(EdgeHypernet(3, anchor.num_layers, self_bias=0.0), space, r, 1.0)

    def fractions(*extra):
        c = load_config(None, [*base, *extra])
        edge, _ = train_stage1(c, tmp_path / "-".join(extra), anchor, space, torch.eye(3), train, w)
        return _expected_fraction(edge, space, r, 1.0), _expected_fraction(edge, space, r, low)

    off = ["stage1.lambda_active=0", "stage1.lambda_inactive=0", "stage1.full_budget_share=1"]
    full, _ = fractions(*off)
    assert full > 0.95 > start + 0.1  # uniform parents share; the target pulls up to b = 1
    paper, _ = fractions(*off, "stage1.objective=paper")
    assert paper < full - 0.1  # a ceiling alone does not spend the budget (measured 0.73)
    at_one, at_low = fractions()
    assert at_one > at_low + 0.03  # FLOPs rise with the budget (measured +0.05)


class _Interrupt(Exception):
    """Stands in for a killed process in the resume tests."""


def _interrupt_after(monkeypatch, module, name: str, calls: int) -> None:
    """Make ``module.name`` raise on its ``calls + 1``-th call (an interrupted run)."""
    real, count = getattr(module, name), [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise _Interrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


@pytest.fixture(scope="module")
def tiny_anchor(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s12")
    cfg = load_config(None, [*TINY, f"data.cache_dir={tmp / 'c'}", "stage1.steps=25"])
    anchor, _ = stage0.train_stage0(cfg, tmp / "anchor")
    builder = get_builder("synthscenes")
    splits = builder.load(cfg.data, "train"), builder.load(cfg.data, "val")
    return cfg, anchor, anchor_space(anchor, (32, 32)), splits


def test_resumed_stages_1_and_2_equal_uninterrupted_runs(tiny_anchor, tmp_path, monkeypatch):
    cfg, anchor, space, (train, val) = tiny_anchor
    w = _scales(anchor, val)  # [N] loss scales
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, checkpoint_every=3))
    A = torch.eye(3)
    whole, _ = stage1.train_stage1(cfg, tmp_path / "a", anchor, space, A, train, w)
    whole2, record2 = stage2.train_stage2(cfg, tmp_path / "a", anchor, space, whole, train, w)

    run = tmp_path / "b"
    with monkeypatch.context() as m:
        _interrupt_after(m, draws, "sample_parents", 17)  # dies in step 18 of 25
        with pytest.raises(_Interrupt):
            stage1.train_stage1(cfg, run, anchor, space, A, train, w)
    assert (run / stage1.CHECKPOINT).is_file() and not (run / EDGE_WEIGHTS).exists()
    resumed, _ = stage1.train_stage1(cfg, run, anchor, space, A, train, w, resume=True)
    assert not (run / stage1.CHECKPOINT).exists()  # removed once the weights are written
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=1e-6)

    with monkeypatch.context() as m:
        _interrupt_after(m, stage2, "draw_tree", 7)  # dies in step 8 of 8
        with pytest.raises(_Interrupt):
            stage2.train_stage2(cfg, run, anchor, space, resumed, train, w)
    resumed2, again = stage2.train_stage2(cfg, run, anchor, space, resumed, train, w, resume=True)
    for key, value in whole2.state_dict().items():
        torch.testing.assert_close(resumed2.state_dict()[key], value, rtol=0, atol=1e-6)
    # Trees drawn before the interruption count too.
    assert again["distinct_trees"] == record2["distinct_trees"]
    # The resumed logs hold every logged step once, with the uninterrupted run's values.
    for stage in ("stage1", "stage2"):
        want = read_log(tmp_path / "a" / "logs" / f"{stage}.jsonl")
        got = read_log(run / "logs" / f"{stage}.jsonl")
        assert [r["step"] for r in got] == [r["step"] for r in want] != []
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            for key in w:
                assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (stage, key)


def test_a_checkpoint_of_another_config_is_refused(tiny_anchor, tmp_path, monkeypatch):
    cfg, anchor, space, (train, val) = tiny_anchor
    w = _scales(anchor, val)  # [N] loss scales
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, checkpoint_every=10))
    with monkeypatch.context() as m:
        _interrupt_after(m, draws, "sample_parents", 12)
        with pytest.raises(_Interrupt):
            stage1.train_stage1(cfg, tmp_path, anchor, space, torch.eye(3), train, w)
    other = load_config(None, [*TINY, f"data.cache_dir={tmp_path}", "stage1.lr=0.002"])
    with pytest.raises(UserError, match="another config"):
        stage1.train_stage1(other, tmp_path, anchor, space, torch.eye(3), train, w, resume=True)
    (tmp_path / stage1.CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="is damaged"):
        stage1.train_stage1(cfg, tmp_path, anchor, space, torch.eye(3), train, w, resume=True)


def test_stage2_draws_consume_the_generator_alike_whatever_the_shares(tiny_anchor):
    """The evaluation mix is drawn on every step (``train/draws.py``), so turning a share
    to 0 changes which draws are replaced, never the sequence that follows."""
    _, anchor, space, _ = tiny_anchor
    edge = EdgeHypernet(3, anchor.num_layers)
    low = min_flops(space) / anchor_flops(space)
    states = []
    for shares in ((0.0, 0.0), (0.3, 0.2), (1.0, 1.0)):
        rng = np.random.default_rng(5)
        for _ in range(3):
            stage2.draw_tree(edge, space, 0.2, low, rng, torch.device("cpu"), *shares)
        states.append(rng.bit_generator.state)
    assert states[0] == states[1] == states[2]
