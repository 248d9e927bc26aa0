"""Expected FLOPs over parent and width distributions: exact for one-hot choices and, on
two layers, equal to the expectation by enumeration; gradients reach the widths."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from test_derive_widths import WIDTHS, _space

from dymu.losses.width_flops import WidthTables, expected_flops_widths
from dymu.space.tree import TreeSpec


def _one_hot(index, k: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(index), k).double()


def test_one_hot_choices_cost_exactly_their_configuration():
    G = _space(3, 4, 8)
    tables = WidthTables.of(G)
    rng = np.random.default_rng(8)
    for _ in range(30):
        tree = TreeSpec.random(3, 4, rng)
        level = rng.integers(0, len(WIDTHS), (4, 3))
        nu = _one_hot(np.asarray(tree.parents), 3)  # [L-1, N, N]
        omega = _one_hot(level, len(WIDTHS))  # [L, N, K]
        spec = TreeSpec(tree.parents, [[WIDTHS[i] for i in row] for row in level])
        assert expected_flops_widths(nu, omega, tables).item() == spec.flops(G)


def test_two_layers_match_the_expectation_by_enumeration():
    n, num_layers, k = 2, 2, len(WIDTHS)
    G = _space(n, num_layers, 9)
    rng = np.random.default_rng(9)
    nu = torch.tensor(rng.dirichlet(np.ones(n), size=(num_layers - 1, n)))  # [1, N, N]
    omega = torch.tensor(rng.dirichlet(np.ones(k), size=(num_layers, n)))  # [L, N, K]
    want = 0.0
    for parents in itertools.product(range(n), repeat=n):
        p_tree = float(np.prod([nu[0, j, p] for j, p in enumerate(parents)]))
        for level in itertools.product(range(k), repeat=n * num_layers):
            lv = np.reshape(level, (num_layers, n))
            p = p_tree * float(np.prod([omega[a, b, lv[a, b]] for a in range(2) for b in range(n)]))
            spec = TreeSpec([list(parents)], [[WIDTHS[i] for i in row] for row in lv])
            want += p * spec.flops(G)
    got = expected_flops_widths(nu, omega, WidthTables.of(G)).item()
    assert abs(got - want) <= 1e-9 * want


def test_the_width_distributions_get_gradients():
    G = _space(3, 4, 10)
    nu = torch.full((3, 3, 3), 1 / 3, dtype=torch.float64, requires_grad=True)
    omega = torch.full((4, 3, len(WIDTHS)), 1 / len(WIDTHS), dtype=torch.float64)
    omega.requires_grad_(True)
    expected_flops_widths(nu, omega, WidthTables.of(G)).backward()
    # wider is dearer: the gradient rises with the width index at every node
    assert (omega.grad[..., 1:] > omega.grad[..., :-1]).all()
    assert nu.grad.abs().sum() > 0
