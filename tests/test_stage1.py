"""Stage 1 on a tiny anchor: it trains, writes its files, and the budget term pulls FLOPs down."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

import dymu.train.stage0 as stage0
from dymu.config import load_config
from dymu.data import get_builder
from dymu.losses import expected_flops
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import anchor_flops, costs, min_flops
from dymu.train.stage1 import EDGE_JSON, EDGE_WEIGHTS, train_stage1
from dymu.train.stage2 import WEIGHT_WEIGHTS, train_stage2

TINY = [
    "run.device=cpu",
    "data.size=[32,32]",
    "data.tasks=[semseg,depth,normals]",
    "data.synth.num_train=24",
    "data.synth.num_val=8",
    "data.synth.num_test=8",
    "model.width=4",
    "stage0.epochs=1",
    "stage0.batch_size=8",
    "stage1.steps=40",
    "stage1.batch_size=4",
    "stage1.lr=0.01",
    "stage2.steps=8",
    "stage2.batch_size=4",
]


def test_stage1_and_stage2_train_and_the_budget_pulls_flops_down(tmp_path):
    cfg = load_config(None, [*TINY, f"data.cache_dir={tmp_path / 'c'}"])
    anchor, _ = stage0.train_stage0(cfg, tmp_path)
    space = anchor_space(anchor, (32, 32))
    builder = get_builder("synthscenes")
    train, val = builder.load(cfg.data, "train"), builder.load(cfg.data, "val")
    edge, _ = train_stage1(cfg, tmp_path, anchor, space, torch.eye(3), train, val)
    assert (tmp_path / EDGE_WEIGHTS).is_file()
    saved = json.loads((tmp_path / EDGE_JSON).read_text())
    assert saved["steps"] == 40 and saved["tasks"] == ["semseg", "depth", "normals"]
    assert all(torch.isfinite(torch.tensor(v)) for v in saved["final"].values())
    state = load_file(str(tmp_path / EDGE_WEIGHTS))
    assert set(state) == set(edge.state_dict())

    flops, _, heads, _ = costs(space)
    flops = torch.tensor(flops, dtype=torch.float64)
    heads = torch.tensor(heads, dtype=torch.float64)
    full, low = anchor_flops(space), min_flops(space) / anchor_flops(space)
    r = torch.full((3,), 1 / 3)
    with torch.no_grad():
        tight = expected_flops(edge.alpha(r, low), flops, heads) / full
        loose = expected_flops(edge.alpha(r, 1.0), flops, heads) / full
    assert tight < 0.97  # started near the anchor (1.0); the budget term moved it down
    assert tight <= loose + 1e-6

    weights, record = train_stage2(cfg, tmp_path, anchor, space, edge, train, val)
    assert (tmp_path / WEIGHT_WEIGHTS).is_file() and record["steps"] == 8
    assert record["distinct_trees"] >= 1
    assert weights.out.weight.abs().sum() > 0  # it moved away from the zero start
