"""Weight hypernet: zero offsets at the start, per-node BatchNorm shifts, gradients to the net."""

from __future__ import annotations

import torch

from dymu.config import ModelConfig
from dymu.hypernet.weight import WeightHypernet, bn_layout
from dymu.models.anchor import build_anchor
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.tasks import TaskSpec

SPECS = [TaskSpec("semseg", "semseg", 4), TaskSpec("depth", "depth")]


def _setup():
    anchor = build_anchor(ModelConfig(width=4), SPECS).eval()
    layout = bn_layout(anchor.streams)
    return anchor, layout, WeightHypernet(2, layout)


def test_layout_covers_every_batchnorm_of_every_node():
    anchor, layout, net = _setup()
    assert [node for node, _ in layout] == [
        (layer, j) for layer in range(anchor.num_layers) for j in range(2)
    ]
    n_bn = sum(1 for m in anchor.streams.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert sum(len(bns) for _, bns in layout) == n_bn
    assert net.total == sum(
        2 * m.num_features for m in anchor.streams.modules() if isinstance(m, torch.nn.BatchNorm2d)
    )


def test_zero_initialised_offsets_reproduce_the_anchor():
    anchor, _, net = _setup()
    tree = TreeSpec.all_sharing(2, anchor.num_layers)
    offsets = net(torch.tensor([0.3, 0.7]), 0.5)
    assert all(d.abs().sum() == 0 for deltas in offsets.values() for d in deltas.values())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        a, b = TreeNet(anchor, tree)(x), TreeNet(anchor, tree)(x, offsets)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_offsets_shift_the_batchnorm_of_their_node_and_train():
    anchor, _, net = _setup()
    anchor.requires_grad_(False)  # stage 2 trains the hypernet only
    tree = TreeSpec.no_sharing(2, anchor.num_layers)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        net.out.bias.fill_(0.05)
        base = TreeNet(anchor, tree)(x)
    out = TreeNet(anchor, tree)(x, net(torch.tensor([0.5, 0.5]), 1.0))
    assert not torch.allclose(out["depth"], base["depth"])
    out["depth"].mean().backward()
    assert net.out.weight.grad.abs().sum() > 0  # the loss reaches the hypernet
    assert all(p.grad is None for p in anchor.parameters())  # the frozen anchor stays as is
    # Only nodes on depth's path get gradient through the depth head.
    grads = net.out.bias.grad
    assert grads.abs().sum() > 0 and (grads == 0).any()
