"""dymu search end to end on a tiny scene set, stage skipping, and dymu sample."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tiny import TINY

from dymu.cli.main import main
from dymu.evaluate.metrics import controllability


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
        "joint.safetensors",
        "joint.json",
        "edge_hnet.safetensors",
        "weight_hnet.safetensors",
        "report.json",
        "report.md",
        "flops_vs_budget.png",
        "fronts.png",
        "curves.png",
        "logs/stage0.jsonl",
        "logs/joint.jsonl",
        "logs/stage1.jsonl",
        "logs/stage2.jsonl",
    ):
        assert (run / name).is_file(), name
    assert "![training curves](curves.png)" in (run / "report.md").read_text()
    stage1 = [json.loads(line) for line in (run / "logs/stage1.jsonl").read_text().splitlines()]
    assert [r["step"] for r in stage1] == [0, 5]  # every 10 steps and the last of 6
    assert {"loss", "task", "omega", "budget", "temperature", "lr", "flops_fraction"} <= set(
        stage1[0]
    )
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
        for t, span in report["control_range"][k].items():  # the sweep's range of the metric
            values = [
                row["metrics"][t][span["metric"]] for row in report["rows"] if row["budget"] == b
            ]
            assert (span["min"], span["max"]) == (min(values), max(values))
        rows = [row for row in report["rows"] if row["budget"] == b]  # the same on the losses
        on_loss = controllability(
            np.array([row["losses"] for row in rows]),
            np.array([row["preference"] for row in rows]),
            [False] * len(report["tasks"]),
        )
        expected = dict(zip(report["tasks"], on_loss.tolist(), strict=True))
        assert report["controllability_loss"][k] == pytest.approx(expected)
        assert f", loss {on_loss[0]:+.2f}" in (run / "report.md").read_text()
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
    assert "joint stage: using" in out


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


def test_uniformity_is_taken_on_normalised_losses(searched):
    from dymu.evaluate.metrics import uniformity

    run, _ = searched
    report = json.loads((run / "report.json").read_text())
    base = np.array(report["baseline"]["losses"])
    assert not np.allclose(base, 1.0)  # raw and normalised losses differ here
    prefs = np.array(report["preferences"])
    for b in report["budgets"]:
        rows = [r for r in report["rows"] if r["budget"] == b]
        losses = np.array([r["losses"] for r in rows])
        # (the report's preferences are rounded to 6 decimals)
        got = report["uniformity"][f"{b:g}"]
        assert got == pytest.approx(uniformity(losses / base, prefs), abs=1e-5)
        assert abs(got - uniformity(losses, prefs)) > 1e-3


def test_the_cheapest_trees_budget_is_evaluated_and_delta_m_weighted_by_preference(searched):
    from dymu.tasks.delta import delta_m_per_task

    run, _ = searched
    report = json.loads((run / "report.json").read_text())
    assert report["budgets"][0] == report["min_flops_fraction"]
    row = report["rows"][0]
    directions = {
        t: {m: h for m, h in ms.items() if f"{t}/{m}" not in report["delta_m_excluded"]}
        for t, ms in json.loads((run / "anchor.json").read_text())["directions"].items()
    }
    directions = {t: ms for t, ms in directions.items() if ms}
    per_task = delta_m_per_task(row["metrics"], report["baseline"]["metrics"], directions)
    r = dict(zip(report["tasks"], row["preference"], strict=True))
    total = sum(r[t] for t in per_task)
    want = sum(r[t] / total * per_task[t] for t in per_task)
    assert row["delta_m_weighted"] == pytest.approx(want, rel=1e-4)  # rounded preferences
    plain = sum(per_task.values()) / len(per_task)
    assert abs(row["delta_m_weighted"] - plain) > 1e-3 * abs(plain)  # not the plain mean


def test_delta_m_baseline_is_the_independent_stage0_anchor(searched):
    run, _ = searched
    report = json.loads((run / "report.json").read_text())
    test = json.loads((run / "anchor.json").read_text())["metrics"]["test"]
    for task, metrics in test.items():
        assert report["baseline"]["metrics"][task] == pytest.approx(metrics, rel=1e-5)


def test_a_task_without_a_primary_baseline_is_listed_not_a_crash(tmp_path, monkeypatch, searched):
    """A zero single-task baseline of a primary metric used to raise KeyError."""
    import dymu.evaluate.search as search_eval
    from dymu.search import load_run
    from dymu.train.stage0 import load_splits

    run, _ = searched
    real = search_eval.delta_m_directions

    def without_depth(tasks, base_metrics):
        directions, excluded = real(tasks, base_metrics)
        directions.pop("depth")
        return directions, [*excluded, "depth/abs_err"]

    monkeypatch.setattr(search_eval, "delta_m_directions", without_depth)
    trained = load_run(run)
    cfg = trained.cfg
    _, splits = load_splits(cfg)
    report = search_eval.evaluate_search(
        cfg.evaluate,
        trained.streams,
        trained.derive,
        trained.weights,
        splits.test,
        torch.device("cpu"),
    )
    assert report["controllability_excluded"] == ["depth"]
    for scores in report["controllability"].values():
        assert set(scores) == {"semseg", "normals"}


def test_the_report_holds_the_validation_split_beside_the_test_split(searched):
    """Validation chooses, test reports: the same trees scored on both splits, each against
    the single-task anchor on its own split."""
    from dymu.data import get_builder
    from dymu.models.anchor import build_anchor, load_anchor_weights
    from dymu.run import read_run_config
    from dymu.train.loop import evaluate_model

    run, _ = searched
    report = json.loads((run / "report.json").read_text())
    val = report["validation"]
    assert report["split"] == "test" and val["split"] == "val"
    assert [r["tree"] for r in val["rows"]] == [r["tree"] for r in report["rows"]]
    cfg = read_run_config(run)
    builder = get_builder(cfg.data.name)
    anchor = build_anchor(cfg.model, builder.info_for(cfg.data).select(cfg.data.tasks))
    load_anchor_weights(anchor, run / "anchor.safetensors")
    for split, part in (("val", val), ("test", report)):
        ds = builder.load(cfg.data, split)
        _, losses = evaluate_model(anchor.eval(), ds, anchor.tasks, 8, torch.device("cpu"))
        assert part["baseline"]["losses"] == pytest.approx(losses, rel=1e-6), split
    assert val["baseline"]["losses"] != report["baseline"]["losses"]
    for b in report["budgets"]:
        k = f"{b:g}"
        mean = np.mean([r["delta_m"] for r in val["rows"] if r["budget"] == b])
        assert val["delta_m"][k] == pytest.approx(mean)
    assert "Validation split (choices are made on these" in (run / "report.md").read_text()
