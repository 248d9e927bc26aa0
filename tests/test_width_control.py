"""benchmarks/width_control.py: corner gaps and Spearmans from its rows; bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import load_script

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "width_control.py"


@pytest.fixture(scope="module")
def script():
    return load_script(PATH, "width_control_under_test")


def _row(r, acc_a, err_b, h):
    split = {"a": acc_a, "b": err_b}
    return {"preference": r, "flops_fraction": 0.5, "config": {"hash": h}, "val": split,
            "test": split}  # fmt: skip


def test_gaps_are_signed_so_better_is_positive_and_spearman_follows_the_sweep(script):
    rows = {
        "uniform": _row([0.5, 0.5], 90.0, 0.30, "u"),
        "a": _row([0.9, 0.1], 92.0, 0.40, "x"),  # a's corner: a up, b's error up
        "b": _row([0.1, 0.9], 88.0, 0.20, "y"),
        "sweep 0": _row([0.2, 0.8], 89.0, 0.25, "y"),
        "sweep 1": _row([0.5, 0.5], 90.0, 0.30, "u"),
        "sweep 2": _row([0.8, 0.2], 91.0, 0.35, "x"),
    }
    out = script._summary(rows, ["a", "b"], 2, {"a": 1.0, "b": -1.0})
    assert out["val"]["corner_gap"]["a"] == pytest.approx(4.0)
    assert out["val"]["corner_gap"]["b"] == pytest.approx(0.2)  # lower error at its corner
    assert out["val"]["spearman"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    assert out["configurations"] == 3


def test_a_run_without_a_width_stage_is_one_line(script, tmp_path, capsys):
    argv = ["--run", str(tmp_path), "--slim", str(tmp_path / "none")]
    assert script.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("width_control: ") and err.count("\n") == 1
