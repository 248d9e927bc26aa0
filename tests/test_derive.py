"""Deriving a tree: argmax parents, budget repair, budget checks and the relative knob."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dymu.errors import UserError
from dymu.space import TreeSpec, anchor_flops, build_space, enumerate_trees, min_flops
from dymu.space.derive import argmax_tree, derive_tree, relative_budget, repair


def make_space(node_flops, head_flops=None):
    node_flops = [list(row) for row in node_flops]
    n = len(node_flops[0])
    tasks = [f"t{j}" for j in range(n)]
    params = [[0] * n for _ in node_flops]
    return build_space(tasks, node_flops, params, head_flops or [0] * n, [0] * n)


def random_space(rng: np.random.Generator, n: int, num_layers: int, low: int = 1):
    flops = rng.integers(low, 1000, size=(num_layers, n))
    return make_space(flops, rng.integers(0, 100, size=n).tolist())


def one_hot_alpha(parents, p_own=0.9):
    """alpha whose argmax is ``parents``; the rest of each row is spread evenly."""
    parents = np.asarray(parents)
    rows, n = parents.shape
    alpha = np.full((rows, n, n), (1 - p_own) / (n - 1))
    for layer in range(rows):
        alpha[layer, np.arange(n), parents[layer]] = p_own
    return alpha


# -- argmax ------------------------------------------------------------------------------


def test_argmax_hand_case_and_ties():
    alpha = torch.tensor(
        [
            [[0.1, 0.7, 0.2], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]],
            [[0.2, 0.4, 0.4], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 1.0]],
        ]
    )
    tree = argmax_tree(alpha)
    assert tree.parents == ((1, 2, 0), (1, 0, 2))  # ties -> lowest stream
    assert argmax_tree(alpha.numpy()) == tree
    assert argmax_tree(alpha.tolist()) == tree


@pytest.mark.parametrize(
    ("alpha", "message"),
    [
        (np.ones((2, 3)), r"shape \[L-1, N, N\], got \[2, 3\]"),
        (np.ones((2, 3, 2)), r"got \[2, 3, 2\]"),
        (np.full((1, 2, 2), np.nan), "NaN"),
        (-np.ones((1, 2, 2)), ">= 0"),
        ("abc", "numeric"),
    ],
)
def test_bad_alpha(alpha, message):
    with pytest.raises(UserError, match=message):
        argmax_tree(alpha)


def test_alpha_must_match_space():
    G = make_space([[1, 1, 1]] * 3)
    with pytest.raises(UserError, match=r"\[2, 3, 3\]"):
        derive_tree(np.ones((3, 3, 3)), G, 1.0)


# -- repair: hand cases ------------------------------------------------------------------

# 3 streams x 3 layers; anchor = 60 + 300 + 3 = 363 FLOPs.
HAND = [[10, 20, 30], [100, 100, 100], [1, 1, 1]]


def test_repair_leaves_a_fitting_tree_unchanged():
    G = make_space(HAND)
    anchor = TreeSpec.no_sharing(3, 3)
    assert repair(anchor, G, 1.0) == anchor
    raw = TreeSpec(((2, 2, 2), (0, 0, 1)))  # node (1, 2) is unused: its parent is reset
    assert repair(raw, G, 1.0, one_hot_alpha(raw.parents)) == raw.canonical()
    assert raw.canonical().parents == ((2, 2, 2), (0, 0, 1))
    assert repair(TreeSpec(((0, 1, 0), (0, 0, 1))), G, 1.0).parents == ((0, 1, 2), (0, 0, 1))


def test_repair_one_edit_largest_saving_without_alpha():
    G = make_space(HAND)
    # Node (2, 2) leaving (1, 2) prunes (1, 2) and (0, 2): 130 saved, the most of any edit;
    # parent 0 and 1 tie, the lower stream wins.
    tree = repair(TreeSpec.no_sharing(3, 3), G, 240 / 363)
    assert tree.parents == ((0, 1, 2), (0, 1, 0))
    assert tree.flops(G) == 363 - 130


def test_repair_one_edit_best_ratio_with_alpha():
    G = make_space(HAND)
    alpha = one_hot_alpha(TreeSpec.no_sharing(3, 3).parents, p_own=0.98)
    # node (1, 0) is almost indifferent between streams 0 and 1: 10 FLOPs for ~0.02 nats
    # beats 130 FLOPs for ~4.6 nats.
    alpha[0, 0] = [0.50, 0.49, 0.01]
    tree = repair(TreeSpec.no_sharing(3, 3), G, 355 / 363, alpha)
    assert tree.parents == ((1, 1, 2), (0, 1, 2))
    assert tree.flops(G) == 353
    assert derive_tree(alpha, G, 355 / 363) == tree
    assert derive_tree(alpha, G, None) == TreeSpec.no_sharing(3, 3)


def test_repair_merges_branches_when_no_single_edit_helps():
    # Each used layer-0 node feeds two children: moving one child prunes nothing, so only a
    # branch move (both children at once) reaches the cheapest tree.
    G = make_space([[5, 5, 5, 5], [1, 1, 1, 1]])
    tree = TreeSpec(((0, 0, 1, 1),))
    assert tree.flops(G) == 14 and min_flops(G) == 9
    out = repair(tree, G, relative_budget(1.0, G))
    assert out.parents == ((1, 1, 1, 1),)
    assert out.flops(G) == 9


def test_repair_switches_a_chain_to_the_cheapest_stream():
    # Both layers run the expensive stream 1; the last step moves both layer-2 nodes to
    # (1, 0), which inherits the chain below.
    G = make_space([[1, 10], [1, 10], [1, 1]])
    out = repair(TreeSpec(((1, 1), (1, 1))), G, relative_budget(1.0, G))
    assert out.flops(G) == min_flops(G) == 4
    assert out == TreeSpec.cheapest(G)


def test_repair_reaches_the_minimum_from_every_tree():
    G = random_space(np.random.default_rng(7), n=3, num_layers=3, low=0)
    lowest = relative_budget(1.0, G)
    for tree in enumerate_trees(3, 3, unique=True):
        out = repair(tree, G, lowest)
        assert out.flops(G) == min_flops(G), tree


# -- repair: property test ---------------------------------------------------------------


def test_repair_never_exceeds_the_budget_on_random_inputs():
    rng = np.random.default_rng(0)
    n, num_layers = 4, 5
    checked = 0
    for space_index in range(4):
        # one space has zero-cost nodes, which make some merges save nothing
        G = random_space(rng, n, num_layers, low=0 if space_index == 3 else 1)
        anchor, lowest = anchor_flops(G), relative_budget(1.0, G)
        for _ in range(250):
            alpha = rng.dirichlet(np.full(n, 0.5), size=(num_layers - 1, n))
            budget = float(rng.uniform(lowest, 1.0))
            start = argmax_tree(alpha)
            out = derive_tree(alpha, G, budget)
            assert isinstance(out, TreeSpec)
            assert out == out.canonical()
            assert (out.num_tasks, out.num_layers) == (n, num_layers)
            assert out.flops(G) <= budget * anchor
            assert out.flops(G) <= start.flops(G)
            if start.flops(G) <= budget * anchor:
                assert out == start.canonical()
            checked += 1
    assert checked == 1000


# -- budget checks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "shown"),
    [
        (0, "0"),
        (1.5, "1.5"),
        (float("nan"), "nan"),
        (-0.2, "-0.2"),
        (True, "True"),
        ("0.5", "'0.5'"),
    ],
)
def test_budget_outside_range(budget, shown):
    G = make_space(HAND)
    with pytest.raises(UserError, match=rf"^budget must be in \(0, 1\], got {shown}$"):
        derive_tree(np.ones((2, 3, 3)), G, budget)
    with pytest.raises(UserError, match="budget must be in"):
        repair(TreeSpec.no_sharing(3, 3), G, budget)


def test_budget_below_the_cheapest_tree_names_the_minimum():
    G = make_space(HAND, head_flops=[0, 0, 3_000_000])
    anchor, low = anchor_flops(G), min_flops(G)
    assert (anchor, low) == (3_000_363, 3_000_113)
    frac = low / anchor
    with pytest.raises(UserError) as info:
        derive_tree(np.ones((2, 3, 3)), G, 0.5)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("budget 0.5 is below the cheapest tree in this space: ")
    shown = float(message.split(": ")[1].split(" ")[0])
    assert frac <= shown <= frac + 1e-4
    assert "3.00011 MFLOPs" in message
    # the printed minimum is itself an accepted budget
    assert derive_tree(np.ones((2, 3, 3)), G, shown).flops(G) <= shown * anchor


def test_repair_checks_the_tree_shape():
    G = make_space(HAND)
    with pytest.raises(UserError, match="2 tasks x 3 layers but the space has 3 x 3"):
        repair(TreeSpec.no_sharing(2, 3), G, 1.0)


# -- relative budget ---------------------------------------------------------------------


def test_relative_budget_endpoints_and_midpoint():
    G = make_space(HAND)
    anchor, low = anchor_flops(G), min_flops(G)
    assert relative_budget(0, G) == 1.0
    b1 = relative_budget(1.0, G)
    assert b1 * anchor >= low and math.isclose(b1, low / anchor)
    assert math.isclose(relative_budget(0.5, G), 1 - 0.5 * (1 - low / anchor))
    alpha = one_hot_alpha(TreeSpec.no_sharing(3, 3).parents)
    assert derive_tree(alpha, G, b1).flops(G) == low
    assert derive_tree(alpha, G, relative_budget(0.0, G)) == TreeSpec.no_sharing(3, 3)


@pytest.mark.parametrize("c", [-0.1, 1.1, float("nan"), float("inf"), None, False])
def test_relative_budget_outside_range(c):
    with pytest.raises(UserError, match=rf"^relative budget c must be in \[0, 1\], got {c!r}$"):
        relative_budget(c, make_space(HAND))


def _paths(tree: TreeSpec) -> list[list[int]]:
    return [tree.path(t) for t in range(tree.num_tasks)]


def test_preferred_trunks_moves_shared_nodes_to_the_preferred_tasks_stream():
    from dymu.space.derive import preferred_trunks

    G = make_space([[10, 10, 10], [20, 20, 20], [30, 30, 30], [40, 40, 40]])
    # Tasks 0 and 1 share layers 0-1 on stream 0, task 2 shares layer 0 with them.
    tree = TreeSpec(((0, 1, 0), (0, 0, 2), (0, 1, 2))).canonical()
    assert _paths(tree) == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 2, 2, 2]]
    moved = preferred_trunks(tree, [0.2, 0.5, 0.3], G)
    # Layer 0 serves all three: task 1's stream; layer 1 serves tasks 0 and 1: task 1's.
    assert _paths(moved) == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 2, 2, 2]]
    assert moved.flops(G) == tree.flops(G)
    for i in range(3):  # the same branching: every pair shares as many layers as before
        for j in range(3):
            assert moved.shared_prefix(i, j) == tree.shared_prefix(i, j)
    # Ties keep the node's stream; a tree that shares nothing is left as it is.
    assert preferred_trunks(tree, [0.4, 0.4, 0.2], G) == tree
    anchor = TreeSpec.no_sharing(3, 4)
    assert preferred_trunks(anchor, [0.1, 0.1, 0.8], G) == anchor


def test_preferred_trunks_keeps_the_tree_where_the_move_would_break_the_budget():
    from dymu.space.derive import preferred_trunks

    # Stream 1's layers cost more than stream 0's: moving the trunk there breaks 0.8.
    G = make_space([[10, 30], [10, 30], [10, 10]])
    tree = TreeSpec.all_sharing(2, 3, 0)
    budget = tree.flops(G) / anchor_flops(G)
    assert preferred_trunks(tree, [0.1, 0.9], G, budget) == tree
    assert _paths(preferred_trunks(tree, [0.1, 0.9], G)) == [[1, 1, 0], [1, 1, 1]]
