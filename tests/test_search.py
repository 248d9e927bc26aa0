"""dymu search end to end on a tiny scene set, stage skipping, and dymu sample."""

from __future__ import annotations

import json
import math

import pytest
from tiny import TINY

from dymu.cli.main import main


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("search")
    run = tmp / "run"
    argv = ["search", "--run", str(run), *TINY, f"data.cache_dir={tmp / 'cache'}"]
    assert main(argv) == 0
    return run, argv


def test_search_writes_every_artifact_and_the_report(searched):
    run, _ = searched
    for name in (
        "config.yaml",
        "env.json",
        "anchor.safetensors",
        "anchor.json",
        "affinity.json",
        "affinity.png",
        "space.json",
        "edge_hnet.safetensors",
        "weight_hnet.safetensors",
        "report.json",
        "report.md",
        "flops_vs_budget.png",
        "fronts.png",
    ):
        assert (run / name).is_file(), name
    report = json.loads((run / "report.json").read_text())
    for key in (
        "tasks",
        "hypervolume",
        "uniformity",
        "delta_m",
        "controllability",
        "budget_adherence",
        "flops",
    ):
        assert key in report
    for b in report["budgets"]:
        k = f"{b:g}"
        assert report["budget_adherence"][k] == 1.0
        assert report["flops"][k]["max"] <= b + 1e-9
        assert set(report["controllability"][k]) == set(report["tasks"])
    assert "reference_point" in report["hypervolume"]
    # The one-epoch anchor scores 0 on some metric (e.g. normals within 11.25 degrees):
    # exactly those metrics leave delta_m, and every delta_m stays finite.
    base = report["baseline"]["metrics"]
    zero = sorted(f"{t}/{m}" for t, ms in base.items() for m, v in ms.items() if v == 0)
    assert sorted(report["delta_m_excluded"]) == zero and zero
    assert all(math.isfinite(v) for v in report["delta_m"].values())


def test_a_second_search_skips_finished_stages(searched, capsys):
    _, argv = searched
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "stage 0: using" in out and "stage 1: using" in out and "stage 2: using" in out


def test_sample_prints_and_writes_a_tree(searched, capsys):
    run, _ = searched
    assert (
        main(
            ["sample", "--run", str(run), "--preference", "0.5,0.3,0.2", "--budget", "1", "--json"]
        )
        == 0
    )
    record = json.loads(capsys.readouterr().out)
    assert set(record) >= {"hash", "parents", "flops", "flops_fraction", "params"}
    assert (run / "trees" / f"{record['hash']}.json").is_file()
    assert record["flops_fraction"] <= 1.0


@pytest.mark.parametrize(
    ("preference", "budget", "message"),
    [
        ("0.5,0.5", "1", "needs 3 weights"),
        ("0.5,0.3,0.3", "1", "must sum to 1"),
        ("0.5,nan,0.5", "1", "finite"),
        ("1.2,-0.2,0", "1", ">= 0"),
        ("0.5,0.3,0.2", "1.5", "budget must be in (0, 1]"),
        ("0.5,0.3,0.2", "0.01", "below the cheapest tree"),
        ("a,b,c", "1", "numbers separated by commas"),
    ],
)
def test_sample_rejects_bad_input_with_one_line(searched, capsys, preference, budget, message):
    run, _ = searched
    code = main(["sample", "--run", str(run), "--preference", preference, "--budget", budget])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
