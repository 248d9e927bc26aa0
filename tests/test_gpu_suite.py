"""benchmarks/gpu_suite.py in smoke mode on a CPU: the same code paths as on a GPU, tiny.

The suite is what runs when a GPU is lent for a few minutes; this keeps it from rotting on
CPU-only machines. On a CPU every check that can run there must pass; only the checks listed
in ``CPU_SKIPS`` may skip, each with the reason that names what is missing. In smoke mode
running out of time is a failure, never a skip.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from procs import run_session

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"
CHECKS = {
    "latency_eager",
    "latency_cudagraph",
    "training",
    "nccl",
    "latency_table",
    "tensorrt",
    "latency_aoti",
    "latency_compile",
}
CPU_SKIPS = {
    # CUDA graphs record CUDA kernels: nothing to capture on a CPU.
    "latency_cudagraph": "needs CUDA: CUDA graphs capture and replay CUDA kernels",
    # TensorRT builds engines for NVIDIA GPUs only (and is not installed without CUDA).
    "tensorrt": "needs CUDA: TensorRT engines run on NVIDIA GPUs",
    # The check times AOTInductor packages compiled for CUDA (the CPU ones have tests).
    "latency_aoti": "needs CUDA: the AOTInductor packages are compiled for CUDA",
}
"""The only checks that may skip on a CPU, with their reasons. ``nccl`` is not one: on a
CPU it runs the same one-process group with gloo."""


def _numbers(obj):
    """Every int or float inside ``obj`` (bools excluded)."""
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        yield obj


def _suite(tmp_path: Path, *args: str, timeout: float) -> tuple[int, str, dict]:
    """Run the suite in smoke mode on the CPU: (exit code, stdout, the JSON it wrote)."""
    out = tmp_path / "gpu_suite.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(out), *args]
    code, stdout, stderr = run_session(cmd, tmp_path, "gpu_suite", timeout=timeout)
    assert out.is_file(), f"exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return code, stdout, json.loads(out.read_text())


def test_smoke_suite_on_cpu_passes_every_check_that_does_not_need_cuda(tmp_path):
    code, stdout, result = _suite(tmp_path, timeout=120)  # the suite's own budget is 90 s
    checks = result["checks"]
    assert set(checks) == CHECKS
    for name, rec in checks.items():
        if name in CPU_SKIPS:
            assert (rec["status"], rec["reason"]) == ("skipped", CPU_SKIPS[name]), name
        else:
            assert rec["status"] == "passed", (name, rec.get("reason"), rec.get("traceback"))
            assert all(math.isfinite(x) for x in _numbers(rec["results"])), name
        assert rec["wall_s"] >= 0
    counts = {"passed": len(CHECKS) - len(CPU_SKIPS), "skipped": len(CPU_SKIPS), "failed": 0}
    assert result["counts"] == counts
    assert code == 0
    assert "{passed} passed, {skipped} skipped, 0 failed".format(**counts) in stdout  # summary

    assert result["mode"] == "smoke"
    env = result["env"]
    for key in ("torch", "device", "device_name", "command", "date"):
        assert env[key], key
    assert "cuda_version" in env

    eager = checks["latency_eager"]
    rows = {(r["tree"], r["batch"]): r for r in eager["results"]["rows"]}
    assert set(rows) == {(t, b) for t in ("budget_0.5", "anchor") for b in (1, 32)}
    for row in rows.values():
        assert 0 < row["median_ms"] <= row["p90_ms"]
        assert 0 < row["flops_fraction"] <= 1
    assert rows[("anchor", 1)]["flops_fraction"] == 1
    assert rows[("budget_0.5", 1)]["flops_fraction"] < 1

    # Stages 0-2, stacked at fp32/bf16/fp16 and looped at fp32: all but fp16 run on a CPU.
    training = checks["training"]["results"]["rows"]
    training = {(r["stage"], r["impl"], r["precision"]): r for r in training}
    runs = [("stacked", p) for p in ("fp32", "bf16", "fp16")] + [("looped", "fp32")]
    assert set(training) == {(stage, *run) for stage in (0, 1, 2) for run in runs}
    for (stage, impl, precision), row in training.items():
        if precision == "fp16":
            assert (row["status"], row["reason"]) == ("skipped", "run.precision=fp16 needs CUDA")
        else:
            assert row["status"] == "passed", (stage, impl, precision, row.get("reason"))
            assert row["steps_per_s"] > 0 and math.isfinite(row["last_loss"])

    nccl = checks["nccl"]["results"]
    assert nccl["backend"] == "gloo" and nccl["world_size"] == 1
    assert nccl["all_reduce_1mib_median_ms"] > 0

    table = checks["latency_table"]["results"]
    assert 0 <= table["median_abs_rel_err"] <= table["max_abs_rel_err"]
    assert " dymu profile --run " in table["command"]

    compiled = checks["latency_compile"]["results"]
    assert compiled["compile_backend"] == "aot_eager"
    assert {(r["tree"], r["batch"]) for r in compiled["rows"]} == set(rows)
    assert all(r["median_ms"] > 0 for r in compiled["rows"])


@pytest.mark.parametrize(
    ("only", "budget_s", "reason"),
    [
        # the suite's budget already spent: in-process and child checks alike
        ("latency_eager,latency_compile", 0, "suite time budget exhausted"),
        # a child that outlives its limit (torch.compile takes far longer than 4 s)
        ("latency_compile", 4, "did not finish within"),
    ],
)
def test_a_timeout_in_smoke_mode_is_a_failure_not_a_skip(tmp_path, only, budget_s, reason):
    code, _, result = _suite(tmp_path, "--only", only, "--time-budget-s", str(budget_s), timeout=60)
    checks = result["checks"]
    assert set(checks) == set(only.split(","))
    for name, rec in checks.items():
        assert rec["status"] == "failed", (name, rec)
        assert reason in rec["reason"], (name, rec["reason"])
    assert result["counts"]["failed"] == len(checks) and code == 1
