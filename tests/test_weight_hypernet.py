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


def test_the_preference_moves_the_outputs_even_when_every_hidden_unit_is_dead():
    """The MLP can lose its dependence on r (every ReLU dead: the same offsets for every
    preference, as on MultiMNIST); the preference-mixed offsets keep it. Stage 2's loss
    weighted by r, a few Adam steps on a shared tree: two preferences then give different
    outputs, each task's loss lower at its own corner."""
    torch.manual_seed(0)
    anchor, _, net = _setup()
    anchor.requires_grad_(False)
    with torch.no_grad():
        net.mlp[-2].bias.fill_(-1e3)  # the last hidden layer is dead for every input
    tree = TreeSpec.all_sharing(2, anchor.num_layers)  # every node shared, none private
    x = torch.rand(4, 3, 32, 32)
    targets = {k: torch.randn_like(v) for k, v in TreeNet(anchor, tree)(x).items()}

    def losses(r):
        out = TreeNet(anchor, tree)(x, net(r, 0.5))
        return torch.stack([(out[k] - targets[k]).pow(2).mean() for k in ("semseg", "depth")])

    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        r = torch.distributions.Dirichlet(torch.tensor([0.3, 0.3])).sample()
        if torch.rand((), generator=gen) < 0.5:
            r = r.flip(0)
        opt.zero_grad()
        (r * losses(r)).sum().backward()
        opt.step()
    with torch.no_grad():
        corners = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
        first, second = losses(corners[0]), losses(corners[1])
    assert first[0] < second[0] and second[1] < first[1]  # each task better at its corner


def test_private_nodes_take_no_offsets_so_the_anchor_tree_is_the_anchor():
    """Under the private-node rule the anchor tree runs stage 0 exactly, whatever the
    weight hypernet predicts; a shared tree takes the offsets."""
    import copy

    from dymu.compile.materialize import materialize
    from dymu.models.streams import TreeStreams

    torch.manual_seed(0)
    stage0, _, net = _setup()
    tuned = copy.deepcopy(stage0)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
        net.out.bias.normal_(0.0, 0.1)  # offsets far from zero
    streams = TreeStreams(tuned, stage0)
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    streams.tuned.double(), streams.stage0.double()
    offsets = {
        k: {n: d.double() for n, d in v.items()}
        for k, v in net(torch.tensor([0.3, 0.7]), 1.0).items()
    }
    anchor_tree = TreeSpec.no_sharing(2, stage0.num_layers)
    assert not streams.adapted(anchor_tree)
    with torch.no_grad():
        plain = stage0(x)
        for run in (
            TreeNet(streams, anchor_tree)(x, offsets),
            materialize(streams, anchor_tree, offsets)(x),
        ):
            for k in plain:
                torch.testing.assert_close(run[k], plain[k], rtol=0, atol=1e-10)
        shared = TreeSpec.all_sharing(2, stage0.num_layers)
        assert streams.adapted(shared)
        a, b = TreeNet(streams, shared)(x), TreeNet(streams, shared)(x, offsets)
    assert all((a[k] - b[k]).abs().max() > 1e-3 for k in a)


def test_task_adapters_start_at_the_anchor_and_leave_the_offsets_as_they_were():
    """Task adapters (``stage2.task_rank``) start at zero, so a shared tree starts at the
    anchor; they add one convolution delta per adapted node and change nothing else the
    hypernet predicts (the same BatchNorm offsets as without them)."""
    from dymu.hypernet.weight import build_weight_hypernet

    anchor = build_anchor(ModelConfig(width=4), SPECS).eval()
    torch.manual_seed(0)
    plain = build_weight_hypernet(2, anchor.streams, rank=0)
    torch.manual_seed(0)
    mixed = build_weight_hypernet(2, anchor.streams, rank=0, task_rank=3)
    r = torch.tensor([0.8, 0.2])
    a, b = plain(r, 0.5), mixed(r, 0.5)
    assert set(a) == set(b)
    for node in a:
        convs = set(b[node]) - set(a[node])
        assert len(convs) == (1 if node[0] >= 1 else 0)  # every node's first conv but layer 0
        for name in a[node]:
            torch.testing.assert_close(a[node][name], b[node][name], rtol=0, atol=0)
        assert all(b[node][c].abs().max() == 0 for c in convs)
    tree = TreeSpec.all_sharing(2, anchor.num_layers)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        base, got = TreeNet(anchor, tree)(x), TreeNet(anchor, tree)(x, b)
    for k in base:
        torch.testing.assert_close(got[k], base[k])
