"""``dymu bench``: latency, throughput and peak memory of exported trees per backend.

Each (tree, backend) is measured in its own subprocess, so its peak resident memory
(:func:`process_memory_mib`) and, on a GPU, its peak CUDA memory belong to that
measurement alone and one backend's allocations cannot slow the next. Backends:

- ``eager``: the materialized tree in PyTorch (needs the run directory);
- ``compiled``: the same through ``torch.compile`` (on a GPU with CUDA graphs,
  ``mode="reduce-overhead"``);
- ``onnxruntime``: the bundle's ONNX file on ONNX Runtime's CPU provider;
- ``tensorrt``: the tree's engine, where TensorRT, a GPU and a built engine are present;
- ``aoti``: the tree's AOTInductor package (``--target aoti``) on the device it was compiled
  for, CPU or CUDA (needs PyTorch, not the run directory);
- ``aoti_cudagraph``: a CUDA package replayed from captured CUDA graphs
  (:class:`~dymu.compile.aoti.CudaGraphRunner`).

Without ``--backend``, a bundle exported with ``--target aoti`` is also measured on ``aoti``
(and ``aoti_cudagraph`` for CUDA packages). A backend a bundle cannot serve (no package, a
package for a device this machine lacks) is refused before anything is measured.

Latency is per call at batch 1 (p50 and p90 over ``iters`` timed calls after ``warmup``);
throughput is images per second at batch 32 (batch over the median call time).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dymu.artifacts import read_json
from dymu.errors import RuntimeFailure, UserError
from dymu.io import save_figure, write_json

BACKENDS = ("eager", "compiled", "onnxruntime", "tensorrt", "aoti", "aoti_cudagraph")
THROUGHPUT_BATCH = 32
_AOTI = ("aoti", "aoti_cudagraph")


def _aoti_device(manifest: dict[str, Any] | None) -> str | None:
    """The device a bundle's AOTInductor packages were compiled for (None: it has none)."""
    if manifest is None or manifest.get("target") != "aoti":
        return None
    devices = {t["aoti"]["device"] for t in manifest["trees"] if "aoti" in t}
    return devices.pop() if len(devices) == 1 else None


def available_backends(has_run: bool, manifest: dict[str, Any] | None = None) -> list[str]:
    """The backends this machine can measure for a bundle with ``manifest``.

    PyTorch ones only with the run directory; ``aoti`` (and on CUDA ``aoti_cudagraph``)
    when the bundle was exported with ``--target aoti`` for a device present here.
    """
    import torch

    found = []
    if has_run:
        found += ["eager", "compiled"]
    found.append("onnxruntime")
    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        found.append("tensorrt")
    device = _aoti_device(manifest)
    if device == "cpu":
        found.append("aoti")
    elif device == "cuda" and torch.cuda.is_available():
        found += ["aoti", "aoti_cudagraph"]
    return found


def check_backend(bundle: Path, manifest: dict[str, Any], backend: str) -> None:
    """Refuse, with one line, a backend that cannot run some tree of ``bundle`` here.

    Checked in the parent before any child starts, so a bundle without AOTInductor
    packages or a package for a device this machine lacks is a usage error, not a failed
    measurement halfway through.
    """
    import torch

    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend not in _AOTI:
        return
    for entry in manifest["trees"]:
        path = bundle / entry["hash"] / "model.pt2"
        if "aoti" not in entry or not path.is_file():
            raise UserError(
                f"backend {backend}: {bundle} has no AOTInductor package for tree "
                f"{entry['hash']} ({path.name}); export with --target aoti"
            )
        device = entry["aoti"]["device"]
        if backend == "aoti_cudagraph" and device != "cuda":
            raise UserError(
                f"backend aoti_cudagraph needs packages compiled for cuda; {bundle} has {device}"
            )
        if device == "cuda" and not torch.cuda.is_available():
            raise UserError(
                f"backend {backend}: {bundle} was compiled for cuda and this machine has no "
                "CUDA device"
            )


