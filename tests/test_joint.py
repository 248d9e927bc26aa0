"""The joint stage (METHOD.md 1.9): sandwich trees, the distillation term, weights only,
the stage-0 anchor untouched, and a resumed run equal to an uninterrupted one."""

from __future__ import annotations

import dataclasses
import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import TINY, stop_after_first_checkpoint

import dymu.train.engine as engine
import dymu.train.joint as joint
import dymu.train.stage0 as stage0
from dymu.config import load_config
from dymu.data import get_builder
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import max_flops, min_flops
from dymu.space.tree import TreeSpec
from dymu.train.spec import resolve_specs

STEPS = [*TINY, "joint.steps=10", "joint.lr=0.003"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("joint")
    cfg = load_config(None, [*STEPS, f"data.cache_dir={tmp / 'c'}"])
    anchor, _ = stage0.train_stage0(cfg, tmp / "anchor")
    builder = get_builder("synthscenes")
    return cfg, anchor, builder.load(cfg.data, "train"), builder.load(cfg.data, "val")


def test_sandwich_holds_the_anchor_tree_a_cheapest_tree_and_random_trees(tiny):
    _, anchor, _, _ = tiny
    space = anchor_space(anchor, (32, 32))
    rng = np.random.default_rng(0)
    for _ in range(5):
        trees = joint.sandwich(3, anchor.num_layers, 2, rng)
        assert len(trees) == 4
        assert trees[0] == TreeSpec.no_sharing(3, anchor.num_layers)
        assert trees[1].flops(space) == min_flops(space)


def test_branch_sandwich_trees_run_between_the_cheapest_tree_and_the_anchor_tree(tiny):
    _, anchor, _, _ = tiny
    space = anchor_space(anchor, (32, 32))
    num_layers, trunk = anchor.num_layers, 2
    cheapest = TreeSpec.all_sharing(3, num_layers, trunk).flops(space)
    assert cheapest == min_flops(space)  # equal streams: every trunk's cheapest tree is one
    rng = np.random.default_rng(0)
    costs, splits = [], set()
    for _ in range(300):  # 600 trees: every pair of split layers comes up (1 in L^2, L = 7)
        trees = joint.sandwich(3, num_layers, 2, rng, anchor_tree=False, trunk=trunk, kind="branch")
        assert len(trees) == 1 + 2 and trees[0] == TreeSpec.all_sharing(3, num_layers, trunk)
        for tree in trees[1:]:
            # every task runs the trunk's stream up to its split layer, then its own stream
            split = []
            for j in range(3):
                path = tree.path(j)
                k = next((i for i, s in enumerate(path) if s != trunk), num_layers)
                assert path == [trunk] * k + [j] * (num_layers - k), (j, path)
                split.append(k)
            assert split[trunk] == num_layers  # the trunk's own task never leaves it
            splits.add((split[0], split[1]))
            costs.append(tree.flops(space))
    # Every other task leaves the trunk at any layer 0..L-1 (0: its own stream throughout,
    # L-1: all but the last layer shared), independently of the other tasks ...
    assert splits == set(itertools.product(range(num_layers), repeat=2))
    # ... so the trees span the whole range from the cheapest tree to the anchor tree.
    assert all(cheapest <= c <= max_flops(space) for c in costs)
    assert min(costs) == cheapest and max(costs) == max_flops(space)


def test_distillation_is_a_mean_of_per_image_terms():
    teacher = torch.tensor([[0.0, 2.0], [1.0, 3.0]], dtype=torch.float64)  # rows' var: 2
    student = teacher + torch.tensor([[1.0], [2.0]], dtype=torch.float64)  # errors 1 and 4
    assert joint.distillation(student, teacher).item() == pytest.approx((1 / 2 + 4 / 2) / 2)
    halves = [joint.distillation(student[i : i + 1], teacher[i : i + 1]) for i in (0, 1)]
    assert joint.distillation(student, teacher).item() == pytest.approx(
        (sum(halves) / 2).item()
    )  # two ranks holding one image each average to the batch's value


@pytest.mark.parametrize("private", [True, False])
def test_only_weights_move_and_the_stage0_anchor_stays(tiny, tmp_path, private):
    _, anchor, train, val = tiny
    cfg = load_config(None, [*STEPS, f"joint.private_nodes={str(private).lower()}"])
    before = {k: v.clone() for k, v in anchor.state_dict().items()}
    _, record = joint.train_joint(cfg, tmp_path, anchor, train, val)
    for k, v in anchor.state_dict().items():  # the teacher, and delta_m's baseline
        assert torch.equal(v, before[k]), k
    saved = load_file(str(tmp_path / joint.JOINT_WEIGHTS))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in before.items()}
    moved = [k for k in before if before[k].is_floating_point() and "running" not in k]
    assert any(not torch.equal(saved[k], before[k]) for k in moved)
    for k in before:  # BatchNorm statistics stay stage 0's: one set serves every tree
        if "running" in k:
            assert torch.equal(saved[k], before[k]), k
    on_disk = json.loads((tmp_path / joint.JOINT_JSON).read_text())
    assert on_disk["config_hash"] == joint.joint_hash(cfg) and on_disk["steps"] == 10
    # What the stage is for: the cheapest tree's validation losses fall, relative to stage 0.
    val_losses = record["val_losses"]
    ratios = [
        val_losses["cheapest_tree/joint"][t] / val_losses["cheapest_tree/stage0"][t]
        for t in anchor.task_names
    ]
    assert np.mean(ratios) < 0.98


