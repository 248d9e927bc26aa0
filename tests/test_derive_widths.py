"""Deriving (tree, widths) configurations: exact prices, every budget met, moves ranked by
the distributions, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from dymu.errors import UserError
from dymu.space.derive_widths import _Pricer, derive_configuration, spend_budget
from dymu.space.graph import (
    WidthCosts,
    anchor_flops,
    build_space,
    min_flops,
    space_shape,
    width_costs,
)
from dymu.space.tree import TreeSpec

WIDTHS = (0.25, 0.5, 1.0)


def _monotone(rng, rows: int, cols: int) -> list[list[int]]:
    """A table that never decreases along either axis (cumulative sums of positives)."""
    return np.cumsum(np.cumsum(rng.integers(1, 20, (rows, cols)), 0), 1).tolist()


def _space(n: int = 3, num_layers: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    k = len(WIDTHS)
    node = [
        [_monotone(rng, 1 if layer == 0 else k, k) for _ in range(n)] for layer in range(num_layers)
    ]
    low_layers = tuple([1] + [None] * (n - 1))
    head = [_monotone(rng, k, 1 if low is None else k) for low in low_layers]
    wc = WidthCosts(WIDTHS, node, node, head, head, low_layers)
    full = [[cell[-1][-1] for cell in row] for row in node]
    hfull = [cell[-1][-1] for cell in head]
    return build_space([f"t{j}" for j in range(n)], full, full, hfull, hfull, wc)


def _random(rng, G):
    n, num_layers = space_shape(G)
    alpha = rng.dirichlet(np.ones(n), size=(num_layers - 1, n))  # [L-1, N, N]
    omega = rng.dirichlet(np.ones(len(WIDTHS)), size=(num_layers, n))  # [L, N, K]
    return alpha, omega


def test_the_search_prices_as_the_space_does():
    G = _space()
    n, num_layers = space_shape(G)
    price = _Pricer(width_costs(G), n, num_layers)
    rng = np.random.default_rng(1)
    for _ in range(50):
        tree = TreeSpec.random(n, num_layers, rng)
        level = rng.integers(0, len(WIDTHS), (num_layers, n)).tolist()
        spec = TreeSpec(tree.parents, [[WIDTHS[i] for i in row] for row in level])
        parents = [list(row) for row in tree.parents]
        assert price(parents, level, tree.used()) == spec.flops(G)


@pytest.mark.parametrize(("n", "num_layers", "seed"), [(2, 3, 2), (3, 4, 3), (4, 3, 4)])
def test_every_budget_from_the_cheapest_to_one_is_met(n, num_layers, seed):
    G = _space(n, num_layers, seed)
    full, low = anchor_flops(G), min_flops(G)
    rng = np.random.default_rng(seed)
    for budget in [low / full + 1e-9, *np.linspace(low / full, 1.0, 10)[1:]]:
        for _ in range(5):
            alpha, omega = _random(rng, G)
            config = derive_configuration(alpha, omega, G, float(budget))
            assert config.flops(G) <= budget * full


def test_a_fitting_argmax_is_kept():
    G = _space()
    rng = np.random.default_rng(3)
    alpha, omega = _random(rng, G)
    plain = derive_configuration(alpha, omega, G, None)
    assert derive_configuration(alpha, omega, G, 1.0, spend=False) == plain
    assert plain.parents == TreeSpec(np.argmax(alpha, axis=2)).canonical().parents


def test_spending_leaves_no_width_step_that_fits():
    """After spending, every used node is at full width or one step wider would break the
    budget; the tree is the repaired one."""
    G = _space(3, 4, 6)
    full = anchor_flops(G)
    rng = np.random.default_rng(6)
    for budget in (0.3, 0.5, 0.8):
        alpha, omega = _random(rng, G)
        lean = derive_configuration(alpha, omega, G, budget, spend=False)
        spent = derive_configuration(alpha, omega, G, budget)
        assert spent.parents == lean.parents
        assert lean.flops(G) <= spent.flops(G) <= budget * full
        for layer, j in spent.used_nodes():
            w = spent.width(layer, j)
            if w == WIDTHS[-1]:
                continue
            wider = [list(row) for row in (spent.widths or [[1.0] * 3] * 4)]
            wider[layer][j] = WIDTHS[WIDTHS.index(w) + 1]
            assert TreeSpec(spent.parents, wider).flops(G) > budget * full
    level = np.zeros((4, 3), dtype=int).tolist()
    parents = [list(row) for row in TreeSpec.no_sharing(3, 4).parents]
    widened = spend_budget(parents, level, G, 1.0)
    assert widened == [[len(WIDTHS) - 1] * 3] * 4  # budget 1 buys the anchor back


def test_the_least_likely_width_gives_way_first():
    """Two nodes could be narrowed for the same saving; the one whose distribution cares
    least about its width is narrowed."""
    G = _space(n=2, num_layers=2, seed=4)
    n, num_layers = space_shape(G)
    alpha = np.tile(np.eye(n), (num_layers - 1, 1, 1))  # no sharing
    omega = np.zeros((num_layers, n, len(WIDTHS)))
    omega[..., -1] = 0.98  # every node sure of full width ...
    omega[..., :-1] = 0.01
    omega[0, 1] = [0.3, 0.3, 0.4]  # ... but node (0, 1), nearly indifferent
    full = derive_configuration(alpha, omega, G, None)
    budget = (full.flops(G) - 1) / anchor_flops(G)  # one FLOP too many: one move
    config = derive_configuration(alpha, omega, G, budget)
    assert config.widths is not None and config.width(0, 1) < 1.0
    assert all(config.width(layer, j) == 1.0 for layer, j in [(0, 0), (1, 0), (1, 1)])


def test_bad_input_is_one_clear_error():
    G = _space()
    rng = np.random.default_rng(5)
    alpha, omega = _random(rng, G)
    with pytest.raises(UserError, match="omega has shape"):
        derive_configuration(alpha, omega[:, :, :2], G, 0.5)
    with pytest.raises(UserError, match="below the cheapest"):
        derive_configuration(alpha, omega, G, 0.5 * min_flops(G) / anchor_flops(G))
    plain = build_space(["a", "b"], [[1, 1], [1, 1]], [[1, 1], [1, 1]], [1, 1], [1, 1])
    with pytest.raises(UserError, match="no widths"):
        derive_configuration(np.ones((1, 2, 2)), np.ones((2, 2, 1)), plain, 1.0)


def test_a_preference_narrows_the_other_tasks_first():
    """No sharing, a budget that needs some narrowing: the preferred task keeps its width,
    the other task's nodes give way, and the opposite preference mirrors it."""
    from dymu.space.derive_widths import preference_omega

    G = _space(2, 3, 11)
    n, num_layers = space_shape(G)
    tree = TreeSpec.no_sharing(n, num_layers)
    alpha = np.tile(np.eye(n) * 0.98 + 0.01, (num_layers - 1, 1, 1))  # sure of no sharing
    budget = 0.8 * tree.flops(G) / anchor_flops(G)
    mean_width = {}
    for favourite in range(n):
        r = np.full(n, 0.1)
        r[favourite] = 0.9
        omega = preference_omega(tree, r, len(WIDTHS), strength=10.0)
        config = derive_configuration(alpha, omega, G, budget)
        assert config.parents == tree.parents and config.flops(G) <= budget * anchor_flops(G)
        mean_width[favourite] = [
            np.mean([config.width(layer, j) for layer in range(num_layers)]) for j in range(n)
        ]
    assert mean_width[0][0] > mean_width[0][1] and mean_width[1][1] > mean_width[1][0]