def _timed(fn: Callable[[], Any], warmup: int, iters: int, sync: Callable[[], None]) -> list[float]:
    """Seconds per call of ``fn`` over ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def _torch_runner(bundle: Path, run: Path, entry: dict, compiled: bool, device: str):
    """A callable on a [B, 3, H, W] array: the materialized tree, eager or compiled."""
    import torch

    from dymu.compile.export import model_of, run_calibration_images
    from dymu.search import load_run
    from dymu.space.tree import TreeSpec

    trained = load_run(run)
    tree = TreeSpec(entry["parents"], entry.get("widths"))
    if tree.hash() != entry["tree"]:
        raise UserError(f"{bundle} does not come from {run}: tree {entry['tree']} differs")
    # The statistics export calibrated, for a configuration with widths.
    images = run_calibration_images(trained) if tree.widths is not None else None
    r = entry["weights_at"] or entry["preferences"][0]
    net, _, _ = model_of(trained, tree, r, entry["budget"], images)
    net = net.to(device)
    if compiled:
        net = torch.compile(net, mode="reduce-overhead" if device == "cuda" else "default")

    def call(x: np.ndarray) -> None:
        with torch.no_grad():
            net(torch.from_numpy(x).to(device))

    return call


def _ort_runner(bundle: Path, entry: dict):
    import torch

    from dymu.compile.latency import ort_session

    # As many threads as PyTorch's backends use (the row's ``threads``), so rows compare;
    # threads that do not spin, as the latency tables measure.
    session = ort_session(bundle / entry["hash"] / "model.onnx", torch.get_num_threads())

    def call(x: np.ndarray) -> None:
        session.run(None, {"image": x})

    return call


def _trt_runner(bundle: Path, entry: dict):
    import torch

    from dymu.compile.trt_engine import EngineRunner

    engine = bundle / entry["hash"] / "model.engine"
    if not engine.is_file():
        raise UserError(f"no TensorRT engine {engine}: export with --target trt first")
    runner = EngineRunner(engine)

    def call(x: np.ndarray) -> None:
        runner(torch.from_numpy(x).cuda())

    return call


def _aoti_runner(bundle: Path, entry: dict, cuda_graphs: bool):
    """A callable on a [B, 3, H, W] array: the tree's package on its compile device."""
    import torch

    from dymu.compile.aoti import CudaGraphRunner, load_aoti

    if "aoti" not in entry:
        raise UserError(
            f"no AOTInductor package for tree {entry['hash']}: export with --target aoti"
        )
    device = entry["aoti"]["device"]
    model = load_aoti(bundle / entry["hash"] / "model.pt2", device, single_threaded=cuda_graphs)
    run = CudaGraphRunner(model) if cuda_graphs else model

    def call(x: np.ndarray) -> None:
        with torch.no_grad():
            run(torch.from_numpy(x).to(device))

    return call


