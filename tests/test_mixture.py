"""Soft parent mixtures: one-hot weights compute exactly their tree; gradients reach v;
several draws per batch equal separate calls; streams can share their initial weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import randomise_batchnorms

from dymu.config import ModelConfig
from dymu.models.anchor import build_anchor
from dymu.models.mixture import MixtureNet, path_weights, private_weights
from dymu.models.streams import TreeStreams
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.tasks import TaskSpec

SPECS = [
    TaskSpec("semseg", "semseg", 4),
    TaskSpec("depth", "depth"),
    TaskSpec("normals", "normals"),
]


def _one_hot(tree: TreeSpec) -> torch.Tensor:
    parents = torch.tensor(tree.parents)  # [L-1, N]
    return torch.nn.functional.one_hot(parents, tree.num_tasks).float()  # [L-1, N, N]


def test_path_weights_of_a_hard_tree_are_its_paths():
    tree = TreeSpec.random(3, 4, np.random.default_rng(0))
    q = path_weights(_one_hot(tree))
    for j in range(3):
        for layer, stream in enumerate(tree.path(j)):
            assert q[layer, j, stream] == 1 and q[layer, j].sum() == 1


def test_one_hot_weights_equal_the_tree():
    anchor = build_anchor(ModelConfig(width=4), SPECS).eval()
    net = MixtureNet(anchor).eval()
    x = torch.rand(2, 3, 32, 32)
    rng = np.random.default_rng(1)
    trees = [TreeSpec.no_sharing(3, anchor.num_layers), TreeSpec.all_sharing(3, anchor.num_layers)]
    trees += [TreeSpec.random(3, anchor.num_layers, rng) for _ in range(3)]
    with torch.no_grad():
        for tree in trees:
            got, want = net(x, _one_hot(tree)), TreeNet(anchor, tree)(x)
            for k in want:
                torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)


def test_one_hot_weights_with_private_streams_equal_the_tree_with_private_nodes():
    anchor = build_anchor(ModelConfig(width=4), SPECS).eval()
    private = build_anchor(ModelConfig(width=4), SPECS).eval()
    randomise_batchnorms(private, seed=3)  # other weights than the tuned streams
    for p in private.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    streams = TreeStreams(anchor, private)
    net = MixtureNet(streams).eval()
    x = torch.rand(2, 3, 32, 32)
    rng = np.random.default_rng(4)
    num_layers = anchor.num_layers
    trees = [TreeSpec.no_sharing(3, num_layers), TreeSpec.all_sharing(3, num_layers, 1)]
    trees += [TreeSpec.branching(3, num_layers, 0, [2, 1, 3])]
    trees += [TreeSpec.random(3, num_layers, rng) for _ in range(4)]
    with torch.no_grad():
        for tree in trees:
            got, want = net(x, _one_hot(tree)), TreeNet(streams, tree)(x)
            for k in want:
                torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
        # the anchor tree is the stage-0 anchor itself
        torch.testing.assert_close(
            net(x, _one_hot(trees[0]))["depth"], private(x)["depth"], atol=1e-5, rtol=1e-4
        )


def test_private_weights_of_hard_trees_are_their_private_nodes():
    rng = np.random.default_rng(5)
    for tree in [TreeSpec.no_sharing(3, 4), TreeSpec.all_sharing(3, 4, 2)] + [
        TreeSpec.random(3, 4, rng) for _ in range(20)
    ]:
        rho = private_weights(_one_hot(tree))  # [L, N]
        private = tree.private()
        for j in range(3):
            for layer, stream in enumerate(tree.path(j)):
                if stream == j:  # node (layer, j) on task j's own path
                    assert rho[layer, j] == float(private[layer][j])


def test_gradients_reach_the_parent_weights():
    anchor = build_anchor(ModelConfig(width=4), SPECS).eval()
    anchor.requires_grad_(False)
    net = MixtureNet(anchor).eval()
    net.requires_grad_(False)
    logits = torch.zeros(anchor.num_layers - 1, 3, 3, requires_grad=True)
    out = net(torch.rand(2, 3, 32, 32), logits.softmax(-1))
    sum(o.square().mean() for o in out.values()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_grouped_draws_equal_separate_calls():
    anchor = build_anchor(ModelConfig(width=4), SPECS).eval()
    net = MixtureNet(anchor).eval()
    x = torch.rand(4, 3, 32, 32)
    v = torch.rand(2, anchor.num_layers - 1, 3, 3).softmax(-1)  # two draws, two images each
    with torch.no_grad():
        both = net(x, v)
        first, second = net(x[:2], v[0]), net(x[2:], v[1])
    for k in both:
        torch.testing.assert_close(both[k], torch.cat([first[k], second[k]]), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="equal groups"):
        net(x[:3], v)


def test_shared_init_starts_every_stream_from_the_same_weights():
    same = build_anchor(ModelConfig(width=4, shared_init=True), SPECS)
    apart = build_anchor(ModelConfig(width=4, shared_init=False), SPECS)
    for a, b in zip(same.streams[0].parameters(), same.streams[2].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    first, other = next(apart.streams[0].parameters()), next(apart.streams[2].parameters())
    assert not torch.equal(first, other)
