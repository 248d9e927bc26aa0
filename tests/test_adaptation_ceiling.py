"""benchmarks/adaptation_ceiling.py: the within-tree gaps it reports, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import load_script

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "adaptation_ceiling.py"


@pytest.fixture(scope="module")
def ceiling():
    return load_script(PATH, "adaptation_ceiling_under_test")


def test_corners_put_the_issue_weight_on_one_task(ceiling):
    r = ceiling.corner(3, 1)
    assert r.tolist() == pytest.approx([0.05, 0.9, 0.05])


def test_gap_is_own_corner_minus_the_others_mean_signed_so_better_is_positive(ceiling):
    # rows: the corner an adaptation was trained for; columns: each task's metric under it
    at = {
        "acc": {"acc": 90.0, "err": 0.30, "iou": 50.0},
        "err": {"acc": 86.0, "err": 0.20, "iou": 49.0},
        "iou": {"acc": 88.0, "err": 0.40, "iou": 53.0},
    }
    signs = {"acc": 1.0, "err": -1.0, "iou": 1.0}
    gaps = ceiling._gaps(at, signs)
    assert gaps["acc"] == pytest.approx(90.0 - 87.0)
    assert gaps["err"] == pytest.approx(-(0.20 - 0.35))  # a lower error at its corner: > 0
    assert gaps["iou"] == pytest.approx(53.0 - 49.5)


def test_a_folder_that_is_not_a_finished_run_is_one_line_and_status_2(ceiling, tmp_path, capsys):
    assert ceiling.main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"adaptation_ceiling: {tmp_path} is not a finished search run: config.yaml is missing"
    ]


def test_corner_gap_runs_each_corner_on_its_own_tree(ceiling):
    # left's corner derives tree A, right's tree B; under each tree, each corner's metrics
    out = {
        "tree_at_corner": {"left": "A", "right": "B"},
        "trees": [
            {
                "tree": "A",
                "trained_for_corner": {"left": {"left": 97.0, "right": 95.0}, "right": {}},
                "hypernet_at_corner": {"left": {"left": 96.8, "right": 95.2}, "right": {}},
            },
            {
                "tree": "B",
                "trained_for_corner": {"left": {}, "right": {"left": 95.5, "right": 96.5}},
                "hypernet_at_corner": {"left": {}, "right": {"left": 96.0, "right": 96.0}},
            },
        ],
    }
    gaps = ceiling.corner_gaps(out, {"left": 1.0, "right": 1.0})
    assert gaps["left"]["trained_for_corner"] == pytest.approx(97.0 - 95.5)
    assert gaps["right"]["trained_for_corner"] == pytest.approx(96.5 - 95.0)
    assert gaps["left"]["hypernet_at_corner"] == pytest.approx(96.8 - 96.0)
    assert gaps["right"]["hypernet_at_corner"] == pytest.approx(96.0 - 95.2)