def test_a_resumed_joint_stage_equals_an_uninterrupted_one(tiny, tmp_path, monkeypatch):
    cfg, anchor, train, val = tiny
    whole, _ = joint.train_joint(cfg, tmp_path / "whole", anchor, train, val)
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, checkpoint_every=4))
    stop_after_first_checkpoint(
        monkeypatch, engine, lambda: joint.train_joint(cfg, tmp_path / "cut", anchor, train, val)
    )
    assert (tmp_path / "cut" / joint.CHECKPOINT).is_file()
    resumed, _ = joint.train_joint(cfg, tmp_path / "cut", anchor, train, val, resume=True)
    assert not (tmp_path / "cut" / joint.CHECKPOINT).exists()
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-6, msg=k)


def test_no_joint_steps_leaves_the_stage0_streams(tiny, tmp_path):
    _, anchor, train, val = tiny
    cfg = load_config(None, [*STEPS, "joint.steps=0"])
    assert joint.ensure_joint(cfg, tmp_path, anchor, train, val) is anchor
    streams = resolve_specs(cfg)["stage1"].inputs["streams"]  # what the trees run
    assert streams == {"tuned": f"stage0 {stage0.stage0_hash(cfg)}", "private": None}
    assert not (tmp_path / joint.JOINT_WEIGHTS).exists()


def test_private_training_leaves_the_anchor_tree_and_trains_the_rest(tiny, tmp_path):
    _, anchor, train, val = tiny
    cfg = load_config(None, [*STEPS, "joint.private_nodes=true"])
    rng = np.random.default_rng(0)
    trees = joint.sandwich(3, anchor.num_layers, 2, rng, anchor_tree=False)
    assert len(trees) == 3 and TreeSpec.no_sharing(3, anchor.num_layers) not in trees
    _, record = joint.train_joint(cfg, tmp_path, anchor, train, val)
    losses = record["val_losses"]
    assert losses["anchor_tree/joint"] == losses["anchor_tree/stage0"]  # all private
    after, before = losses["cheapest_tree/joint"], losses["cheapest_tree/stage0"]
    assert np.mean([after[t] / before[t] for t in after]) < 0.98
    old = load_config(None, [*STEPS, "joint.private_nodes=false"])
    assert joint.joint_hash(cfg) != joint.joint_hash(old)
