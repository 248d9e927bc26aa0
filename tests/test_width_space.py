"""benchmarks/width_space.py: greedy widening spends what fits and never more; bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_derive_widths import WIDTHS, _space
from tiny import load_script

from dymu.space.graph import anchor_flops, min_flops
from dymu.space.tree import TreeSpec

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "width_space.py"


@pytest.fixture(scope="module")
def script():
    return load_script(PATH, "width_space_under_test")


def test_greedy_widening_fits_and_leaves_no_step_that_fits(script):
    G = _space(3, 4, 7)
    limit_of = anchor_flops(G)
    tree = TreeSpec.no_sharing(3, 4)
    for budget in (0.3, 0.6, 0.9):
        reached, config = script.greedy_spend(G, tree, budget)
        assert reached == config.flops(G) / limit_of <= budget
        for layer, j in config.used_nodes():
            w = config.width(layer, j)
            if w == WIDTHS[-1]:
                continue
            wider = [[config.width(a, b) for b in range(3)] for a in range(4)]
            wider[layer][j] = WIDTHS[WIDTHS.index(w) + 1]
            assert TreeSpec(config.parents, wider).flops(G) > budget * limit_of
    assert script.greedy_spend(G, tree, 1.0)[0] == 1.0  # budget 1 widens the anchor back
    cheapest = min_flops(G) / anchor_flops(G)
    assert math.isnan(script.greedy_spend(G, tree, cheapest)[0])  # no-sharing cannot fit


def test_bad_widths_are_one_line(script, capsys):
    assert script.main(["--widths", "half,1"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
