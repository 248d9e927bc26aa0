"""The width stage (METHOD.md 1.11): narrowed contexts run a copy of their own, full-width
trees never touch it, the sandwich over widths, the feature distillation, and a short
stage that trains the copy alone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny import TINY

import dymu.train.stage0 as stage0
from dymu.config import load_config
from dymu.data import get_builder
from dymu.models.streams import TreeStreams
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import min_flops
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.train import slim_stage

STEPS = [*TINY, "joint.steps=0", "slim.steps=20", "joint.lr=0.003", "model.widths=[0.5,1.0]"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slim")
    cfg = load_config(None, [*STEPS, f"data.cache_dir={tmp / 'c'}"])
    anchor, _ = stage0.train_stage0(cfg, tmp / "anchor")
    builder = get_builder("synthscenes")
    return cfg, anchor.eval(), builder.load(cfg.data, "train"), builder.load(cfg.data, "val")


def _copy_with_noise(anchor, seed: int):
    out = copy.deepcopy(anchor)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return out.eval()


def test_a_node_is_narrowed_when_it_or_a_node_before_it_is():
    tree = TreeSpec([[0, 0, 2], [0, 1, 2]], [[1.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    # layer 0: stream 2 narrow; layer 1: node 2 reads it; layer 2: node 0 narrow itself
    assert tree.narrowed() == [[False, False, True], [False, False, True], [True, False, True]]
    assert TreeSpec.no_sharing(3, 3).narrowed() == [[False] * 3] * 3


def test_full_width_trees_never_run_the_narrow_copy(tiny):
    """The floor: adding the width stage's copy changes no full-width tree's output."""
    _, anchor, _, val = tiny
    tuned, narrow = _copy_with_noise(anchor, 1), _copy_with_noise(anchor, 2)
    with_copy, without = TreeStreams(tuned, anchor, narrow), TreeStreams(tuned, anchor)
    image = val[0]["image"][None]
    rng = np.random.default_rng(0)
    for _ in range(4):
        tree = TreeSpec.random(3, anchor.num_layers, rng)
        assert narrow not in {s for row in with_copy.sources(tree) for s in row}
        a, b = TreeNet(with_copy, tree)(image), TreeNet(without, tree)(image)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_narrowed_contexts_and_their_heads_run_the_narrow_copy(tiny):
    _, anchor, _, val = tiny
    tuned, narrow = _copy_with_noise(anchor, 1), _copy_with_noise(anchor, 2)
    num_layers = anchor.num_layers
    widths = [[1.0] * 3 for _ in range(num_layers)]
    widths[1][0] = 0.5  # task 0's second node: it, its descendants and task 0's head
    tree = TreeSpec(TreeSpec.no_sharing(3, num_layers).parents, widths)
    sources = TreeStreams(tuned, anchor, narrow).sources(tree)
    for layer in range(num_layers):
        assert sources[layer][0] is (narrow if layer >= 1 else anchor), layer
        assert sources[layer][1] is anchor and sources[layer][2] is anchor  # private
    image = val[0]["image"][None]
    a = TreeNet(TreeStreams(tuned, anchor, narrow), tree)(image)
    b = TreeNet(TreeStreams(tuned, anchor), tree)(image)
    assert not torch.allclose(a["semseg"], b["semseg"])
    assert torch.equal(a["depth"], b["depth"]) and torch.equal(a["normals"], b["normals"])


def test_the_width_sandwich_holds_the_smallest_and_random_configurations(tiny):
    _, anchor, _, _ = tiny
    widths = (0.5, 0.75, 1.0)
    space = anchor_space(anchor, (32, 32), widths)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        configs = slim_stage.width_sandwich(3, anchor.num_layers, 2, widths, rng, trunk=1)
        assert len(configs) == 3
        assert configs[0].flops(space) == min_flops(space)
        for config in configs[1:]:
            assert config.path(1) == [1] * anchor.num_layers  # a branch tree of the trunk
            seen |= {config.width(*node) for node in config.used_nodes()}
    assert seen == set(widths)


def test_the_preference_sample_gives_configurations_the_rule_derives(tiny):
    """``slim.sample: preference``: every random configuration is a branch tree of the
    trunk whose widths are the rule's for some preference and budget: within the tree's
    range, and no node can widen one step within the configuration's own cost (the rule
    spends its budget) unless a wider step would exceed it."""
    from dymu.space.derive_widths import spend_budget
    from dymu.space.graph import anchor_flops

    _, anchor, _, _ = tiny
    widths = (0.5, 0.75, 1.0)
    space = anchor_space(anchor, (32, 32), widths)
    full = anchor_flops(space)
    rng = np.random.default_rng(0)
    narrowed = 0
    for _ in range(10):
        configs = slim_stage.width_sandwich(
            3, anchor.num_layers, 2, widths, rng, trunk=1, rule=(space, 10.0)
        )
        assert configs[0].flops(space) == min_flops(space)
        for config in configs[1:]:
            assert config.path(1) == [1] * anchor.num_layers
            tree = TreeSpec(config.parents)
            cost = config.flops(space)
            assert cost <= tree.flops(space)
            # Spending the configuration's own cost again changes nothing: it is spent.
            level = [
                [widths.index(config.width(layer, j)) for j in range(3)]
                for layer in range(anchor.num_layers)
            ]  # [L][N]
            parents = [list(row) for row in config.parents]
            assert spend_budget(parents, level, space, cost / full * (1 + 1e-12)) == level
            narrowed += config.widths is not None
    assert narrowed >= 10


def test_feature_distillation_compares_first_channels_of_narrowed_contexts_only():
    config = TreeSpec([[0, 0]], [[0.5, 1.0], [1.0, 1.0]])  # node (0, 0) narrow, (1, *) read it
    gen = torch.Generator().manual_seed(0)
    teacher = {(0, 0): torch.randn(2, 8, 4, 4, generator=gen)}
    teacher[(1, 0)] = torch.randn(2, 6, 4, 4, generator=gen)
    teacher[(1, 1)] = torch.randn(2, 6, 4, 4, generator=gen)
    student = {(0, 0): teacher[(0, 0)][:, :4].clone(), (1, 0): teacher[(1, 0)].clone()}
    student[(1, 1)] = teacher[(1, 1)].clone()
    assert slim_stage.feature_distillation(student, teacher, config).item() == 0.0
    student[(1, 1)] = student[(1, 1)] + 1.0
    assert slim_stage.feature_distillation(student, teacher, config).item() > 0.0
    full = TreeSpec([[0, 0]])
    assert slim_stage.feature_distillation(student, teacher, full).item() == 0.0


def test_the_width_stage_trains_the_copy_and_nothing_else(tiny, tmp_path):
    """Twenty steps bring the smallest configuration's validation loss down against the
    sliced full-width weights, statistics calibrated both times; the weights full-width
    trees run are the same tensors, unchanged."""
    cfg, anchor, train, val = tiny
    tuned = _copy_with_noise(anchor, 1)
    before = {k: v.clone() for k, v in tuned.state_dict().items()}
    full = TreeStreams(tuned, anchor)
    narrow, record = slim_stage.train_slim(cfg, tmp_path, full, train, val)
    assert all(torch.equal(v, before[k]) for k, v in tuned.state_dict().items())
    losses = record["val_losses"]
    after, sliced = losses["smallest_configuration/slim"], losses["smallest_configuration/sliced"]
    assert np.mean([after[t] / sliced[t] for t in after]) < 0.97
    assert record["spec"]["widths"] == [0.5, 1.0]
    loaded = slim_stage.ensure_slim(cfg, tmp_path, full, train, val).narrow
    assert all(torch.equal(v, narrow.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_the_width_stage_runs_with_the_preference_sample(tiny, tmp_path):
    """``slim.sample: preference`` trains (a few steps), its spec holds the rule's
    strength, and the random sample's spec does not (strength acts after training)."""
    from dymu.train.spec import resolve_specs

    cfg, anchor, train, val = tiny
    pref = load_config(None, [*STEPS, "slim.steps=3", "slim.sample=preference"])
    pref.data = cfg.data
    full = TreeStreams(_copy_with_noise(anchor, 1), anchor)
    _, record = slim_stage.train_slim(pref, tmp_path, full, train, val)
    assert record["spec"]["slim"]["sample"] == "preference"
    assert record["spec"]["slim"]["strength"] == 10.0
    keys = [*STEPS, "slim.sample=preference"]
    same, other = load_config(None, keys), load_config(None, [*keys, "slim.strength=3"])
    assert resolve_specs(other)["slim"].hash != resolve_specs(same)["slim"].hash
    assert "strength" not in resolve_specs(cfg)["slim"].to_json()["slim"]


