"""Stage-1 losses (METHOD.md 1.5): hand values, masks, gradients, P_use vs brute force."""

from __future__ import annotations

import pytest
import torch

from dymu.losses import (
    active_mask,
    budget_penalty,
    budget_target,
    expected_flops,
    l_active,
    l_inactive,
    omega,
    omega_budget,
    p_use,
    task_loss,
)
from dymu.space.graph import anchor_flops, build_space, costs
from dymu.space.tree import TreeSpec, enumerate_trees

F64 = torch.float64
E = torch.eye(3, dtype=F64)  # one-hot parent rows e0, e1, e2

# N=3, L=3 hand example. nu[l-1, j, i] = P(node (l, j) picks parent (l-1, i)).
NU = torch.tensor(
    [
        [[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.5, 0.0, 0.5]],  # parents of layer-1 nodes
        [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]],  # parents of layer-2 nodes
    ],
    dtype=F64,
)
# P_use(1, i) = 1 - prod_k (1 - nu[1, k, i]):  [1, 1 - .5 * .5, 1 - .5] = [1, .75, .5]
# P_use(0, 0) = 1 - (1 - .5)(1 - 0)(1 - .5 * .5) = .625
# P_use(0, 1) = 1 - (1 - .5)(1 - .75)(1 - 0)     = .875
# P_use(0, 2) = 1 - (1)(1)(1 - .5 * .5)          = .25
NU_P_USE = torch.tensor([[0.625, 0.875, 0.25], [1.0, 0.75, 0.5], [1.0, 1.0, 1.0]], dtype=F64)

# Parent weights: layer-1 nodes pick (e0, e1, e0), layer-2 nodes pick (e0, e0, e2).
V = torch.stack([torch.stack([E[0], E[1], E[0]]), torch.stack([E[0], E[0], E[2]])])
A = torch.tensor([[1.0, 0.5, 0.2], [0.5, 1.0, 0.8], [0.2, 0.8, 1.0]], dtype=F64)
P_HAND = torch.tensor([[0.3, 0.3, 0.3], [1.0, 0.5, 0.25], [1.0, 1.0, 1.0]], dtype=F64)
R_ALL = torch.full((3,), 1 / 3, dtype=F64)
R_ONE_OFF = torch.tensor([0.7, 0.25, 0.05], dtype=F64)  # tau = 0.2: task 2 inactive
R_TWO_OFF = torch.tensor([0.9, 0.05, 0.05], dtype=F64)  # only task 0 active

FLOPS = torch.tensor([[1, 2, 3], [10, 20, 30], [100, 200, 300]], dtype=F64)
HEADS = torch.ones(3, dtype=F64)


def brute_p_use(nu: torch.Tensor) -> torch.Tensor:
    """Exact P(node (l, i) used) with independent parent choices: sum over ALL trees."""
    n, num_layers = nu.shape[1], nu.shape[0] + 1
    trees = list(enumerate_trees(n, num_layers))
    parents = torch.tensor([t.parents for t in trees])  # [T, L-1, N]
    used = torch.tensor([t.used() for t in trees], dtype=nu.dtype)  # [T, L, N]
    chosen = nu[None].expand(len(trees), -1, -1, -1).gather(-1, parents[..., None])
    prob = chosen.squeeze(-1).flatten(1).prod(-1)  # [T]
    assert torch.allclose(prob.sum(), torch.ones((), dtype=nu.dtype))
    return (prob[:, None, None] * used).sum(0)  # [L, N]


def random_nu(n: int, num_layers: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(num_layers - 1, n, n, generator=g, dtype=F64) * scale).softmax(-1)


def one_hot_nu(tree: TreeSpec) -> torch.Tensor:
    n = tree.num_tasks
    return torch.nn.functional.one_hot(torch.tensor(tree.parents), n).to(F64)


# -- P_use ---------------------------------------------------------------------------------


def test_p_use_hand_values():
    assert torch.allclose(p_use(NU), NU_P_USE)
    assert torch.allclose(brute_p_use(NU)[1:], NU_P_USE[1:])  # top two layers: exact


@pytest.mark.parametrize("n", [2, 3])
def test_p_use_exact_when_two_layers(n):
    for seed in range(5):
        nu = random_nu(n, 2, seed)
        assert torch.allclose(p_use(nu), brute_p_use(nu), atol=1e-12)


