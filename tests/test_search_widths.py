"""``dymu search`` with widths (METHOD.md 1.11): the width stage joins the run, stages 1 and
2 and every budget a full-width tree fits stay exactly as they were, and the budgets below
the cheapest tree get configurations with widths."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from tiny import TINY

from dymu.cli.main import main

WIDTHS = ["model.widths=[0.5,1.0]", "slim.steps=2", "evaluate.budgets=[0.3,0.5,0.75,1.0]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(trees-only run, the same run searched again with widths), each with its report."""
    tmp = tmp_path_factory.mktemp("widths")
    trees, widths = tmp / "trees", tmp / "widths"
    base = [*TINY, f"data.cache_dir={tmp / 'cache'}", "evaluate.budgets=[0.3,0.5,0.75,1.0]"]
    assert main(["search", "--run", str(trees), *base]) == 0
    shutil.copytree(trees, widths)
    assert main(["search", "--run", str(widths), *base, *WIDTHS]) == 0
    return [(run, json.loads((run / "report.json").read_text())) for run in (trees, widths)]


def test_widths_leave_stages_1_and_2_and_the_tree_budgets_as_they_were(runs):
    (trees, before), (widths, after) = runs
    for name in ("edge_hnet.safetensors", "weight_hnet.safetensors", "space.json"):
        assert (trees / name).read_bytes() == (widths / name).read_bytes(), name
    assert (widths / "slim.safetensors").is_file() and (widths / "space_widths.json").is_file()
    tree_budgets = [b for b in before["budgets"] if b in after["budgets"]]
    assert tree_budgets  # at least 0.75 and 1
    for key in ("rows", "corner_rows"):
        for old, new in ((before, after), (before["validation"], after["validation"])):
            kept = [r for r in new[key] if r["budget"] in tree_budgets]
            assert kept == [r for r in old[key] if r["budget"] in tree_budgets]


def test_budgets_below_the_cheapest_tree_get_configurations_with_widths(runs):
    from dymu.search import load_run
    from dymu.space.graph import anchor_flops

    (_, before), (widths, after) = runs
    cheapest_tree = min(before["budgets"])
    low = [b for b in after["budgets"] if b < cheapest_tree]
    assert low and min(after["budgets"]) < cheapest_tree
    trained = load_run(widths)
    derive = trained.derive
    full = anchor_flops(derive.space)
    for row in after["rows"]:
        if row["budget"] in low:
            assert row["flops_fraction"] <= row["budget"] + 1e-12
            tree = derive(row["preference"], row["budget"])  # the run's own derivation
            assert tree.hash() == row["tree"] and tree.widths is not None
            assert tree.flops(derive.space) / full == pytest.approx(row["flops_fraction"])


def test_a_width_set_without_full_width_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["search", "--run", str(run), "model.widths=[0.5]"]) == 2
    err = capsys.readouterr().err
    assert "include 1.0" in err and "Traceback" not in err
    assert not run.exists()


def test_sample_prints_the_widths_below_the_cheapest_tree(runs, capsys):
    (_, before), (widths, _) = runs
    budget = f"{min(before['budgets']) * 0.95:.4f}"  # below the cheapest full-width tree
    assert (
        main(["sample", "--run", str(widths), "--preference", "0.8,0.1,0.1", "--budget", budget])
        == 0
    )
    out = capsys.readouterr().out
    assert " x0.5" in out and "of the anchor" in out
    assert (
        main(["sample", "--run", str(widths), "--preference", "0.8,0.1,0.1", "--budget", "1"]) == 0
    )
    assert " x0.5" not in capsys.readouterr().out  # the full-width tree of budget 1
    assert (
        main(["sample", "--run", str(widths), "--preference", "0.8,0.1,0.1", "--budget", "0.01"])
        == 2
    )
    assert "below the cheapest configuration (tree and widths)" in capsys.readouterr().err


