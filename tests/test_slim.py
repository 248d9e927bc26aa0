"""Widths inside trees (METHOD.md 1.11): one slicing rule for training, pricing and export.

A slimmed layer run on views of the full weights equals its materialized copy; the space
prices every (tree, widths) configuration as fvcore counts its materialized network; the
cheapest configuration is found exactly; full width changes nothing that existed before.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from tiny import mobilenet_anchor, randomise_batchnorms
from torch import nn

from dymu.compile.materialize import materialize
from dymu.config import ModelConfig
from dymu.errors import UserError
from dymu.models import slim
from dymu.models.anchor import build_anchor
from dymu.models.flops import count_flops
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import (
    WidthCosts,
    build_space,
    costs,
    load_space,
    min_flops,
    save_space,
    width_costs,
)
from dymu.space.tree import TreeSpec, enumerate_trees
from dymu.space.treenet import TreeNet
from dymu.tasks import TaskSpec

SPECS = [
    TaskSpec("semseg", "semseg", 5),
    TaskSpec("depth", "depth"),
    TaskSpec("normals", "normals"),
]
SIZE = (32, 32)
WIDTHS = (0.25, 0.5, 0.75, 1.0)
SPACE_WIDTHS = (0.5, 0.75, 1.0)  # fewer fvcore counts for the space fixture


@pytest.fixture(scope="module")
def anchor():
    a = build_anchor(ModelConfig(width=8), SPECS, seed=0)
    randomise_batchnorms(a, seed=0)
    return a.eval()


@pytest.fixture(scope="module")
def space(anchor):
    return anchor_space(anchor, SIZE, SPACE_WIDTHS)


def _random_widths(tree: TreeSpec, rng: np.random.Generator) -> TreeSpec:
    widths = rng.choice(SPACE_WIDTHS, size=(tree.num_layers, tree.num_tasks)).tolist()
    return TreeSpec(tree.parents, widths)


def test_width_channels_round_half_up_and_keep_one():
    assert [slim.width_channels(16, w) for w in WIDTHS] == [4, 8, 12, 16]
    assert slim.width_channels(6, 0.25) == 2  # 1.5 rounds up, not to even
    assert slim.width_channels(3, 0.1) == 1
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        slim.width_channels(16, 0.0)
    assert slim.check_widths([1, 0.5, 0.5]) == (0.5, 1.0)
    with pytest.raises(UserError, match=r"include 1\.0"):
        slim.check_widths([0.25, 0.5])


@pytest.mark.parametrize("family", ["resnet", "mobilenetv2"])
def test_a_slimmed_layer_equals_its_materialized_copy(family, anchor):
    """Every layer at every (input, own) width, run on views of the full weights, gives
    what the materialized copy gives, in float64; at full width it is the layer itself."""
    streams = anchor if family == "resnet" else mobilenet_anchor(SPECS[:2])
    stream = streams.streams[0].double().eval()
    x = torch.rand(2, 3, *SIZE, dtype=torch.float64)
    full = stream(x)
    inputs = [x]
    layers = stream.layers[:8]  # MobileNetV2's first 8 hold every kind of block it has
    for layer_index, layer in enumerate(layers):
        prev = full[layer_index - 1] if layer_index else x
        sk = slim.skeleton(layer, prev.shape[1], 1.0)
        with torch.no_grad():
            assert torch.equal(slim.run(layer, sk, prev), full[layer_index])
        outs = []
        for h, w in itertools.product(inputs, WIDTHS):
            sk = slim.skeleton(layer, h.shape[1], w)
            with torch.no_grad():
                y = slim.run(layer, sk, h)
                torch.testing.assert_close(slim.slim(layer, sk).eval()(h), y, rtol=0, atol=1e-12)
            assert y.shape[1] == slim.out_channels(layer, h.shape[1], w)
            outs.append(y)
        inputs = outs[-len(WIDTHS) :]  # next layer reads this one at each width
    streams.float()


def test_a_shortcut_between_unequal_widths_pads_or_cuts():
    match_up, match_down = slim.ChannelMatch(2, 4), slim.ChannelMatch(4, 2)
    x = torch.arange(8.0).reshape(1, 4, 1, 2)
    assert match_down(x).tolist() == x[:, :2].tolist()
    up = match_up(x[:, :2])
    assert up[:, :2].tolist() == x[:, :2].tolist() and up[:, 2:].abs().sum() == 0


def test_gradients_and_statistics_reach_only_the_kept_channels(anchor):
    layer = anchor.streams[0].layers[1]
    layer.train()
    before = layer.bn1.running_mean.clone()
    try:
        sk = slim.skeleton(layer, 4, 0.5)  # reads 4 of 8 channels, keeps 4 of 8
        y = slim.run(layer, sk, torch.rand(2, 4, 16, 16))
        y.sum().backward()
        grad = layer.conv1.weight.grad
        assert grad[:4, :4].abs().sum() > 0
        assert grad[4:].abs().sum() == 0 and grad[:, 4:].abs().sum() == 0
        moved = (layer.bn1.running_mean - before).abs()
        assert moved[:4].sum() > 0 and moved[4:].sum() == 0
    finally:
        layer.eval()
        layer.zero_grad(set_to_none=True)
        layer.bn1.running_mean.copy_(before)


def test_the_price_of_every_configuration_is_fvcores_count_of_its_network(anchor, space):
    """Random (tree, widths): fvcore's count of the materialized network (BN folded) is
    the space's price, and it computes what TreeNet computes at those widths."""
    rng = np.random.default_rng(0)
    image = torch.rand(2, 3, *SIZE)
    for _ in range(8):
        tree = _random_widths(TreeSpec.random(len(SPECS), anchor.num_layers, rng), rng)
        stats = TreeNet(anchor, tree).calibrate([torch.rand(4, 3, *SIZE)])
        net = materialize(anchor, tree, bn_stats=stats)
        assert count_flops(net, image[:1]) == tree.flops(space)
        with torch.no_grad():
            got, want = net(image), TreeNet(anchor, tree, stats)(image)
        for task in want:
            torch.testing.assert_close(got[task], want[task], rtol=1e-4, atol=1e-4)


