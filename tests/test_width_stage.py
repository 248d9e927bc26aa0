"""benchmarks/width_stage.py: bad input is one line and no work is started."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import load_script

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "width_stage.py"


@pytest.fixture(scope="module")
def script():
    return load_script(PATH, "width_stage_under_test")


def test_a_missing_run_is_one_line(script, tmp_path, capsys):
    assert script.main(["--run", str(tmp_path / "none"), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("width_stage: ") and err.count("\n") == 1
    assert not (tmp_path / "w").exists()


def test_static_baseline_figures_are_read_from_dymu_baselines(script):
    result = {"methods": {"static": {"flops_fraction": 0.34, "delta_m": -2.6, "points": 8}}}
    assert script._static(result) == {"flops_fraction": 0.34, "delta_m": -2.6}
    assert script._static({"methods": {}}) == {}
