"""Edge hypernet: shapes, start near the anchor, Gumbel sampling and the temperature schedule."""

from __future__ import annotations

import pytest
import torch

from dymu.hypernet.edge import EdgeHypernet, sample_parents, temperature


def test_shapes_and_probabilities():
    net = EdgeHypernet(3, 5)
    r = torch.tensor([0.2, 0.3, 0.5])
    logits = net(r, 0.5)
    assert logits.shape == (4, 3, 3)
    alpha = net.alpha(r, 0.5)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(4, 3))


def test_starts_near_the_no_sharing_tree():
    """At the default self_bias (2) every node's own stream carries e^2 / (e^2 + 3) = 0.71 of
    its parent distribution, give or take the small random head weights; 0 gives 1/4."""
    torch.manual_seed(0)
    r = torch.full((4,), 0.25)
    own = EdgeHypernet(4, 3).alpha(r, 1.0).diagonal(dim1=-2, dim2=-1)  # [L-1, N]
    assert own.min() > 0.6 and own.max() < 0.8
    flat = EdgeHypernet(4, 3, self_bias=0.0).alpha(r, 1.0).diagonal(dim1=-2, dim2=-1)
    assert flat.max() < 0.35


def test_conditioning_changes_the_output_and_gradients_flow():
    net = EdgeHypernet(3, 3)
    a = net(torch.tensor([1.0, 0.0, 0.0]), 0.3)
    b = net(torch.tensor([0.0, 0.0, 1.0]), 0.9)
    assert not torch.allclose(a, b)
    (a - b).square().sum().backward()
    assert net.task_embed.grad.abs().sum() > 0 and net.budget_embed.grad.abs().sum() > 0


def test_soft_and_hard_gumbel_samples():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, requires_grad=True)
    soft = sample_parents(logits, 1.0, generator=g)
    torch.testing.assert_close(soft.sum(-1), torch.ones(2, 3))
    hard = sample_parents(logits, 1.0, hard=True, generator=g)
    values = hard.detach()
    assert torch.allclose(values, values.round(), atol=1e-6)  # one-hot up to rounding
    assert (values.round().sum(-1) == 1).all()
    torch.testing.assert_close(hard.sum(-1), torch.ones(2, 3))
    (hard * torch.arange(3.0)).sum().backward()  # straight-through: the soft sample's gradient
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_low_temperature_samples_follow_alpha():
    logits = torch.log(torch.tensor([[[0.7, 0.2, 0.1]]]))
    g = torch.Generator().manual_seed(1)
    picks = torch.stack(
        [sample_parents(logits, 0.1, hard=True, generator=g).argmax(-1) for _ in range(4000)]
    )
    freq = torch.bincount(picks.flatten(), minlength=3) / picks.numel()
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


@pytest.mark.parametrize(("step", "value"), [(0, 5.0), (299, 5.0), (300, 4.85), (900, 5 * 0.97**3)])
def test_temperature_schedule(step, value):
    assert temperature(step) == pytest.approx(value)


def test_budget_becomes_the_frugality_knob_and_batches_match_single_draws():
    net = EdgeHypernet(3, 4, min_budget=0.4)
    c = net.frugality(torch.tensor([0.4, 0.7, 1.0]))
    torch.testing.assert_close(c, torch.tensor([1.0, 0.5, 0.0]))
    assert float(net.frugality(0.1)) == 1.0  # below the minimum: clipped
    r, b = torch.rand(5, 3).softmax(-1), torch.rand(5)
    batched = net(r, b)
    assert batched.shape == (5, 3, 3, 3)
    torch.testing.assert_close(batched[3], net(r[3], float(b[3])))
    assert float(net.state_dict()["min_budget"]) == pytest.approx(0.4)  # saved with weights
    with pytest.raises(ValueError, match="min_budget"):
        EdgeHypernet(3, 4, min_budget=1.0)