def test_a_preference_moves_shared_nodes_to_its_stream_with_their_widths():
    """Streams of equal cost: the shared trunk moves to the preferred task's stream, every
    node at the width it had, at the same price; without a preference nothing moves."""
    n, num_layers = 3, 4
    rng = np.random.default_rng(2)
    k = len(WIDTHS)
    per_layer = [_monotone(rng, 1 if layer == 0 else k, k) for layer in range(num_layers)]
    node = [[per_layer[layer]] * n for layer in range(num_layers)]  # equal streams
    head = [_monotone(rng, k, 1)] * n
    wc = WidthCosts(WIDTHS, node, node, head, head, (None,) * n)
    full = [[cell[-1][-1] for cell in row] for row in node]
    hfull = [cell[-1][-1] for cell in head]
    G = build_space([f"t{j}" for j in range(n)], full, full, hfull, hfull, wc)
    alpha = np.zeros((num_layers - 1, n, n))
    alpha[:, :, 0] = 1.0  # every node reads stream 0: the cheapest tree on trunk 0
    omega = np.zeros((num_layers, n, k))
    levels = [0, 2, 1, 2]  # widths 0.25, 1.0, 0.5, 1.0 down the trunk
    for layer, level in enumerate(levels):
        omega[layer, :, level] = 1.0
    plain = derive_configuration(alpha, omega, G, 1.0, spend=False)
    assert plain.path(1) == [0, 0, 0, 1]  # every task keeps its own last layer
    moved = derive_configuration(alpha, omega, G, 1.0, spend=False, preference=[0.1, 0.8, 0.1])
    assert moved.path(0) == [1, 1, 1, 0] and moved.path(2) == [1, 1, 1, 2]
    assert [moved.width(layer, 1) for layer in range(num_layers)] == [0.25, 1.0, 0.5, 1.0]
    assert moved.flops(G) == plain.flops(G)
