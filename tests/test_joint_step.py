"""benchmarks/joint_step.py: bad input is one line and exit 2 (its timings are benchmarks,
not tests; the sharing it times is checked in tests/test_anchor.py)."""

from __future__ import annotations

from pathlib import Path

from tiny import load_script

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "joint_step.py"


def _script():
    return load_script(PATH, "joint_step_under_test")


def test_a_refused_override_is_one_line_and_exit_2(capsys):
    assert _script().main(["joint.no_such_key=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("joint_step: ")
