"""Materialized trees: same outputs as TreeNet with offsets, only used nodes, BN folded, and
fvcore FLOPs equal to the space's count minus the batch norms that folding removed."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from tiny import mobilenet_anchor, randomise_batchnorms
from torch import nn

from dymu.compile.materialize import fold_batchnorms, materialize, node_name
from dymu.config import ModelConfig
from dymu.hypernet.weight import WeightHypernet, bn_layout
from dymu.models.anchor import Anchor, build_anchor
from dymu.models.flops import count_flops, count_params
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
SIZE = (32, 32)
BatchNorm = nn.modules.batchnorm._BatchNorm


def _trees(num_tasks: int, num_layers: int) -> list[TreeSpec]:
    """No sharing, all sharing (trunk 1) and three random trees."""
    rng = np.random.default_rng(0)
    return [
        TreeSpec.no_sharing(num_tasks, num_layers),
        TreeSpec.all_sharing(num_tasks, num_layers, trunk=1),
        *(TreeSpec.random(num_tasks, num_layers, rng) for _ in range(3)),
    ]


@pytest.fixture(scope="module")
def anchor() -> Anchor:
    a = build_anchor(ModelConfig(width=4), SPECS, seed=0)
    randomise_batchnorms(a, seed=0)
    return a.eval()


@pytest.fixture(scope="module")
def offsets(anchor):
    """Weight-hypernet offsets for every node; its zero-initialised output layer made random."""
    net = WeightHypernet(len(SPECS), bn_layout(anchor.streams))
    torch.manual_seed(0)
    with torch.no_grad():
        nn.init.normal_(net.out.weight, std=0.1)
        nn.init.normal_(net.out.bias, std=0.3)
        return net(torch.tensor([0.2, 0.3, 0.5]), 0.7)


@pytest.fixture(scope="module")
def space(anchor):
    return anchor_space(anchor, SIZE)


def _used_originals(anchor: Anchor, tree: TreeSpec) -> list[nn.Module]:
    """The anchor modules a tree runs: its used nodes' layers and every head."""
    layers = [anchor.streams[j].layers[layer] for layer, j in tree.used_nodes()]
    return layers + list(anchor.heads.values())


def _count(modules: list[nn.Module], kind: type[nn.Module]) -> int:
    return sum(isinstance(m, kind) for module in modules for m in module.modules())


def _fvcore_by_operator(module: nn.Module, image: torch.Tensor) -> dict[str, int]:
    """fvcore's FLOPs per operator kind (``conv``, ``batch_norm``, ...) of ``module(image)``."""
    from fvcore.nn import FlopCountAnalysis

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = FlopCountAnalysis(module.eval(), (image,))
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        return dict(analysis.by_operator())


