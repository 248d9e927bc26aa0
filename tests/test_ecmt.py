"""ECMT's rule on dymu's space: the preferred task's decoder widest, the encoder as wide as
the budget allows, every budget met or refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
from tiny import TINY

from dymu.baselines.ecmt import configuration, ecmt_configuration
from dymu.config import load_config
from dymu.data import get_builder
from dymu.errors import UserError
from dymu.models.anchor import build_anchor
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import anchor_flops

WIDTHS = (0.25, 0.5, 0.75, 1.0)


@pytest.fixture(scope="module")
def space():
    cfg = load_config(None, TINY)
    specs = list(get_builder(cfg.data.name).info_for(cfg.data).select(cfg.data.tasks))
    anchor = build_anchor(cfg.model, specs, seed=0)
    return anchor, anchor_space(anchor, (32, 32), WIDTHS)


def _narrowest(anchor, G) -> float:
    n, num_layers = len(anchor.tasks), anchor.num_layers
    return configuration(WIDTHS[0], [WIDTHS[0]] * n, num_layers).flops(G) / anchor_flops(G)


def test_the_preferred_decoder_is_widest_and_the_budget_holds(space):
    anchor, G = space
    last, low = anchor.num_layers - 1, _narrowest(anchor, G)  # the tiny heads cost much
    for budget in low + (1 - low) * np.array([0.0, 0.1, 0.3, 0.6]):
        config = ecmt_configuration([0.8, 0.1, 0.1], budget, G, WIDTHS)
        assert config.flops(G) <= budget * anchor_flops(G)
        decoders = [config.width(last, j) for j in range(3)]
        assert decoders[0] == max(decoders)
        assert config.parents == configuration(1.0, [1.0] * 3, anchor.num_layers).parents
    full_decoders = configuration(WIDTHS[0], [1.0] * 3, anchor.num_layers).flops(G)
    budget = full_decoders / anchor_flops(G) + 1e-9
    uniform = ecmt_configuration([1 / 3] * 3, budget, G, WIDTHS)
    assert {uniform.width(last, j) for j in range(3)} == {1.0}  # equal decoders, full width
    assert uniform.width(0, 0) == WIDTHS[0]
    wider = ecmt_configuration([1 / 3] * 3, 1.0, G, WIDTHS)
    assert wider.width(0, 0) == 1.0  # the whole budget: the full encoder


def test_a_budget_below_the_narrowest_configuration_is_one_error(space):
    _, G = space
    with pytest.raises(UserError, match="narrowest configuration"):
        ecmt_configuration(np.ones(3), 0.01, G, WIDTHS)
