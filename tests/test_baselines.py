"""``dymu baselines`` on a tiny search run: every method, the shared report, reuse, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from tiny import TINY

from dymu.cli.main import main
from dymu.evaluate.metrics import hypervolume, normalised_losses

BASE = [
    "baselines.epochs=1",
    "baselines.batch_size=8",
    "baselines.weightings=[equal,tensioner]",
    "baselines.towers.gamma=0.5",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("baselines")
    common = [*TINY, f"data.cache_dir={tmp / 'cache'}"]
    assert main(["search", "--run", str(tmp / "run"), *common]) == 0
    assert main(["baselines", "--run", str(tmp / "run"), *common, *BASE]) == 0
    return tmp / "run", common


def test_every_method_is_scored_on_one_reference_point(run):
    run_dir, _ = run
    report = json.loads((run_dir / "baselines" / "report.json").read_text())
    search = json.loads((run_dir / "report.json").read_text())
    methods = report["methods"]
    assert {"single_task", "static", "transfer", "phn", "phn_bn", "weighting"} <= set(methods)
    assert {f"dymu@{b:g}" for b in search["budgets"]} <= set(methods)
    # 3 preferences in the tiny sweep: one model per preference; one per weighting strategy.
    assert methods["static"]["points"] == methods["phn_bn"]["points"] == 3
    assert methods["weighting"]["points"] == 2
    assert methods["static"]["params_stored"] == 3 * methods["static"]["params"]
    # Recompute one hypervolume from the stored points and the declared reference.
    ref = np.array(report["reference_point"])
    base = np.array(search["baseline"]["losses"])
    pts = np.array([p["losses"] for p in report["points"]["static"]])
    expected = hypervolume(normalised_losses(pts, base), ref)
    assert methods["static"]["hypervolume"] == pytest.approx(expected)
    # The reference point covers every method's normalised losses.
    for points in report["points"].values():
        norm = normalised_losses(np.array([p["losses"] for p in points]), base)
        assert np.all(norm < ref)
    # Single-task is the anchor itself: delta_m 0, full FLOPs.
    assert methods["single_task"]["delta_m"] == pytest.approx(0.0, abs=1e-9)
    assert methods["single_task"]["flops_fraction"] == 1.0
    # DYMU stores the anchor and two hypernetworks; the anchor is what single-task deploys.
    assert methods["dymu@1"]["params_stored"] > methods["single_task"]["params"] > 0
    # One shared backbone costs less than N streams.
    assert 0 < methods["static"]["flops_fraction"] < 1
    assert (run_dir / "baselines" / "fronts.png").stat().st_size > 0
    md = (run_dir / "baselines" / "report.md").read_text()
    assert "PHN-BN" in md and "tensioner" in md


def test_logs_hold_per_step_weights_and_per_epoch_hypervolume(run):
    run_dir, _ = run
    weighting = json.loads((run_dir / "baselines" / "weighting.json").read_text())
    log = weighting["log"]["tensioner"]
    steps = 24 // 8  # tiny train split / batch size, one epoch
    assert len(log["weights"]) == steps and len(log["weights"][0]) == 3
    static = json.loads((run_dir / "baselines" / "static.json").read_text())
    history = static["log"]["history"]
    assert [e["epoch"] for e in history] == [0, 1]
    assert not list((run_dir / "baselines").glob("*.ckpt.pt"))  # finished sets keep none
    assert all(e["hv"] is not None for e in history)
    report = json.loads((run_dir / "baselines" / "report.json").read_text())
    speed = report["transfer_speed"]
    assert set(speed) == {"static", "transfer"}
    assert speed["static"]["final_hv"] == pytest.approx(history[-1]["hv"])
    assert speed["static"]["own_final"]["epoch"] in (0, 1)
    # The training curves of the step-based methods: steps 0, 10, ... and the last, once.
    phn_steps = json.loads((run_dir / "baselines" / "phn_bn.json").read_text())["log"]["steps"]
    for name, total in (("tensioner", steps), ("phn_bn", phn_steps)):
        rows = [json.loads(x) for x in (run_dir / "baselines" / "logs" / f"{name}.jsonl").open()]
        assert [r["step"] for r in rows] == sorted({*range(0, total, 10), total - 1})
        assert all(np.isfinite(r["loss"]) for r in rows)


def test_finished_methods_are_reused_and_a_foreign_config_is_refused(run, capsys):
    run_dir, common = run
    assert main(["baselines", "--run", str(run_dir), *common, *BASE]) == 0
    out = capsys.readouterr().out
    assert out.count("already trained") == 5
    # A call that names fewer methods still reports every method trained with these settings.
    assert (
        main(["baselines", "--run", str(run_dir), *common, *BASE, "baselines.methods=[phn]"]) == 0
    )
    report = json.loads((run_dir / "baselines" / "report.json").read_text())
    assert {"static", "transfer", "phn", "phn_bn", "weighting"} <= set(report["methods"])
    # Another strategy list concerns only the weighting method: the static set is kept.
    other = [*BASE, "baselines.weightings=[equal]", "baselines.methods=[static]"]
    assert main(["baselines", "--run", str(run_dir), *common, *other]) == 0
    assert "static already trained" in capsys.readouterr().out
    report = json.loads((run_dir / "baselines" / "report.json").read_text())
    assert "static" in report["methods"] and "weighting" not in report["methods"]
    # Another model than the search's: one line, exit 2.
    assert main(["baselines", "--run", str(run_dir), *common, *BASE, "model.width=8"]) == 2
    err = capsys.readouterr().err
    assert "other data, model or stage-0 settings" in err and len(err.strip().splitlines()) == 1


def test_an_unknown_weighting_is_refused_before_training(run, capsys):
    run_dir, common = run
    argv = ["baselines", "--run", str(run_dir), *common, *BASE, "baselines.weightings=[nope]"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "tensioner" in err


def test_a_run_without_a_search_is_refused(tmp_path, capsys):
    assert main(["baselines", "--run", str(tmp_path), *TINY]) == 2
    assert "report.json is missing" in capsys.readouterr().err


def test_part_of_the_sweep_trains_the_same_first_models(run, tmp_path, capsys):
    """``baselines.stacked_models=K``: the static set's first K models, as in the whole set
    (independent models, same batches); the report bounds the ratios."""
    run_dir, common = run
    full = json.loads((run_dir / "baselines" / "static.json").read_text())
    part_dir = tmp_path / "run"
    shutil.copytree(run_dir, part_dir)
    argv = ["baselines", "--run", str(part_dir), *common, *BASE, "baselines.methods=[static]"]
    assert main([*argv, "baselines.stacked_models=2"]) == 0
    part = json.loads((part_dir / "baselines" / "static.json").read_text())
    assert (part["models"], part["sweep"]) == (2, 3)
    assert [p["preference"] for p in part["points"]] == [
        p["preference"] for p in full["points"][:2]
    ]
    # Same models up to rounding: a set of another size takes other vector-kernel paths,
    # and Adam enlarges those last-bit differences in near-zero gradients (measured: at most
    # 1e-3 relative after these 3 steps). Independence itself is tested in test_transfer.
    for mine, whole in zip(part["points"], full["points"][:2], strict=True):
        assert mine["losses"] == pytest.approx(whole["losses"], rel=3e-3)
    assert part["train_seconds_sweep"] == pytest.approx(part["train_seconds"] * 3 / 2)
    report = json.loads((part_dir / "baselines" / "report.json").read_text())
    static = report["methods"]["static"]
    assert static["points"] == 2 and "2 of the sweep's 3" in static["label"]
    comp = report["comparison"]["static"]
    dymu = report["methods"][report["comparison"]["dymu"]]
    assert comp["hv_ratio_is_upper_bound"] is True
    assert comp["time_ratio_sweep"] == pytest.approx(
        dymu["train_seconds"] / part["train_seconds_sweep"], rel=1e-3
    )
    assert "at most" in (part_dir / "baselines" / "report.md").read_text()
    # More models than the sweep has: one line, exit 2, before any training.
    capsys.readouterr()
    assert main([*argv, "baselines.stacked_models=4"]) == 2
    err = capsys.readouterr().err
    assert "more than the sweep's 3" in err and len(err.strip().splitlines()) == 1


def test_the_ecmt_style_network_is_one_entry_per_budget_within_it(run, capsys):
    run_dir, common = run
    argv = ["baselines", "--run", str(run_dir), *common, *BASE]
    argv += ["baselines.methods=[ecmt]", "baselines.ecmt_widths=[0.5,1.0]"]
    argv += ["baselines.ecmt_budgets=[0.75,1.0]"]  # the tiny heads: narrowest about 0.6
    assert main(argv) == 0
    report = json.loads((run_dir / "baselines" / "report.json").read_text())
    for budget in (0.75, 1.0):
        row = report["methods"][f"ecmt@{budget:g}"]
        assert row["points"] == 3 and 0 < row["flops_fraction"] <= budget
        assert row["uniformity"] is not None  # controllable: scored like DYMU's budgets
    capsys.readouterr()
    assert main([*argv[:-1], "baselines.ecmt_budgets=[0.01]"]) == 2
    err = capsys.readouterr().err
    assert "narrowest configuration" in err and len(err.strip().splitlines()) == 1
