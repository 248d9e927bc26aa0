"""The anchor: stacked execution equals per-stream execution; trees run exactly their nodes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dymu.config import ModelConfig
from dymu.errors import UserError
from dymu.models.anchor import StackedAnchor, build_anchor, load_anchor_weights, save_anchor
from dymu.models.flops import count_flops
from dymu.models.streams import TreeStreams
from dymu.space.anchor_space import anchor_space
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.tasks import TaskSpec

SPECS = [
    TaskSpec("semseg", "semseg", 5),
    TaskSpec("depth", "depth"),
    TaskSpec("normals", "normals"),
]
MODEL = ModelConfig(width=4)
SIZE = (32, 32)


@pytest.fixture(scope="module")
def anchor():
    torch.manual_seed(0)
    a = build_anchor(MODEL, SPECS, seed=0)
    # Give BatchNorm non-trivial running statistics so eval mode is a real test.
    with torch.no_grad():
        StackedAnchor(a).train()(torch.rand(8, 3, *SIZE))
    return a.eval()


def _close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4)


def test_stacked_equals_streams_in_train_and_eval_mode():
    a = build_anchor(MODEL, SPECS, seed=1)
    stacked = StackedAnchor(a)
    x = torch.rand(4, 3, *SIZE)
    for mode in (True, False):
        a.train(mode)
        stacked.train(mode)
        with torch.no_grad():
            torch.manual_seed(0)  # heads may use dropout in training mode
            got = stacked(x)
            torch.manual_seed(0)
            _close(got, a(x))


def test_training_stacked_then_writing_back_keeps_outputs():
    a = build_anchor(MODEL, SPECS, seed=2)
    stacked = StackedAnchor(a)
    opt = torch.optim.SGD(stacked.parameters(), lr=0.1)
    x = torch.rand(4, 3, *SIZE)
    for _ in range(3):
        loss = sum(v.square().mean() for v in stacked(x).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    stacked.write_back(a)
    stacked.eval()
    a.eval()
    with torch.no_grad():
        _close(stacked(x), a(x))


def test_no_sharing_tree_reproduces_the_anchor(anchor):
    x = torch.rand(2, 3, *SIZE)
    net = TreeNet(anchor, TreeSpec.no_sharing(len(SPECS), anchor.num_layers))
    with torch.no_grad():
        got, want = net(x), anchor(x)
    for k in want:
        assert torch.equal(got[k], want[k])


def test_tree_flops_equal_fvcore_count_of_the_executed_tree(anchor):
    space = anchor_space(anchor, SIZE)
    rng = np.random.default_rng(0)
    trees = [TreeSpec.no_sharing(3, anchor.num_layers), TreeSpec.all_sharing(3, anchor.num_layers)]
    trees += [TreeSpec.random(3, anchor.num_layers, rng) for _ in range(4)]
    image = torch.zeros(1, 3, *SIZE)
    for tree in trees:
        assert tree.flops(space) == count_flops(TreeNet(anchor, tree), image), tree


def test_shared_prefix_runs_once(anchor):
    calls: dict[tuple[int, int], int] = {}

    def counter(key):
        def hook(*_):
            calls[key] = calls.get(key, 0) + 1

        return hook

    handles = [
        layer.register_forward_hook(counter((li, j)))
        for j, stream in enumerate(anchor.streams)
        for li, layer in enumerate(stream.layers)
    ]
    try:
        num_layers = anchor.num_layers
        with torch.no_grad():
            TreeNet(anchor, TreeSpec.all_sharing(3, num_layers, trunk=1))(torch.rand(2, 3, *SIZE))
    finally:
        for h in handles:
            h.remove()
    last = num_layers - 1
    expected = {(li, 1): 1 for li in range(last)} | {(last, j): 1 for j in range(3)}
    assert calls == expected


def test_trees_of_one_batch_share_nodes_and_match_separate_runs(anchor):
    """The joint stage's sandwich (``shared=``): nodes and heads two trees have in common
    run once, and outputs and gradients equal those of each tree run on its own (float64,
    with the private-node rule, so one (layer, stream) runs two sets of weights)."""
    tuned = copy.deepcopy(anchor).double()
    private = copy.deepcopy(anchor).double()
    with torch.no_grad():
        for q in tuned.parameters():
            q.add_(0.01 * torch.randn_like(q))  # the tuned weights differ from stage 0's
    streams = TreeStreams(tuned, private)
    n, num_layers = len(SPECS), anchor.num_layers
    trees = [
        TreeSpec.all_sharing(n, num_layers, trunk=1),
        TreeSpec.branching(n, num_layers, 1, [1, num_layers - 1, 0]),
        TreeSpec.no_sharing(n, num_layers),  # all private: stage 0's weights
        TreeSpec.random(n, num_layers, np.random.default_rng(3)),
    ]
    x = torch.rand(2, 3, *SIZE, dtype=torch.float64)
    calls = {"n": 0}

    def count(*_):
        calls["n"] += 1

    def run(shared):
        tuned.zero_grad(set_to_none=True)
        calls["n"] = 0
        outs = [TreeNet(streams, t)(x, shared=shared) for t in trees]
        sum(o.square().mean() for out in outs for o in out.values()).backward()
        grads = [None if q.grad is None else q.grad.clone() for q in tuned.parameters()]
        return outs, grads, calls["n"]

    handles = [
        layer.register_forward_hook(count)
        for weights in (tuned, private)
        for stream in weights.streams
        for layer in stream.layers
    ]
    try:
        alone, grads_alone, calls_alone = run(None)
        shared, grads_shared, calls_shared = run({})
    finally:
        for h in handles:
            h.remove()
    for a, b in zip(alone, shared, strict=True):
        _close(a, b, atol=1e-12)
    assert sum(g is not None for g in grads_alone) > 0
    for a, b in zip(grads_alone, grads_shared, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    # the trunk's layers 0..1 (and the rest of the trunk task's path) run once, not twice
    assert calls_shared < calls_alone
    with pytest.raises(ValueError, match="do not mix"):
        TreeNet(streams, trees[0])(x, bn_offsets={}, shared={})


def test_save_and_load_round_trip_and_mismatch(anchor, tmp_path):
    path = save_anchor(anchor, tmp_path / "anchor.safetensors", {"tasks": ["a"]})
    other = build_anchor(MODEL, SPECS, seed=5).eval()
    assert load_anchor_weights(other, path) == {"tasks": ["a"]}
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        _close(other(x), anchor(x), atol=0)
    wider = build_anchor(ModelConfig(width=8), SPECS)
    with pytest.raises(UserError, match="other shapes"):
        load_anchor_weights(wider, path)
    fewer = build_anchor(MODEL, SPECS[:2])
    with pytest.raises(UserError, match="unexpected tensor"):
        load_anchor_weights(fewer, path)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="is damaged"):
        load_anchor_weights(other, tmp_path / "bad.safetensors")
