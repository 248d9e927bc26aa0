"""benchmarks/preference_control.py: the issue's targets and the static models' own lever,
read from a run's report and baselines, on hand-made files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import load_script

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "preference_control.py"


@pytest.fixture(scope="module")
def pc():
    return load_script(PATH, "preference_control_under_test")


def _gain(own: float, other: float) -> dict:
    return {
        "metric": "accuracy",
        "higher_is_better": True,
        "own_corner": own,
        "uniform": own - 0.5,
        "gain": 0.5,
        "loss_gain": 0.01,
        "vs_others": own - other,
    }


def _point(preference: list[float], left: float, right: float) -> dict:
    """One static model's test point."""
    metrics = {"left": {"accuracy": left}, "right": {"accuracy": right}}
    return {"preference": preference, "metrics": metrics}


def _write_run(folder: Path, seed: int, vs_left: float, with_static: bool) -> Path:
    """A run whose two budgets (0.6 cheapest, 0.75) share one set of figures."""
    folder.mkdir()
    (folder / "config.yaml").write_text(f"run:\n  seed: {seed}\n")
    per_budget = {
        "0.6": {"left": 0.8, "right": 0.7},
        "0.75": {"left": 0.8, "right": 0.7},
    }
    corner = {"tasks": {"left": _gain(97.0, 97.0 - vs_left), "right": _gain(96.0, 94.0)}}
    report = {
        "budgets": [0.6, 0.75],
        "min_flops_fraction": 0.6,
        "flops": {k: {"mean": float(k)} for k in per_budget},
        "delta_m": {k: -1.0 for k in per_budget},
        "distinct_trees": {k: 2 for k in per_budget},
        "controllability": per_budget,
        "controllability_loss": per_budget,
        "corner_gain": {k: corner for k in per_budget},
        "hypervolume": {k: 0.1 for k in per_budget},
    }
    (folder / "report.json").write_text(json.dumps(report))
    if with_static:
        points = [
            _point([0.9, 0.1], 97.5, 90.0),
            _point([0.5, 0.5], 97.2, 95.0),
            _point([0.25, 0.75], 96.5, 95.5),
        ]
        (folder / "baselines").mkdir()
        (folder / "baselines" / "static.json").write_text(json.dumps({"points": points}))
    return folder


def test_corner_gap_target_and_static_lever(pc, tmp_path, capsys):
    met = _write_run(tmp_path / "met", 0, vs_left=1.6, with_static=True)
    missed = _write_run(tmp_path / "missed", 1, vs_left=1.4, with_static=False)
    out = tmp_path / "out.json"
    argv = ["--kind", "two_task", "--run", str(met), "--run", str(missed), "--out", str(out)]
    assert pc.main(argv) == 0
    result = json.loads(out.read_text())
    first, second = result["targets"].values()
    assert first["0.6 own corner vs other"]["met"] is True
    assert second["0.6 own corner vs other"]["met"] is False
    assert second["0.6 own corner vs other"]["got"] == pytest.approx(1.4)
    # the static models' lever: most weight on a task minus least, per task
    span = result["runs"][0]["static_span"]
    assert span["left"]["gap"] == pytest.approx(97.5 - 96.5)
    assert (span["left"]["most_weight"], span["left"]["least_weight"]) == (0.9, 0.25)
    assert span["right"]["gap"] == pytest.approx(95.5 - 90.0)
    assert "static_span" not in result["runs"][1]  # no baselines: nothing invented
    assert (
        "static models, right: 95.50 at weight 0.75, 90.00 at 0.10 (+5.50)"
        in capsys.readouterr().out
    )


def test_a_missing_run_is_one_line_and_exit_2(pc, tmp_path, capsys):
    assert pc.main(["--kind", "two_task", "--run", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preference_control: cannot read a run")


def _write_validated(folder: Path, config: str, losses: list[list[float]], test_dm: float) -> Path:
    """A run with a validation section at one budget (0.5): its rows' losses, against a
    single-task baseline of 1.0 per task."""
    folder.mkdir()
    (folder / "config.yaml").write_text(config)
    rows = [{"budget": 0.5, "losses": row, "tree": f"t{i % 2}"} for i, row in enumerate(losses)]
    validation = {
        "baseline": {"losses": [1.0, 1.0]},
        "rows": rows,
        "delta_m": {"0.5": -1.0 - test_dm},
        "controllability": {"0.5": {"left": 0.5, "right": 0.5}},
    }
    test_spearman = {"0.5": {"left": 0.25, "right": -0.25}}
    report = {"delta_m": {"0.5": test_dm}, "controllability": test_spearman}
    report["validation"] = validation
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_validation_choice_shows_settings_and_test_delta_m_beside(pc, tmp_path):
    first = _write_validated(tmp_path / "a", "run:\n  seed: 0\n", [[1.0, 1.2], [1.2, 1.0]], -1.0)
    config = "run:\n  seed: 0\nstage2:\n  adapter_rank: 0\n"
    worse = _write_validated(tmp_path / "b", config, [[1.1, 1.3], [1.3, 1.1]], -2.0)
    choice = pc._choice(first, [worse])["0.5"]
    a, b = choice[str(first)], choice[str(worse)]
    assert a["setting"] == {} and b["setting"] == {"stage2.adapter_rank": 0}
    assert (a["test_delta_m"], b["test_delta_m"]) == (-1.0, -2.0)
    assert a["test_spearman"] == {"left": 0.25, "right": -0.25}  # test's, not validation's
    assert a["spearman"] == {"left": 0.5, "right": 0.5}
    assert a["test_vs_others"] is None  # a report without corner gains: nothing invented
    assert (a["delta_m"], b["delta_m"]) == (0.0, 1.0)  # the validation figures decide
    assert a["hypervolume"] > b["hypervolume"] > 0  # b is dominated, on one reference point
    assert (a["distinct_trees"], b["distinct_trees"]) == (2, 2)
    # another anchor: no comparison
    other = _write_validated(tmp_path / "c", "run:\n  seed: 1\n", [[1.0, 1.0]], 0.0)
    other_report = json.loads((other / "report.json").read_text())
    other_report["validation"]["baseline"]["losses"] = [2.0, 1.0]
    (other / "report.json").write_text(json.dumps(other_report))
    with pytest.raises(ValueError, match="different single-task anchors"):
        pc._choice(first, [other])
