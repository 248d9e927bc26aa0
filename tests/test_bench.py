"""dymu bench on a tiny exported tree: rows per backend, JSON and plot, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import TINY

from dymu.cli.main import main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    run, bundle = tmp / "run", tmp / "E"
    assert main(["search", "--run", str(run), *TINY, f"data.cache_dir={tmp / 'cache'}"]) == 0
    argv = ["export", "--run", str(run), "--budget", "1", "--preference", "0.4,0.3,0.3"]
    assert main([*argv, "--out", str(bundle)]) == 0
    return run, bundle


def test_bench_measures_each_backend_in_its_own_process(exported, tmp_path, capsys):
    run, bundle = exported
    out = tmp_path / "bench.json"
    argv = ["bench", "--bundle", str(bundle), "--run", str(run), "--out", str(out)]
    argv += ["--backend", "eager", "--backend", "onnxruntime", "--iters", "4"]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert result["command"] == (
        f"dymu bench --bundle {bundle} --run {run} --backend eager --backend onnxruntime "
        f"--iters 4 --out {out}"
    )
    assert [r["backend"] for r in rows] == ["eager", "onnxruntime"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    for row in rows:
        assert row["tree"] == manifest["trees"][0]["hash"]
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p90"]
        assert row["throughput_img_s"] > 0 and row["peak_rss_mb"] > 0
    assert out.with_suffix(".png").is_file()


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's /proc")
def test_a_child_reports_its_own_peak_memory_not_its_parents():
    # getrusage's ru_maxrss survives fork and exec: a child of a 512 MiB parent would
    # report at least 512 MiB whatever it used itself.
    ballast = bytearray(512 * 2**20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: resident
    code = "from dymu.compile.bench import _peak_rss_mib; print(_peak_rss_mib())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 0 < float(out.stdout) < 256
    del ballast


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--backend", "tflite"], "unknown backend"),
        (["--backend", "eager"], "needs --run"),
        (["--out", "bench.txt"], "must be a .json file"),
    ],
)
def test_bench_bad_input(exported, tmp_path, capsys, extra, message):
    _, bundle = exported
    argv = ["bench", "--bundle", str(bundle), "--out", str(tmp_path / "b.json"), *extra]
    assert main(argv) != 0
    assert message in capsys.readouterr().err


def test_bench_refuses_aoti_for_an_onnx_bundle(exported, tmp_path, capsys):
    from dymu.compile.bench import available_backends

    _, bundle = exported
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "aoti" not in available_backends(True, manifest)  # exported with --target onnx
    out = tmp_path / "b.json"
    argv = ["bench", "--bundle", str(bundle), "--backend", "aoti", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "export with --target aoti" in err
    assert not out.exists()