@pytest.mark.parametrize(("n", "num_layers"), [(2, 2), (2, 3), (3, 2), (3, 3), (2, 4)])
def test_p_use_exact_top_two_layers_approximate_below(n, num_layers):
    worst = 0.0
    for seed in range(5):
        nu = random_nu(n, num_layers, seed)
        rec, exact = p_use(nu), brute_p_use(nu)
        # layer L-1 is always used; layer L-2 sees deterministic usage above: exact.
        assert torch.allclose(rec[-2:], exact[-2:], atol=1e-12)
        # below, the mean-field product underestimates (never overestimated in our runs).
        dev = rec[:-2] - exact[:-2]
        assert (dev <= 1e-12).all()
        worst = max(worst, float(dev.abs().max()) if dev.numel() else 0.0)
    assert worst < 0.25


def test_p_use_not_exact_in_general():
    # N=2, L=3, uniform parents: layer 1 used sets {0,1} w.p. 1/2, {0} or {1} w.p. 1/4 each,
    # so exactly P((0, i) used) = 1/2 * 3/4 + 1/2 * 1/2 = 0.625; the recursion gives
    # 1 - (1 - 0.75 * 0.5) ** 2 = 0.609375.
    nu = torch.full((2, 2, 2), 0.5, dtype=F64)
    assert torch.allclose(brute_p_use(nu)[0], torch.full((2,), 0.625, dtype=F64))
    assert torch.allclose(p_use(nu)[0], torch.full((2,), 0.609375, dtype=F64))


def test_p_use_exact_for_deterministic_trees():
    for tree in enumerate_trees(2, 4):
        expected = torch.tensor(tree.used(), dtype=F64)
        assert torch.equal(p_use(one_hot_nu(tree)), expected)


def test_p_use_gradients_finite_also_at_one_hot():
    for nu in (
        random_nu(3, 4, 0).requires_grad_(),
        one_hot_nu(TreeSpec(((0, 0, 1), (2, 2, 2)))).requires_grad_(),
    ):
        p_use(nu).sum().backward()
        assert torch.isfinite(nu.grad).all()
    with pytest.raises(ValueError, match="L-1, N, N"):
        p_use(torch.ones(2, 3, 2))


# -- task loss and activity --------------------------------------------------------------


def test_task_loss_hand_value():
    losses = torch.tensor([2.0, 4.0, 1.0], dtype=F64, requires_grad=True)
    r = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    scales = torch.tensor([0.5, 0.1, 2.0], dtype=F64)
    out = task_loss(losses, r, scales)  # .5*.5*2 + .25*.1*4 + .25*2*1 = .5 + .1 + .5
    assert out.item() == pytest.approx(1.1)
    out.backward()
    assert torch.allclose(losses.grad, r * scales)


def test_active_mask():
    assert active_mask(R_ALL).tolist() == [True, True, True]
    assert active_mask(R_ONE_OFF).tolist() == [True, True, False]
    assert active_mask(R_TWO_OFF).tolist() == [True, False, False]
    assert active_mask(torch.tensor([0.6, 0.2, 0.2])).tolist() == [True, True, True]  # r = tau
    assert active_mask(R_ONE_OFF, tau=0.3).tolist() == [True, False, False]
    assert not active_mask(R_ONE_OFF, tau=0.9).any()
    mixed = torch.tensor([0.1, 0.15, 0.75])
    assert active_mask(mixed, tau=None).tolist() == [False, False, True]


# -- L_active -------------------------------------------------------------------------------


def test_l_active_hand_values():
    # layer 1 (v[0], weight 2/3, P_use [1, .5, .25]): d01 = 2, d02 = 0, d12 = 2;
    #   ordered pairs: 2 * (.5 * 1 * .5 * 2 + .8 * .5 * .25 * 2) = 1.4 -> 2/3 * 1.4 = 14/15
    # layer 2 (v[1], weight 1/3, P_use 1): d01 = 0, d02 = 2, d12 = 2;
    #   2 * (.2 * 2 + .8 * 2) = 4 -> 4/3 = 20/15
    assert l_active(V, A, R_ALL, P_HAND).item() == pytest.approx(34 / 15)
    # task 2 inactive: only the pair (0, 1): 2/3 * 2 * .5 * .5 * 2 + 0 = 2/3
    assert l_active(V, A, R_ONE_OFF, P_HAND).item() == pytest.approx(2 / 3)
    assert l_active(V, A, R_TWO_OFF, P_HAND).item() == 0.0  # one active task: no pair
    assert l_active(V, A, R_ALL, P_HAND, tau=0.5).item() == 0.0  # none active
    with pytest.raises(ValueError, match="p_use"):
        l_active(V, A, R_ALL, P_HAND[1:])