def test_full_width_is_the_space_and_tree_of_before(anchor, space):
    plain = anchor_space(anchor, SIZE)
    assert costs(space) == costs(plain) and width_costs(plain) is None
    tree = TreeSpec.random(len(SPECS), anchor.num_layers, np.random.default_rng(1))
    full = TreeSpec(tree.parents, [[1.0] * len(SPECS)] * anchor.num_layers)
    assert full.widths is None and full == tree and full.hash() == tree.hash()
    assert tree.flops(space) == tree.flops(plain)
    assert full.to_json() == tree.to_json()


def test_widths_name_the_network(anchor):
    n, num_layers = len(SPECS), anchor.num_layers
    tree = TreeSpec.all_sharing(n, num_layers, trunk=0)
    widths = [[0.5] * n for _ in range(num_layers)]
    narrow = TreeSpec(tree.parents, widths)
    assert narrow.hash() != tree.hash()
    # node (0, 1) is unused in an all-sharing tree: its width does not change the network
    other = [row[:] for row in widths]
    other[0][1] = 0.25
    assert TreeSpec(tree.parents, other).hash() == narrow.hash()
    assert TreeSpec.from_json(narrow.to_json()) == narrow
    with pytest.raises(UserError, match=r"width of node \(0, 0\)"):
        TreeSpec(tree.parents, [[0.0] * n, *widths[1:]])
    with pytest.raises(UserError, match="table"):
        TreeSpec(tree.parents, widths[1:])


def test_a_width_the_space_lacks_is_refused(anchor, space):
    n, num_layers = len(SPECS), anchor.num_layers
    tree = TreeSpec(TreeSpec.no_sharing(n, num_layers).parents, [[0.3] * n] * num_layers)
    with pytest.raises(UserError, match="not one of the space's"):
        tree.flops(space)
    with pytest.raises(UserError, match="full widths only"):
        tree.flops(anchor_space(anchor, SIZE))


def _tiny_width_space() -> tuple:
    """2 tasks x 3 layers x 2 widths with costs that make streams differ."""
    widths = (0.5, 1.0)
    node = [
        [[[2, 6]], [[3, 5]]],
        [[[1, 4], [3, 9]], [[2, 3], [2, 8]]],
        [[[1, 5], [2, 7]], [[2, 4], [4, 6]]],
    ]
    head = [[[1, 1], [2, 3]], [[1], [4]]]
    wc = WidthCosts(widths, node, node, head, head, (0, None))
    full = [[cell[-1][-1] for cell in row] for row in node]
    hfull = [cell[-1][-1] for cell in head]
    return build_space(["a", "b"], full, full, hfull, hfull, wc), widths


def test_min_flops_is_the_cheapest_configuration_by_enumeration():
    G, widths = _tiny_width_space()
    best = min(
        TreeSpec(tree.parents, w).flops(G)
        for tree in enumerate_trees(2, 3)
        for w in itertools.product(itertools.product(widths, repeat=2), repeat=3)
    )
    assert min_flops(G) == best


