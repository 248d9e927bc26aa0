"""benchmarks/paper_scale.py at a tiny size: the reference-vs-dymu check and the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import load_script

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "paper_scale.py"
SMALL = ["--backbone", "tiny_resnet", "--width", "4", "--head", "deeplabv3plus_light"]
SMALL += ["--size", "32x32", "--check-size", "32x32", "--threads", "1"]


@pytest.fixture(scope="module")
def bench():
    """The benchmark script as a module (benchmarks/ is not a package)."""
    return load_script(PATH, "paper_scale_under_test")


def test_json_has_every_stage_with_positive_throughput(bench, tmp_path):
    out = tmp_path / "paper_scale.json"
    argv = [*SMALL, "--batch", "2", "--draws", "2", "--steps", "1", "--warmup", "0"]
    assert bench.main([*argv, "--in-process", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["data"].startswith("synthetic")
    assert result["tasks"] == ["semseg", "depth", "normals"]
    assert result["input"] == [2, 3, 32, 32]
    for key in ("torch", "device", "device_name", "threads", "peak_memory_meaning", "command"):
        assert result[key] is not None
    assert set(result["stages"]) == {"stage0", "stage1", "stage2"}
    for row in result["stages"].values():
        for impl in ("dymu", "looped"):
            assert row[impl]["images_per_s"] > 0
            assert len(row[impl]["step_s"]) == 1
        assert row["speedup"] == pytest.approx(
            row["dymu"]["images_per_s"] / row["looped"]["images_per_s"], rel=1e-2
        )
    assert 0 < result["stages"]["stage2"]["dymu"]["tree_flops_fraction_mean"] <= 1
    check = result["check"]
    assert set(check["max_relative_difference"]) == {"stage0", "stage1", "stage2"}
    assert max(check["max_relative_difference"].values()) <= check["tolerance"]


@pytest.mark.slow
def test_each_measurement_runs_in_its_own_process_with_its_peak_memory(bench, tmp_path):
    out = tmp_path / "paper_scale.json"
    argv = [*SMALL, "--batch", "2", "--stages", "0", "--steps", "1", "--warmup", "0"]
    assert bench.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["isolation"] == "a fresh process per measurement"
    for impl in ("dymu", "looped"):
        assert result["stages"]["stage0"][impl]["peak_memory_mib"] > 0


def test_check_catches_a_reference_that_computes_something_else(bench, monkeypatch):
    """Mixing the parents in reverse order is a different computation: the check fails."""
    real = bench.looped_mixture_outputs

    def wrong(anchor, image, v):
        return real(anchor, image, v.flip(-1))

    monkeypatch.setattr(bench, "looped_mixture_outputs", wrong)
    with pytest.raises(RuntimeError, match="stage 1: dymu and the looped reference differ"):
        bench.check_equal(
            "tiny_resnet", "deeplabv3plus_light", [1], (32, 32), torch.device("cpu"), width=4
        )


def test_bad_options_are_one_line_errors(bench, capsys):
    with pytest.raises(SystemExit) as info:
        bench.main([*SMALL, "--batch", "6", "--draws", "4", "--stages", "1"])
    assert info.value.code == 2
    assert "--batch (6) must be a multiple of --draws (4)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        bench.main([*SMALL, "--precision", "fp16", "--stages", "2"])
    assert info.value.code == 2
    assert "--precision fp16 needs --device cuda" in capsys.readouterr().err