def measure_one(
    bundle: Path, run: Path | None, tree_hash: str, backend: str, warmup: int, iters: int
) -> dict[str, Any]:
    """Latency, throughput and peak memory of one tree on one backend (in this process)."""
    import torch

    manifest = read_json(bundle / "manifest.json", "bundle manifest", "export the bundle again")
    entry = next((t for t in manifest["trees"] if t["hash"] == tree_hash), None)
    if entry is None:
        raise UserError(f"tree {tree_hash} is not in {bundle}/manifest.json")
    if backend in _AOTI:
        gpu = entry.get("aoti", {}).get("device") == "cuda"
    else:
        gpu = torch.cuda.is_available() and backend in ("eager", "compiled", "tensorrt")
    device = "cuda" if gpu else "cpu"
    if backend in _AOTI:
        call = _aoti_runner(bundle, entry, backend == "aoti_cudagraph")
    elif backend in ("eager", "compiled"):
        if run is None:
            raise UserError(f"backend {backend} needs --run (the search run of the bundle)")
        call = _torch_runner(bundle, run, entry, backend == "compiled", device)
    elif backend == "onnxruntime":
        call = _ort_runner(bundle, entry)
    else:
        call = _trt_runner(bundle, entry)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    _, _, height, width = manifest["input"]["shape"]
    rng = np.random.default_rng(0)
    one = rng.random((1, 3, height, width), dtype=np.float32)
    many = rng.random((THROUGHPUT_BATCH, 3, height, width), dtype=np.float32)
    lat = _timed(lambda: call(one), warmup, iters, sync)
    batch_s = statistics.median(
        _timed(lambda: call(many), max(1, warmup // 4), iters // 4 + 1, sync)
    )
    return {
        "tree": tree_hash,
        "backend": backend,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "flops": entry["flops_counted"],
        "flops_fraction": entry["flops_fraction"],
        "budget": entry["budget"],
        "latency_ms_p50": 1e3 * float(np.percentile(lat, 50)),
        "latency_ms_p90": 1e3 * float(np.percentile(lat, 90)),
        "throughput_img_s": THROUGHPUT_BATCH / batch_s,
        "peak_rss_mb": _peak_rss_mib(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
        "threads": torch.get_num_threads(),
    }


def process_memory_mib(key: str) -> float | None:
    """``VmRSS`` (resident set size) or ``VmHWM`` (its peak) of this process, MiB; None
    without Linux's /proc.

    Not getrusage's ``ru_maxrss``: Linux carries it over from the parent across fork and
    exec, so a child process would start at its parent's peak and report nothing of its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024  # "VmHWM:  123456 kB"
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss_mib() -> float:
    """This process's peak resident memory, MiB: ``VmHWM`` where /proc exists, else
    ``ru_maxrss`` (kilobytes, bytes on macOS), which may include the parent's."""
    peak = process_memory_mib("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def bench_bundles(
    bundles: list[Path],
    *,
    run: Path | None,
    backends: list[str] | None,
    out: Path,
    warmup: int = 10,
    iters: int = 50,
    command: str | None = None,
) -> dict[str, Any]:
    """Measure every tree of every bundle on every backend; write ``out`` (JSON) and a plot.

    ``backends`` None: each bundle's :func:`available_backends`. Every (bundle, backend) is
    checked (:func:`check_backend`) before the first measurement. ``command``, the command
    line that asked for it, is saved with the rows.
    """
    plan = []
    for bundle in bundles:
        if not (bundle / "manifest.json").is_file():
            raise UserError(f"{bundle} is not an export bundle: manifest.json is missing")
        manifest = read_json(bundle / "manifest.json", "bundle manifest", "export the bundle again")
        chosen = backends or available_backends(run is not None, manifest)
        for backend in chosen:
            check_backend(bundle, manifest, backend)
        plan.append((bundle, manifest, chosen))
    rows = []
    for bundle, manifest, chosen in plan:
        for entry in manifest["trees"]:
            for backend in chosen:
                rows.append(_measure_in_child(bundle, run, entry["hash"], backend, warmup, iters))
                print(_row_text(rows[-1]), flush=True)
    result = {"rows": rows, "warmup": warmup, "iters": iters, "batch": THROUGHPUT_BATCH}
    if command is not None:
        result["command"] = command
    write_json(out, result)
    _plot(rows, out.with_suffix(".png"))
    return result


def _measure_in_child(bundle, run, tree_hash, backend, warmup, iters) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dymu.compile.bench", str(bundle), tree_hash, backend]
    cmd += ["--warmup", str(warmup), "--iters", str(iters)]
    if run is not None:
        cmd += ["--run", str(run)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeFailure(f"benchmark of {tree_hash} on {backend} failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"{row['tree']}  {row['backend']:<14} {row['device']:<6} FLOPs {row['flops'] / 1e6:7.2f} M"
        f"  batch 1 p50 {row['latency_ms_p50']:7.3f} ms  p90 {row['latency_ms_p90']:7.3f} ms"
        f"  batch {THROUGHPUT_BATCH} {row['throughput_img_s']:8.1f} img/s"
        f"  peak RSS {row['peak_rss_mb']:6.0f} MB"
    )


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for backend in sorted({r["backend"] for r in rows}):
        pts = sorted(
            (r["flops"] / 1e6, r["latency_ms_p50"]) for r in rows if r["backend"] == backend
        )
        ax.plot(*zip(*pts, strict=True), "o-", label=backend)
    ax.set_xlabel("MFLOPs (fvcore, 1 multiply-add = 1 FLOP)")
    ax.set_ylabel("latency at batch 1, p50 (ms)")
    ax.set_title("latency against FLOPs", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def _main(argv: list[str] | None = None) -> int:
    """Child process: measure one (tree, backend) and print its JSON row."""
    p = argparse.ArgumentParser()
    p.add_argument("bundle", type=Path)
    p.add_argument("tree")
    p.add_argument("backend", choices=BACKENDS)
    p.add_argument("--run", type=Path)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args(argv)
    try:
        row = measure_one(a.bundle, a.run, a.tree, a.backend, a.warmup, a.iters)
    except Exception as exc:  # the parent shows this last line
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