def test_width_costs_are_checked_and_saved_exactly(tmp_path):
    G, widths = _tiny_width_space()
    save_space(G, tmp_path / "space.json")
    H = load_space(tmp_path / "space.json")
    assert width_costs(H) == width_costs(G)
    wc = width_costs(G)
    full = [[cell[-1][-1] for cell in row] for row in wc.node_flops]
    hfull = [cell[-1][-1] for cell in wc.head_flops]
    with pytest.raises(UserError, match="full width must equal"):
        build_space(["a", "b"], [[v + 1 for v in r] for r in full], full, hfull, hfull, wc)
    shrinking = [[[row[::-1] for row in cell] for cell in layer] for layer in wc.node_flops]
    bad = WidthCosts(widths, shrinking, wc.node_params, wc.head_flops, wc.head_params, (0, None))
    full_bad = [[cell[-1][-1] for cell in row] for row in shrinking]
    with pytest.raises(UserError, match="must not decrease"):
        build_space(["a", "b"], full_bad, full, hfull, hfull, bad)


def test_heads_without_a_width_rule_are_refused():
    class Odd(nn.Module):
        low_layer = None

    with pytest.raises(UserError, match="no width rule"):
        slim.head_skeleton(Odd(), 4, None)
    with pytest.raises(UserError, match="no width rule"):
        slim.skeleton(nn.Sequential(nn.LayerNorm(4)), 4, 0.5)


def test_a_slimmed_tree_exports_to_onnx_with_parity(anchor, tmp_path):
    """Shortcuts between unequal widths become Slice / Pad, which ONNX Runtime runs as
    PyTorch does and the TensorRT op check accepts."""
    from dymu.compile.onnx_export import export_onnx, ort_parity
    from dymu.compile.trt_support import check_graph

    rng = np.random.default_rng(3)
    tree = TreeSpec(
        TreeSpec.random(len(SPECS), anchor.num_layers, rng).parents,
        [[0.25, 1.0, 0.5]] + [[0.75, 0.25, 1.0]] * (anchor.num_layers - 1),
    )
    net = materialize(
        anchor, tree, bn_stats=TreeNet(anchor, tree).calibrate([torch.rand(4, 3, *SIZE)])
    )
    path = tmp_path / "m.onnx"
    export_onnx(net, path, input_shape=(1, 3, *SIZE))
    assert ort_parity(net, path, batch_sizes=(2,))["overall"] <= 1e-4
    report = check_graph(path, "10.3")
    assert report.ok and {"Pad", "Slice"} <= set(report.op_counts)


def _narrow_tree(anchor, seed: int = 5) -> TreeSpec:
    rng = np.random.default_rng(seed)
    tree = TreeSpec.random(len(SPECS), anchor.num_layers, rng)
    widths = [[0.5, 1.0, 0.75]] + [[0.5, 0.75, 1.0]] * (anchor.num_layers - 1)
    return TreeSpec(tree.parents, widths)


def test_calibrated_statistics_are_those_of_the_batch_they_came_from(anchor):
    """Calibrated on one batch, a narrowed configuration computes on that batch what it
    computes with batch statistics, full-width nodes after a narrowed one included; the
    anchor's own statistics are left untouched."""
    anchor.double()
    try:
        tree = _narrow_tree(anchor)
        batch = torch.rand(3, 3, *SIZE, dtype=torch.float64)
        before = {k: v.clone() for k, v in anchor.state_dict().items()}
        net = TreeNet(anchor, tree)
        with torch.no_grad():
            on_batch = net(batch)
        stats = net.calibrate([batch])
        context = tree.narrowed()  # narrowed nodes and every node after one on its path
        narrowed = {(layer, j) for layer, j in tree.used_nodes() if context[layer][j]}
        assert set(stats) == narrowed
        assert any(tree.width(*node) == 1.0 for node in narrowed)
        with torch.no_grad():
            calibrated = TreeNet(anchor, tree, stats)(batch)
        for task in on_batch:
            torch.testing.assert_close(calibrated[task], on_batch[task], rtol=0, atol=1e-10)
        after = anchor.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    finally:
        anchor.float()


def test_a_narrowed_node_needs_its_statistics_to_materialize(anchor):
    with pytest.raises(ValueError, match="calibrated BatchNorm"):
        materialize(anchor, _narrow_tree(anchor))


def test_a_narrowed_node_on_its_own_stream_is_not_private():
    n, num_layers = 2, 3
    widths = [[1.0, 1.0], [0.5, 1.0], [1.0, 1.0]]
    tree = TreeSpec(TreeSpec.no_sharing(n, num_layers).parents, widths)
    assert tree.private() == [[True, True], [False, True], [False, True]]