def test_l_active_ignores_layer0_p_use_and_self_pairs():
    p = P_HAND.clone()
    p[0] = 123.0  # layer-0 nodes choose no parent: not part of the sum
    a = A.clone()
    a.fill_diagonal_(50.0)  # i == j pairs are excluded
    assert l_active(V, a, R_ALL, p).item() == pytest.approx(34 / 15)


# -- L_inactive -----------------------------------------------------------------------------


def test_l_inactive_hand_values():
    # task 2 inactive, active {0, 1}: layer 1 min(d02 = 0, d12 = 2) = 0;
    # layer 2 min(d02 = 2, d12 = 2) = 2
    assert l_inactive(V, R_ONE_OFF).item() == pytest.approx(2.0)
    # only task 0 active: task 1 -> (2 + 0), task 2 -> (0 + 2)
    assert l_inactive(V, R_TWO_OFF).item() == pytest.approx(4.0)
    # soft row: v[0, 2] = (.5, .5, 0) is .5 from both e0 and e1
    v = V.clone()
    v[0, 2] = torch.tensor([0.5, 0.5, 0.0], dtype=F64)
    assert l_inactive(v, R_ONE_OFF).item() == pytest.approx(0.5 + 2.0)


def test_l_inactive_zero_without_inactive_or_active_tasks():
    v = V.clone().requires_grad_()
    for r, tau in ((R_ALL, None), (R_ONE_OFF, 0.9)):
        out = l_inactive(v, r, tau)
        assert out.item() == 0.0 and out.dtype == F64
        out.backward()  # still part of the graph
        assert torch.equal(v.grad, torch.zeros_like(v))


# -- Omega ------------------------------------------------------------------------------------


def test_omega_hand_values():
    assert omega(V, A, R_ALL, P_HAND, c=0.5).item() == pytest.approx(0.5 * 34 / 15)
    # c * lambda_A * 2/3 + lambda_I * 2
    assert omega(V, A, R_ONE_OFF, P_HAND, c=0.5).item() == pytest.approx(1 / 3 + 0.2)
    out = omega(V, A, R_ONE_OFF, P_HAND, c=1.0, lambda_a=2.0, lambda_i=0.05)
    assert out.item() == pytest.approx(4 / 3 + 0.1)
    assert omega(V, A, R_ONE_OFF, P_HAND, c=0.0).item() == pytest.approx(0.2)


