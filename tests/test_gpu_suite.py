"""benchmarks/gpu_suite.py in smoke mode on a CPU: the same code paths as on a GPU, tiny.

The suite is what runs when a GPU is lent for a few minutes; this keeps it from rotting on
CPU-only machines. Every check must pass or be skipped with a reason (CUDA graphs,
AOTInductor on CUDA and TensorRT need CUDA; ``dymu profile`` may not exist yet).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

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


def test_smoke_suite_on_cpu_passes_or_skips_every_check_with_a_reason(tmp_path):
    out = tmp_path / "gpu_suite.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out", str(out)]
    code, stdout, stderr = run_session(cmd, tmp_path, "gpu_suite", timeout=120)
    assert code == 0, f"exit {code}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert "passed" in stdout and "skipped" in stdout  # the printed summary

    result = json.loads(out.read_text())
    assert result["mode"] == "smoke"
    env = result["env"]
    for key in ("torch", "device", "device_name", "command", "date"):
        assert env[key], key
    assert "cuda_version" in env
    checks = result["checks"]
    assert set(checks) == CHECKS
    for name, rec in checks.items():
        assert rec["status"] in ("passed", "skipped"), (name, rec)
        assert rec["wall_s"] >= 0
        if rec["status"] == "skipped":
            assert rec["reason"].strip(), name
        else:
            assert all(math.isfinite(x) for x in _numbers(rec["results"])), name
    for name in ("latency_cudagraph", "latency_aoti", "tensorrt"):
        assert (checks[name]["status"], checks[name]["reason"]) == ("skipped", "needs CUDA")
    assert sum(r["status"] == "failed" for r in checks.values()) == result["counts"]["failed"] == 0

    eager = checks["latency_eager"]
    assert eager["status"] == "passed"
    rows = {(r["tree"], r["batch"]): r for r in eager["results"]["rows"]}
    assert set(rows) == {(t, b) for t in ("budget_0.5", "anchor") for b in (1, 32)}
    for row in rows.values():
        assert 0 < row["median_ms"] <= row["p90_ms"]
        assert 0 < row["flops_fraction"] <= 1
    assert rows[("anchor", 1)]["flops_fraction"] == 1
    assert rows[("budget_0.5", 1)]["flops_fraction"] < 1

    training = checks["training"]
    if training["status"] == "passed":
        ran = [r for r in training["results"]["rows"] if r["status"] == "passed"]
        assert all(r["steps_per_s"] > 0 for r in ran)
        fp16 = [r for r in training["results"]["rows"] if r["precision"] == "fp16"]
        assert {r["status"] for r in fp16} == {"skipped"}  # CUDA only

    if checks["nccl"]["status"] == "passed":
        assert checks["nccl"]["results"]["backend"] == "gloo"
    table = checks["latency_table"]
    if table["status"] == "passed":
        assert table["results"]["median_abs_rel_err"] >= 0
        assert table["results"]["max_abs_rel_err"] >= table["results"]["median_abs_rel_err"]
    compiled = checks["latency_compile"]
    if compiled["status"] == "passed":
        assert all(r["median_ms"] > 0 for r in compiled["results"]["rows"])
