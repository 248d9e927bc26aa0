"""Stage 0 end to end on a tiny scene set, resume, and the affinity/space commands."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import TINY as _TINY
from tiny import stop_after_first_checkpoint

import dymu.train.stage0 as stage0
from dymu.cli.main import main
from dymu.config import load_config
from dymu.models.anchor import build_anchor, load_anchor_weights

TINY = [*_TINY, "stage0.epochs=2", "stage0.val_every=1"]


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"data.cache_dir={tmp_path / 'cache'}", *extra])


def _weights(path):
    cfg = load_config(None, TINY)
    from dymu.data import get_builder

    specs = get_builder("synthscenes").info.select(cfg.data.tasks)
    anchor = build_anchor(cfg.model, specs)
    load_anchor_weights(anchor, path)
    return anchor.state_dict()


def test_stage0_writes_anchor_and_baselines(tmp_path):
    cfg = _cfg(tmp_path)
    anchor, record = stage0.train_stage0(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "anchor.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "anchor.json").read_text())
    assert saved["tasks"] == ["semseg", "depth", "normals"] == record["tasks"]
    for split in ("val", "test"):
        assert set(saved["metrics"][split]) == {"semseg", "depth", "normals"}
        assert 0 <= saved["metrics"][split]["semseg"]["miou"] <= 100
    assert saved["directions"]["depth"]["abs_err"] is False
    # Same config: loaded, not trained again.
    again, _ = stage0.ensure_anchor(cfg, tmp_path / "run")
    for k, v in anchor.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    stage0.train_stage0(cfg, tmp_path / "straight")
    stop_after_first_checkpoint(
        monkeypatch, stage0, lambda: stage0.train_stage0(cfg, tmp_path / "resumed")
    )
    assert not (tmp_path / "resumed" / "anchor.safetensors").exists()  # nothing half-done
    stage0.train_stage0(cfg, tmp_path / "resumed", resume=True)
    a = _weights(tmp_path / "straight" / "anchor.safetensors")
    b = _weights(tmp_path / "resumed" / "anchor.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "stage0.epochs=2")
    stop_after_first_checkpoint(
        monkeypatch, stage0, lambda: stage0.train_stage0(cfg, tmp_path / "run")
    )
    assert (tmp_path / "run" / stage0.CHECKPOINT).is_file()
    with pytest.raises(Exception, match="another config"):
        other = _cfg(tmp_path, "stage0.epochs=2", "stage0.lr=0.5")
        stage0.train_stage0(other, tmp_path / "run", resume=True)


def test_a_finished_stage0_removes_its_checkpoint(tmp_path):
    stage0.train_stage0(_cfg(tmp_path, "stage0.epochs=2"), tmp_path / "run")
    assert (tmp_path / "run" / stage0.ANCHOR_WEIGHTS).is_file()
    assert not (tmp_path / "run" / stage0.CHECKPOINT).exists()


@pytest.mark.parametrize("method", ["rsa", "grad_cosine", "lookahead"])
def test_affinity_command_writes_matrix_and_heatmap(tmp_path, capsys, method):
    run = tmp_path / "run"
    argv = [
        "affinity",
        "--run",
        str(run),
        *TINY,
        f"data.cache_dir={tmp_path / 'c'}",
        f"affinity.method={method}",
    ]
    assert main(argv) == 0
    result = json.loads((run / "affinity.json").read_text())
    assert result["tasks"] == ["semseg", "depth", "normals"] and result["method"] == method
    mean = torch.tensor(result["mean"])
    assert mean.shape == (3, 3) and torch.isfinite(mean).all()
    if method == "lookahead":
        assert result["per_layer"] == []  # one matrix for the whole shared trunk
    else:
        per_layer = torch.tensor(result["per_layer"])
        assert per_layer.ndim == 3 and per_layer.shape[1:] == (3, 3)
    if method == "rsa":
        torch.testing.assert_close(mean.diagonal(), torch.ones(3, dtype=mean.dtype))
    assert (run / "affinity.png").read_bytes()[:4] == b"\x89PNG"
    assert {"config.yaml", "env.json", "anchor.json"} <= {p.name for p in run.iterdir()}
    assert "affinity (" in capsys.readouterr().out


def test_space_command_writes_space(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["space", "--run", str(run), *TINY, f"data.cache_dir={tmp_path / 'c'}"]) == 0
    out = capsys.readouterr().out
    assert "anchor (no sharing)" in out and "all-sharing" in out
    assert (run / "space.json").is_file()