def test_a_configuration_on_three_weight_sets_materializes_as_it_runs(tiny):
    """Export runs what was evaluated: stage 0 for private nodes, the tuned weights for
    shared full-width ones and the narrow copy for narrowed contexts, in float64."""
    from dymu.compile.materialize import materialize

    _, anchor, _, val = tiny
    tuned, stage0 = _copy_with_noise(anchor, 1).double(), copy.deepcopy(anchor).double()
    narrow = _copy_with_noise(anchor, 2).double()
    streams = TreeStreams(tuned, stage0, narrow)
    num_layers = anchor.num_layers
    parents = TreeSpec.branching(3, num_layers, 0, [num_layers - 2, 1, 0]).parents
    widths = [[1.0] * 3 for _ in range(num_layers)]
    widths[num_layers - 1][0], widths[2][1] = 0.5, 0.5
    tree = TreeSpec(parents, widths)
    sources = {id(s) for row in streams.sources(tree) for s in row}
    assert sources == {id(tuned), id(stage0), id(narrow)}
    images = [val[i]["image"][None].double() for i in range(4)]
    net = TreeNet(streams, tree)
    net.bn_stats = net.calibrate(images)
    image = torch.cat(images)
    want, got = net(image), materialize(streams, tree, bn_stats=net.bn_stats)(image)
    assert all(torch.allclose(got[k], want[k], atol=1e-9) for k in want)