def test_export_below_the_cheapest_tree_ships_what_the_report_evaluated(runs, tmp_path):
    """Each configuration with widths is one model (no adaptation: every preference it
    serves gets the same weights), priced exactly, with the report's calibrated statistics."""
    from dymu.compile.export import PARITY_ATOL, export_bundle, model_of
    from dymu.data import get_builder
    from dymu.search import load_run
    from dymu.space.tree import TreeSpec
    from dymu.train.calibrate import calibration_images

    (_, before), (widths, after) = runs
    low = min(after["budgets"])
    assert low < min(before["budgets"])
    prefs = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]
    manifest = export_bundle(widths, tmp_path / "bundle", budget=low, preferences=prefs)
    served = [p for t in manifest["trees"] for p in t["preferences"]]
    assert sorted(map(tuple, served)) == sorted(tuple(round(x, 6) for x in p) for p in prefs)
    for entry in manifest["trees"]:
        assert entry["widths"] and entry["weights_at"] is None
        assert entry["flops_counted"] == entry["flops"] <= low * manifest["anchor_flops"]
        assert entry["parity"]["overall"] < PARITY_ATOL
        assert entry["parity_evaluated"] < PARITY_ATOL
    # What dymu bench rebuilds from an entry (compile/bench.py) is the model shipped.
    trained = load_run(widths)
    cfg = trained.cfg
    images = calibration_images(
        get_builder(cfg.data.name).load(cfg.data, "train"), torch.device("cpu")
    )
    golden = torch.from_numpy(np.load(tmp_path / "bundle" / "golden_input.npy"))
    entry = manifest["trees"][0]
    tree = TreeSpec(entry["parents"], entry["widths"])
    net, _, _ = model_of(trained, tree, entry["preferences"][0], low, images)
    shipped = np.load(tmp_path / "bundle" / entry["hash"] / "golden_outputs.npz")
    with torch.no_grad():
        for task, out in net(golden).items():
            np.testing.assert_allclose(out.numpy(), shipped[task], rtol=0, atol=1e-6)


def test_fill_spends_the_gaps_between_trees_on_widths(runs):
    """``slim.fill``: a budget whose tree leaves more than the fill's share unspent gets a
    configuration with widths where one spends more, never over the budget; fill 0 (the
    default) keeps every tree budget's tree."""
    import dataclasses

    from dymu.search import load_run
    from dymu.space.graph import anchor_flops

    (_, before), (widths, _) = runs
    trees = load_run(widths).derive
    assert trees.fill == 0.0
    filled = dataclasses.replace(trees, fill=1.0)
    full = anchor_flops(trees.plain)
    prefs = [[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]
    narrowed = 0
    for b in np.linspace(min(before["budgets"]), 1.0, 9)[1:-1]:
        for r in prefs:
            tree, config = trees(r, b), filled(r, b)
            assert tree.widths is None
            spent = config.flops(filled.space)
            assert tree.flops(trees.plain) <= spent <= b * full
            if config.widths is not None:
                narrowed += 1
                assert spent > tree.flops(trees.plain)
            else:
                assert config.hash() == tree.hash()
    assert narrowed  # the tiny space has gaps between its trees


def test_the_derivation_rules_do_not_retrain_the_width_stage():
    from dymu.config import Config, load_config
    from dymu.train.spec import resolve_specs

    base = load_config(None, ["model.widths=[0.5,1.0]"])
    other = load_config(None, ["model.widths=[0.5,1.0]", "slim.fill=0.9", "slim.strength=3"])
    assert isinstance(base, Config)
    assert resolve_specs(base)["slim"].hash == resolve_specs(other)["slim"].hash


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_fill_outside_0_1_is_refused(tmp_path, capsys, value):
    run = tmp_path / "run"
    assert main(["search", "--run", str(run), f"slim.fill={value}"]) == 2
    err = capsys.readouterr().err
    assert "slim.fill must be in [0, 1]" in err and "Traceback" not in err
    assert not run.exists()


def test_a_search_with_fill_reports_widths_in_the_gaps(runs, tmp_path):
    (_, before), (widths, _) = runs
    filled = tmp_path / "filled"
    shutil.copytree(widths, filled)
    base = [*TINY, f"data.cache_dir={widths.parent / 'cache'}"]
    budgets = "evaluate.budgets=[0.3,0.85,1.0]"  # 0.85: between the 0.75 and 0.87 trees
    assert main(["search", "--run", str(filled), *base, *WIDTHS, budgets, "slim.fill=1.0"]) == 0
    from dymu.search import load_run

    report = json.loads((filled / "report.json").read_text())
    assert report["widths"]["fill"] == 1.0
    derive = load_run(filled).derive  # the run's own derivation, fill included
    assert derive.fill == 1.0
    gaps = 0
    for row in report["rows"]:
        assert row["flops_fraction"] <= row["budget"] + 1e-12
        tree = derive(row["preference"], row["budget"])
        assert tree.hash() == row["tree"]
        gaps += row["budget"] >= min(before["budgets"]) and tree.widths is not None
    assert gaps
    assert "would spend less than 1 of it" in (filled / "report.md").read_text()
