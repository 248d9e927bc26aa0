"""benchmarks/joint_sweep.py: the joint stage alone under several settings, on validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import TINY, load_script

import dymu.train.joint as joint
import dymu.train.stage0 as stage0
from dymu.config import load_config, to_yaml

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "joint_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    return load_script(PATH, "joint_sweep_under_test")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished stage 0 with its config, as a search leaves it."""
    run = tmp_path_factory.mktemp("sweep") / "run"
    cache = run.parent / "cache"
    cfg = load_config(None, [*TINY, "joint.steps=3", f"data.cache_dir={cache}"])
    stage0.train_stage0(cfg, run)
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


def test_each_setting_trains_once_and_is_reused(sweep, run, tmp_path, monkeypatch, capsys):
    out, work = tmp_path / "sweep.json", tmp_path / "work"
    args = ["--run", str(run), "--work", str(work), "--set", "", "--set", "joint.lr=0.01"]
    assert sweep.main([*args, "--out", str(out)]) == 0
    first = json.loads(out.read_text())
    assert [s["overrides"] for s in first["settings"]] == [[], ["joint.lr=0.01"]]
    assert first["settings"][1]["joint"]["lr"] == 0.01
    for s in first["settings"]:
        assert set(s["trunks"]) == {"semseg", "depth", "normals"}
        for t in s["trunks"].values():  # the weighted loss is sum_i w_i L_i
            w = sum(a * b for a, b in zip(s["loss_scales"], t["val_losses"].values(), strict=True))
            assert t["weighted"] == pytest.approx(w, rel=1e-12)
        weighted = [t["weighted"] for t in s["trunks"].values()]
        assert s["best_weighted"] == min(weighted)
        assert s["mean_weighted"] == pytest.approx(sum(weighted) / 3, rel=1e-12)
    # Two learning rates give two joint stages.
    a, b = (s["trunks"]["depth"]["val_losses"]["semseg"] for s in first["settings"])
    assert a != b

    def no_training(*_, **__):
        raise AssertionError("a setting whose joint weights match was trained again")

    monkeypatch.setattr(joint, "train_joint", no_training)
    assert sweep.main([*args, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"] == first["settings"]
    assert "lowest mean over the trunks" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_2(sweep, run, tmp_path, capsys):
    assert sweep.main(["--run", str(tmp_path), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("joint_sweep:") and "stage 0" in err and "\n" not in err
    assert not (tmp_path / "w").exists()
    args = ["--run", str(run), "--work", str(tmp_path / "w"), "--set", "joint.lr=fast"]
    assert sweep.main([*args, "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("joint_sweep:") and "joint.lr" in err and "\n" not in err
    assert not (tmp_path / "o.json").exists()