def test_branching_gradients_flow():
    logits = torch.randn(2, 3, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    logits.requires_grad_()
    v = logits.softmax(-1)
    pu = p_use(v).detach()
    loss = omega(v, A, R_ONE_OFF, pu, c=0.7)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    # the active term pulls similar active tasks' parent rows together
    v0 = logits.detach().softmax(-1)
    step = v0 - 0.1 * torch.autograd.functional.jacobian(lambda x: l_active(x, A, R_ALL, pu), v0)
    assert l_active(step, A, R_ALL, pu) < l_active(v0, A, R_ALL, pu)


# -- expected FLOPs and budget ----------------------------------------------------------------


def test_expected_flops_hand_value():
    # layer 0: .625 + .875 * 2 + .25 * 3 = 3.125; layer 1: 10 + 15 + 15 = 40;
    # layer 2: 600; heads: 3
    assert expected_flops(NU, FLOPS, HEADS).item() == pytest.approx(646.125)
    with pytest.raises(ValueError, match="node_flops"):
        expected_flops(NU, FLOPS[1:], HEADS)


def test_expected_flops_equals_tree_flops_for_every_tree():
    node = [[7, 3, 5], [11, 13, 2], [17, 19, 23]]
    heads = [1, 4, 9]
    G = build_space(["a", "b", "c"], node, [[1] * 3] * 3, heads, [1] * 3)
    flops, _, hflops, _ = costs(G)
    node_t, heads_t = torch.tensor(flops, dtype=F64), torch.tensor(hflops, dtype=F64)
    for tree in enumerate_trees(3, 3):
        assert expected_flops(one_hot_nu(tree), node_t, heads_t).item() == tree.flops(G)
    anchor = TreeSpec.no_sharing(3, 3)
    assert expected_flops(one_hot_nu(anchor), node_t, heads_t).item() == anchor_flops(G)


def test_budget_penalty_hand_values_and_gradient():
    anchor = 669.0  # 6 + 60 + 600 + 3
    frac = 646.125 / anchor
    assert budget_penalty(NU, FLOPS, HEADS, 0.9, anchor).item() == pytest.approx((frac - 0.9) ** 2)
    assert budget_penalty(NU, FLOPS, HEADS, 1.0, anchor).item() == 0.0
    assert budget_penalty(NU, FLOPS, HEADS, frac, anchor).item() == pytest.approx(0.0)
    logits = NU.clamp_min(1e-3).log().requires_grad_()
    pen = budget_penalty(logits.softmax(-1), FLOPS, HEADS, 0.5, anchor)
    pen.backward()
    assert pen.item() > 0 and torch.isfinite(logits.grad).all()
    # a gradient step on the parent logits lowers the expected FLOPs
    with torch.no_grad():
        lower = expected_flops((logits - 10.0 * logits.grad).softmax(-1), FLOPS, HEADS)
        assert lower < expected_flops(logits.softmax(-1), FLOPS, HEADS)
    nu = NU.clone().requires_grad_()
    budget_penalty(nu, FLOPS, HEADS, 1.0, anchor).backward()
    assert torch.equal(nu.grad, torch.zeros_like(nu))  # within budget: no pull


def test_pairs_are_ordered():
    # a single active pair counts as (0, 1) and (1, 0): 2 * A01 * d01 at the top layer
    v = torch.stack([torch.stack([E[0], E[0], E[0]]), torch.stack([E[0], E[1], E[2]])])
    r = torch.tensor([0.5, 0.5, 0.0], dtype=F64)
    ones = torch.ones(3, 3, dtype=F64)
    assert l_active(v, A, r, ones).item() == pytest.approx(1 / 3 * 2 * 0.5 * 2)


# -- the budget objective (METHOD.md 1.9) ----------------------------------------------------


def test_mean_terms_divide_by_layers_and_pairs():
    # 2 choosing layers; R_ALL has 6 ordered active pairs, R_ONE_OFF 2 (and 1 inactive task)
    assert l_active(V, A, R_ALL, P_HAND, mean=True).item() == pytest.approx(34 / 15 / 12)
    assert l_active(V, A, R_ONE_OFF, P_HAND, mean=True).item() == pytest.approx(2 / 3 / 4)
    assert l_inactive(V, R_ONE_OFF, mean=True).item() == pytest.approx(2.0 / 2)
    assert l_inactive(V, R_TWO_OFF, mean=True).item() == pytest.approx(4.0 / 4)


def test_omega_budget_scales_all_of_omega_by_the_pressure():
    # 0.5 * (1 * 1/6 + 0.1 * 1): the inactive term is scaled too (the paper's is not)
    got = omega_budget(V, A, R_ONE_OFF, P_HAND, 0.5).item()
    assert got == pytest.approx(0.5 * (1 / 6 + 0.1))
    assert omega_budget(V, A, R_ONE_OFF, P_HAND, 0.0).item() == 0.0  # budget 1: no pressure
    assert omega(V, A, R_ONE_OFF, P_HAND, c=0.0).item() > 0  # the paper's shares at any c


def test_budget_target_charges_both_sides():
    anchor = 669.0
    frac = 646.125 / anchor
    over = budget_target(NU, FLOPS, HEADS, 0.9, anchor, under=2.0).item()
    assert over == pytest.approx((frac - 0.9) ** 2)
    under = budget_target(NU, FLOPS, HEADS, 1.0, anchor, under=2.0).item()
    assert under == pytest.approx(2.0 * (1.0 - frac) ** 2)
    nu = NU.clamp_min(1e-3).log().requires_grad_()
    budget_target(nu.softmax(-1), FLOPS, HEADS, 1.0, anchor, under=2.0).backward()
    with torch.no_grad():  # below the budget, a gradient step raises the expected FLOPs
        higher = expected_flops((nu - 10.0 * nu.grad).softmax(-1), FLOPS, HEADS)
        assert higher > expected_flops(nu.softmax(-1), FLOPS, HEADS)