def _bn_flops_by_hooks(anchor: Anchor, tree: TreeSpec, image: torch.Tensor) -> int:
    """2 FLOPs per output element of every BN call (eval, affine): fvcore's rule, by hand."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += 2 * output.numel()

    handles = [m.register_forward_hook(hook) for m in anchor.modules() if isinstance(m, BatchNorm)]
    try:
        with torch.no_grad():
            TreeNet(anchor, tree)(image)
    finally:
        for h in handles:
            h.remove()
    return total


def test_fixture_makes_offsets_and_statistics_matter(anchor, offsets):
    x = torch.rand(2, 3, *SIZE)
    tree = TreeSpec.no_sharing(len(SPECS), anchor.num_layers)
    fresh = build_anchor(ModelConfig(width=4), SPECS, seed=0).eval()  # identity BNs
    with torch.no_grad():
        plain, shifted = TreeNet(anchor, tree)(x), TreeNet(anchor, tree)(x, offsets)
        default = TreeNet(fresh, tree)(x)
    for k in plain:
        assert (plain[k] - shifted[k]).abs().max() > 1e-2
        assert (plain[k] - default[k]).abs().max() > 1e-2


@pytest.mark.parametrize("index", range(5))
def test_materialized_equals_treenet_with_offsets(anchor, offsets, index):
    tree = _trees(len(SPECS), anchor.num_layers)[index]
    net = materialize(anchor, tree, offsets)
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        got, want = net(x), TreeNet(anchor, tree).eval()(x, offsets)
    assert list(got) == list(want) == [s.name for s in SPECS]
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)


def test_only_used_nodes_and_no_batchnorm(anchor, offsets):
    for tree in _trees(len(SPECS), anchor.num_layers):
        net = materialize(anchor, tree, offsets)
        assert list(net.nodes) == [node_name(layer, j) for layer, j in tree.used_nodes()]
        assert [name for name, _ in net.steps] == list(net.nodes)  # run each once, in order
        originals = _used_originals(anchor, tree)
        modules = [*net.nodes.values(), *net.heads.values()]
        assert _count(modules, BatchNorm) == 0 and net.unfolded_bns == ()
        # Folding keeps every conv and swaps each BN for an identity.
        assert _count(modules, nn.Conv2d) == _count(originals, nn.Conv2d)
        assert _count(modules, nn.Identity) - _count(originals, nn.Identity) == _count(
            originals, BatchNorm
        )


def test_parameters_are_the_trees_minus_folded_batchnorms(anchor, offsets, space):
    for tree in _trees(len(SPECS), anchor.num_layers):
        net = materialize(anchor, tree, offsets)
        originals = _used_originals(anchor, tree)
        modules = [*net.nodes.values(), *net.heads.values()]
        bns = [m for module in originals for m in module.modules() if isinstance(m, BatchNorm)]
        # Each folded BN drops gamma and beta (2C) and gives its conv, bias-free before, a
        # bias (C): C fewer parameters per BN.
        assert _conv_biases(modules) == _conv_biases(originals) + len(bns)
        folded = sum(bn.num_features for bn in bns)
        assert count_params(net) == tree.params(space) - folded


def _conv_biases(modules: list[nn.Module]) -> int:
    convs = [m for module in modules for m in module.modules() if isinstance(m, nn.Conv2d)]
    return sum(m.bias is not None for m in convs)


def test_fvcore_flops_of_the_materialized_tree_equal_the_space(anchor, space):
    """The space prices BN at 0 (deployment folds it), so its FLOPs are what really runs."""
    image = torch.zeros(1, 3, *SIZE)
    trees = _trees(len(SPECS), anchor.num_layers)
    for tree in (trees[0], trees[1], trees[2]):
        net = materialize(anchor, tree)
        assert count_flops(net, image) == tree.flops(space)
        dynamic = _fvcore_by_operator(TreeNet(anchor, tree), image)  # fvcore's own rules
        folded = _fvcore_by_operator(net, image)
        assert "batch_norm" not in folded
        assert dynamic["batch_norm"] == _bn_flops_by_hooks(anchor, tree, image) > 0
        # Folding removes exactly the BNs; fvcore prices convs without their bias add.
        assert {k: v for k, v in dynamic.items() if k != "batch_norm"} == folded
        assert sum(folded.values()) == tree.flops(space)


def test_mobilenetv2_blocks_fold_too():
    """Inverted residuals (depthwise convs, ReLU6, linear projection) fold exactly."""
    mnv2 = mobilenet_anchor(SPECS[:2])
    tree = TreeSpec.random(2, mnv2.num_layers, np.random.default_rng(1))
    net = materialize(mnv2, tree)
    x = torch.rand(2, 3, *SIZE)
    with torch.no_grad():
        got, want = net(x), TreeNet(mnv2, tree)(x)
    assert _count([net], BatchNorm) == 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=0)


def test_the_anchor_is_left_untouched(anchor, offsets):
    before = {k: v.clone() for k, v in anchor.state_dict().items()}
    anchor.train()
    try:
        net = materialize(anchor, TreeSpec.all_sharing(len(SPECS), anchor.num_layers), offsets)
        assert all(m.training for m in anchor.modules())
    finally:
        anchor.eval()
    after = anchor.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_fold_leaves_a_batchnorm_no_conv_precedes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
    randomise_batchnorms(model, seed=2)
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        assert fold_batchnorms(model) == ["3"]
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
        assert fold_batchnorms(model) == ["3"]  # folding again changes nothing
        torch.testing.assert_close(model(x), want, atol=1e-6, rtol=0)
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorms(model.train())


def test_bad_input_is_refused(anchor):
    tree = TreeSpec.no_sharing(len(SPECS), anchor.num_layers)
    with pytest.raises(ValueError, match="names no parameter"):
        materialize(anchor, tree, {(0, 0): {"bn9.weight": torch.zeros(4)}})
    with pytest.raises(ValueError, match="does not fit"):
        materialize(anchor, TreeSpec.no_sharing(2, anchor.num_layers))


@pytest.mark.parametrize("index", range(1, 5))
def test_edge_adapters_fold_exactly_into_the_convolutions(anchor, space, index):
    """The per-edge low-rank adapters (weight hypernet, rank 2, made non-zero) and the task
    adapters mixed by r (rank 2, non-zero) are weight deltas of a node's first
    convolution, summed where both apply: the materialized tree, with no adapter left,
    equals TreeNet with them in float64, and fvcore counts the same FLOPs as without."""
    from dymu.hypernet.weight import build_weight_hypernet

    tree = _trees(len(SPECS), anchor.num_layers)[index]
    hnet = build_weight_hypernet(len(SPECS), anchor.streams, rank=2, task_rank=2).double()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in [*hnet.adapters.items(), *hnet.task_adapters.items()]:
            if name.endswith("_u"):
                nn.init.normal_(p, std=0.3)
        r = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
        offsets = hnet(r, 0.7, tree)
        crossed = hnet.edge_deltas(tree)
    assert crossed  # these trees hold cross-task edges
    a64 = anchor.double()
    try:
        x = torch.rand(2, 3, *SIZE, dtype=torch.float64)
        with torch.no_grad():
            net = materialize(a64, tree, offsets)
            got, want = net(x), TreeNet(a64, tree).eval()(x, offsets)
            bn_only = TreeNet(a64, tree).eval()(x, hnet(r, 0.7))
            other = TreeNet(a64, tree).eval()(x, hnet(r.flip(0), 0.7, tree))
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-10, rtol=1e-10)
        assert any((want[k] - bn_only[k]).abs().max() > 1e-4 for k in want)  # adapters matter
        assert all((want[k] - other[k]).abs().max() > 1e-4 for k in want)  # and follow r
        plain = materialize(a64, tree, hnet(r, 0.7))
        image = torch.zeros(1, 3, *SIZE, dtype=torch.float64)
        assert count_flops(net, image) == count_flops(plain, image)
    finally:
        anchor.float()


def test_private_nodes_run_the_private_weights_in_treenet_and_materialized(anchor, offsets):
    """With the private-node rule (stage 0's streams beside the joint stage's), the anchor
    tree is the private anchor exactly, and every tree materializes to what TreeNet computes."""
    other = build_anchor(ModelConfig(width=4), SPECS, seed=5)
    randomise_batchnorms(other, seed=5)
    other = other.eval()
    x = torch.rand(2, 3, *SIZE)
    no_sharing = TreeSpec.no_sharing(len(SPECS), anchor.num_layers)
    with torch.no_grad():
        streams = TreeStreams(anchor, other)
        got = TreeNet(streams, no_sharing)(x)
        want = TreeNet(other, no_sharing)(x)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=0, rtol=0)
        for tree in _trees(len(SPECS), anchor.num_layers)[1:]:
            net = materialize(streams, tree, offsets)
            ref = TreeNet(streams, tree).eval()(x, offsets)
            mixed = net(x)
            for k in ref:
                torch.testing.assert_close(mixed[k], ref[k], atol=1e-5, rtol=0)
