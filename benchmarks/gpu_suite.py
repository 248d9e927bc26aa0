"""Every check of dymu that needs a GPU, in one run that fits a 15-minute GPU loan.

    python benchmarks/gpu_suite.py --out benchmarks/results/gpu_suite.json       # full, on CUDA
    python benchmarks/gpu_suite.py --device cpu --smoke --out /tmp/gpu_suite.json  # tiny, on CPU

The checks, each independent (one that fails or cannot run here records ``failed`` or
``skipped`` with a one-line reason, and the suite goes on):

- ``latency_eager``, ``latency_cudagraph``, ``latency_compile``, ``latency_aoti``: median and
  p90 ms per call at batch 1 and 32 of two materialized trees of an untrained anchor (latency
  does not depend on the weights): the budget-0.5 tree (``repair`` of the anchor tree, no
  alpha: deterministic) and the anchor tree (budget 1.0). Backends: PyTorch eager; the eager
  module captured into CUDA graphs (:class:`~dymu.compile.aoti.CudaGraphRunner`);
  ``torch.compile`` (``dynamic=False``, one compile per tree and batch); AOTInductor
  packages on CUDA, plain and replayed from CUDA graphs, with their parity against PyTorch.
- ``training``: seconds per training step of stages 0, 1 and 2: the stacked streams
  (the library's modules, as ``train_stage0/1/2`` use them) at fp32, bf16 and fp16
  (``dymu.train.precision``), and the looped reference (streams one after another in Python,
  always fp32), both from ``benchmarks/paper_scale.py``, on one real synthscenes batch.
- ``latency_table``: a tiny search run, then ``dymu profile --backend eager --batch 1``
  on it; records the table's validation errors.
- ``nccl``: a one-process NCCL group (gloo on a CPU): init, ``all_reduce``, destroy.
- ``tensorrt``: where TensorRT and CUDA are present, an engine of the budget-0.5 tree built
  with ``dymu.compile.trt_engine`` and timed like the other backends.

Full mode uses ``configs/default.yaml``'s model at 64x64 with 4 tasks; ``--smoke`` the tiny
config of ``tests/tiny.py`` (32x32, width 4, 3 tasks), few iterations, and on a CPU
``torch.compile`` with the ``aot_eager`` backend (inductor's C++ codegen takes ~40 s per tree
on a small CPU). Checks that may hang or crash the process (compilers, TensorRT, NCCL) run
in a child process of this script with a time limit; the whole suite keeps to
``--time-budget-s`` (in full mode, later checks are skipped once it is spent).

On a CPU only the checks that need CUDA skip (``latency_cudagraph``, ``latency_aoti``,
``tensorrt``: the reason says so); every other one must pass, ``nccl`` with gloo. In smoke
mode running out of time, a check's own limit or the suite's budget, is a failure: the
smoke run exists to show that every code path runs. Exit status: 0 when every check passed
or was skipped with a reason, 1 when one failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = 1
BATCHES = (1, 32)
BUDGET = 0.5
PRECISIONS = ("fp32", "bf16", "fp16")

FULL = {
    "warmup": 10,
    "iters": 100,
    "train_warmup": 3,
    "train_steps": 10,
    "train_batch": 32,
    "budget_s": 450,
    "child_cap_s": 300,
    "search_cap_s": 240,
}
SMOKE = {
    "warmup": 2,
    "iters": 10,
    "train_warmup": 1,
    "train_steps": 2,
    "train_batch": 8,
    "budget_s": 90,
    "child_cap_s": 45,
    "search_cap_s": 45,
}
"""Smoke mode takes about 45 s on a 2-core CPU; the limits leave it twice that, since there
a time-out is a failure."""
DATA = ["data.synth.num_train=256", "data.synth.num_val=32", "data.synth.num_test=32"]
"""Full mode: a small synthscenes (the training batch and the latency-table search)."""
FULL_SEARCH = [
    *DATA,
    "stage0.epochs=1",
    "affinity.images=32",
    "affinity.batches=2",
    "joint.steps=2",
    "stage1.steps=3",
    "stage2.steps=2",
    "evaluate.preferences=2",
    "evaluate.flops_samples=5",
]
SMOKE_SEARCH = ["joint.steps=2", "stage1.steps=3", "stage2.steps=2"]
SMOKE_PROFILE = ["--trees", "8", "--validate", "6", "--rounds", "3", "--reps", "5"]
"""Fewer trees for ``dymu profile`` in smoke mode."""


class Skip(Exception):
    """A check, or one row of it, cannot run here; the message says why."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _load_script(name: str, path: Path):
    """A file of this repository as a module (``benchmarks/`` and ``tests/`` are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- the suite


@dataclass
class Model:
    """The untrained anchor of the mode's config, its space and the two trees timed."""

    cfg: Any
    anchor: Any
    space: Any
    size: tuple[int, int]
    trees: dict[str, Any]
    info: dict[str, Any]

    def net(self, name: str, device: str):
        """The materialized tree ``name`` (BatchNorm folded, eval mode) on ``device``."""
        import torch

        from dymu.compile.materialize import materialize

        with torch.no_grad():
            return materialize(self.anchor, self.trees[name]).to(device).eval()


@dataclass
class Suite:
    """What every check gets: the device, the mode, a work folder and the time left."""

    device: str
    smoke: bool
    work: Path
    deadline: float
    compile_backend: str
    scale: dict[str, Any]
    _model: Model | None = field(default=None, repr=False)

    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def check_time(self) -> None:
        """Raise once the suite's time is spent: a skip in full mode, a failure in smoke
        mode."""
        if self.remaining() <= 0:
            text = "suite time budget exhausted"
            raise RuntimeError(f"{text} (smoke mode)") if self.smoke else Skip(text)

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def overrides(self) -> list[str]:
        """Config overrides of the mode: the tiny config, or small synthscenes sizes."""
        cache = f"data.cache_dir={self.work / 'cache'}"
        if self.smoke:
            tiny = _load_script("gpu_suite_tiny", ROOT / "tests" / "tiny.py")
            return [*tiny.TINY, f"run.device={self.device}", cache]
        return [*DATA, f"run.device={self.device}", cache]

    def config_file(self) -> Path | None:
        return None if self.smoke else ROOT / "configs" / "default.yaml"

    def model(self) -> Model:
        if self._model is None:
            self._model = _build_model(self)
        return self._model


def _build_model(s: Suite) -> Model:
    import torch

    from dymu.config import load_config
    from dymu.data import get_builder
    from dymu.models.anchor import build_anchor
    from dymu.space.anchor_space import anchor_space
    from dymu.space.derive import repair
    from dymu.space.graph import anchor_flops, min_flops
    from dymu.space.tree import TreeSpec

    cfg = load_config(s.config_file(), s.overrides())
    specs = get_builder(cfg.data.name).info_for(cfg.data).select(cfg.data.tasks)
    torch.manual_seed(cfg.run.seed)
    anchor = build_anchor(cfg.model, specs, seed=cfg.run.seed).eval()
    size = tuple(cfg.data.size)
    space = anchor_space(anchor, size)
    full = TreeSpec.no_sharing(len(specs), anchor.num_layers)
    # The tiny config's cheapest tree costs more than half the anchor: use it there.
    cheapest = math.ceil(min_flops(space) / anchor_flops(space) * 1e6) / 1e6
    budget = max(BUDGET, cheapest)
    trees = {"budget_0.5": repair(full, space, budget), "anchor": full}
    info = {
        "config": "configs/default.yaml" if not s.smoke else "tests/tiny.py TINY",
        "backbone": cfg.model.backbone,
        "width": cfg.model.width,
        "tasks": [t.name for t in specs],
        "input_size": list(size),
        "anchor_flops": anchor_flops(space),
        "flops_note": "fvcore, one fused multiply-add = one FLOP",
        "trees": {
            name: {
                "budget": budget if name == "budget_0.5" else 1.0,
                "hash": tree.hash(),
                "flops_fraction": tree.flops(space) / anchor_flops(space),
            }
            for name, tree in trees.items()
        },
    }
    if budget != BUDGET:
        info["trees"]["budget_0.5"]["note"] = f"0.5 is below the cheapest tree ({cheapest})"
    return Model(cfg, anchor, space, size, trees, info)


# --------------------------------------------------------------------------- timing


def _latency(s: Suite, call: Callable[[], Any]) -> dict[str, Any]:
    """Median and p90 ms of ``call`` over timed calls after warm-up (CUDA synchronised)."""
    import numpy as np
    import torch

    with torch.no_grad():
        for _ in range(s.scale["warmup"]):
            call()
        s.sync()
        times = []
        for i in range(s.scale["iters"]):
            if i >= 3 and s.remaining() <= 0:
                break  # out of time: fewer calls, as "iters" records
            start = time.perf_counter()
            call()
            s.sync()
            times.append(1e3 * (time.perf_counter() - start))
    return {
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "iters": len(times),
        "warmup": s.scale["warmup"],
    }


def _image(s: Suite, batch: int):
    import torch

    gen = torch.Generator().manual_seed(batch)
    return torch.rand(batch, 3, *s.model().size, generator=gen).to(s.device)  # [B, 3, H, W]


def _max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in b)


def _latency_rows(
    s: Suite, backend: str, make_call: Callable[[str, Any, Any], tuple[Callable, dict]]
) -> dict[str, Any]:
    """Every (tree, batch) of ``backend``: ``make_call(tree name, eager net, image)`` gives
    the call to time and extra fields for its row."""
    m = s.model()
    rows = []
    for name in m.trees:
        net = m.net(name, s.device)
        for batch in BATCHES:
            s.check_time()
            x = _image(s, batch)
            call, extra = make_call(name, net, x)
            row = {"tree": name, "batch": batch, **_latency(s, lambda c=call, x=x: c(x))}
            row["flops_fraction"] = m.info["trees"][name]["flops_fraction"]
            rows.append({**row, **extra})
    return {"backend": backend, "rows": rows, "model": m.info, "summary": _rows_text(rows)}


def _rows_text(rows: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{r.get('backend', '')}{' ' if 'backend' in r else ''}{r['tree']} b{r['batch']} "
        f"{r['median_ms']:.3g} ms"
        for r in rows
    )


# --------------------------------------------------------------------------- checks


def check_latency_eager(s: Suite) -> dict[str, Any]:
    """The materialized trees in PyTorch eager mode."""
    return _latency_rows(s, "eager", lambda name, net, x: (net, {}))


def check_latency_cudagraph(s: Suite) -> dict[str, Any]:
    """The eager module captured into one CUDA graph per input shape and replayed."""
    import torch

    from dymu.compile.aoti import CudaGraphRunner

    def make(name, net, x):
        runner = CudaGraphRunner(net)
        with torch.no_grad():
            diff = _max_abs_diff(runner(x), net(x))
        return runner, {"max_abs_diff_vs_eager": diff}

    return _latency_rows(s, "cudagraph (torch.cuda.CUDAGraph of eager)", make)


def check_latency_compile(s: Suite) -> dict[str, Any]:
    """``torch.compile`` of each tree (``dynamic=False``: one compile per batch size)."""
    import torch

    compiled: dict[str, Any] = {}

    def make(name, net, x):
        fn = compiled.setdefault(name, torch.compile(net, backend=s.compile_backend, dynamic=False))
        start = time.perf_counter()
        with torch.no_grad():
            fn(x)
        s.sync()
        return fn, {"compile_s": round(time.perf_counter() - start, 2)}

    out = _latency_rows(s, f"torch.compile ({s.compile_backend})", make)
    out["compile_backend"] = s.compile_backend
    return out


def check_latency_aoti(s: Suite) -> dict[str, Any]:
    """AOTInductor packages compiled for CUDA, run plain and from captured CUDA graphs."""
    from dymu.compile import aoti

    if aoti.find_compiler() is None:
        raise Skip("AOTInductor needs a C++ compiler; none found")
    m = s.model()
    packages: dict[str, Any] = {}
    for name in m.trees:
        s.check_time()
        path = s.work / "aoti" / name / "model.pt2"
        result = aoti.compile_aoti(
            m.net(name, "cpu"), path, input_shape=(1, 3, *m.size), device="cuda", max_batch=32
        )
        parity = aoti.aoti_parity(m.net(name, "cpu"), path, device="cuda")
        packages[name] = {"path": path, "compile_s": round(result.compile_s, 2), "parity": parity}
    rows = []
    for backend, graphs in (("aoti", False), ("aoti_cudagraph", True)):
        loaded = {
            n: aoti.load_aoti(p["path"], "cuda", single_threaded=graphs)
            for n, p in packages.items()
        }

        def make(name, net, x, loaded=loaded, graphs=graphs):
            model = loaded[name]
            call = aoti.CudaGraphRunner(model) if graphs else model
            return call, {"compile_s": packages[name]["compile_s"]}

        part = _latency_rows(s, backend, make)
        rows += [{"backend": backend, **r} for r in part["rows"]]
    parity = {n: p["parity"] for n, p in packages.items()}
    out = {"rows": rows, "parity": parity, "model": m.info, "summary": _rows_text(rows)}
    bad = [f"{n} {p['overall']:.3g}" for n, p in parity.items() if not p["allclose"]]
    if bad:
        out["failure"] = f"AOTInductor packages differ from PyTorch (max abs): {', '.join(bad)}"
    return out


def _train_batch(s: Suite, batch: int) -> dict[str, Any]:
    """The first ``batch`` images of the mode's synthscenes training split, on the device."""
    import numpy as np

    from dymu.data import get_builder

    cfg = s.model().cfg
    ds = get_builder(cfg.data.name).load(cfg.data, "train")
    return {k: v.to(s.device) for k, v in ds.batch(np.arange(batch)).items()}


def _time_steps(s: Suite, step: Callable[[], Any]) -> dict[str, Any]:
    """Seconds of each timed call of ``step`` (one training step) after warm-up steps."""
    for _ in range(s.scale["train_warmup"]):
        step()
    times, loss = [], None
    for i in range(s.scale["train_steps"]):
        if i >= 1 and s.remaining() <= 0:
            break  # out of time: fewer steps, as len(step_s) records
        s.sync()
        start = time.perf_counter()
        loss = step()
        s.sync()
        times.append(time.perf_counter() - start)
    return {"step_s": times, "warmup": s.scale["train_warmup"], "last_loss": float(loss)}


def check_training(s: Suite) -> dict[str, Any]:
    """Seconds per training step of stages 0-2, stacked per precision and looped at fp32."""
    import numpy as np
    import torch

    from dymu.config import Stage1Config
    from dymu.errors import UserError
    from dymu.models.anchor import build_anchor
    from dymu.train.precision import Precision

    ps = _load_script("gpu_suite_paper_scale", ROOT / "benchmarks" / "paper_scale.py")
    m, dev = s.model(), torch.device(s.device)
    size, draws = s.scale["train_batch"], Stage1Config().draws
    batch = _train_batch(s, size)
    specs = [t.spec for t in m.anchor.tasks]
    runs = [("stacked", p) for p in PRECISIONS] + [("looped", "fp32")]
    rows, failed = [], []
    for stage in (0, 1, 2):
        for impl, precision in runs:
            row: dict[str, Any] = {"stage": stage, "impl": impl, "precision": precision}
            try:
                s.check_time()
                if precision == "fp16" and not s.cuda:
                    raise Skip("run.precision=fp16 needs CUDA")
                try:
                    prec = Precision(kind=precision, device=dev)
                except UserError as exc:
                    raise Skip(str(exc)) from None
                torch.manual_seed(0)
                anchor = build_anchor(m.cfg.model, specs, seed=m.cfg.run.seed).to(dev)
                impl_name = "dymu" if impl == "stacked" else "looped"
                step, _ = ps.build_step(stage, impl_name, anchor, m.space, batch, prec, draws)
                timed = _time_steps(s, step)
                median = float(np.median(timed["step_s"]))
                row.update(status="passed", batch=size, **timed)
                row.update(step_s_median=median, steps_per_s=1 / median, images_per_s=size / median)
                if not math.isfinite(timed["last_loss"]):
                    raise RuntimeError(f"loss is {timed['last_loss']}")
            except Skip as exc:
                row.update(status="skipped", reason=str(exc))
            except Exception as exc:
                row.update(status="failed", reason=_one_line(exc))
                failed.append(f"stage {stage} {impl} {precision}: {row['reason']}")
            rows.append(row)
    if not failed and not any(r["status"] == "passed" for r in rows):
        raise Skip(rows[0].get("reason", "no row ran"))
    text = ", ".join(
        f"s{r['stage']} {r['impl']} {r['precision']} {r['steps_per_s']:.3g}/s"
        for r in rows
        if r["status"] == "passed"
    )
    return {
        "timed": (
            "one training step (forward, task losses, backward, optimizer step) per timing, "
            "CUDA synchronised, after warm-up steps; built by benchmarks/paper_scale.py's "
            "build_step: stacked = StackedAnchor (stage 0), MixtureNet (stage 1), TreeNet "
            "(stage 2) under dymu.train.precision; looped = the reference that runs the "
            "streams one after another, always fp32 (stage 2: both run the tree node by "
            "node, TreeNet does not stack; they differ only in how the offsets are applied)"
        ),
        "data": f"the first {size} images of synthscenes' training split, one fixed batch",
        "draws_stage1": draws,
        "rows": rows,
        "summary": text,
        **({"failure": "; ".join(failed)} if failed else {}),
    }


def _run_logged(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, str]:
    """Run ``cmd`` in its own session, output to ``log``; (exit code or None on timeout,
    the output)."""
    with log.open("w") as f:
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, text=True
        )
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            code = None
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return code, log.read_text(errors="replace")


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _subprocess_limit(s: Suite, cap: float) -> tuple[float, bool]:
    """(time limit, whether the suite's budget rather than ``cap`` sets it)."""
    s.check_time()
    left = s.remaining()
    return min(cap, left), left < cap


def _timed_out(what: str, limit: float, by_budget: bool, s: Suite) -> Exception:
    """What a time-out raises: a skip where the suite's budget ran out in full mode (the
    least urgent checks give way), a failure otherwise (always in smoke mode)."""
    text = f"{what} did not finish within {limit:.0f} s"
    if by_budget and not s.smoke:
        return Skip(f"{text} (suite time budget)")
    return RuntimeError(f"{text} ({'suite time budget' if by_budget else 'time limit'})")


def check_latency_table(s: Suite) -> dict[str, Any]:
    """A tiny search run, then ``dymu profile`` eager at batch 1 on it."""
    run, logs = s.work / "search_run", s.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cfg = s.config_file()
    search = [sys.executable, "-m", "dymu", "search", "--run", str(run)]
    search += ["-c", str(cfg)] if cfg is not None else []
    search += s.overrides() + (SMOKE_SEARCH if s.smoke else FULL_SEARCH)
    limit, by_budget = _subprocess_limit(s, s.scale["search_cap_s"])
    start = time.perf_counter()
    code, out = _run_logged(search, logs / "search.log", limit)
    search_s = time.perf_counter() - start
    if code is None:
        raise _timed_out("the search", limit, by_budget, s)
    if code != 0:
        raise RuntimeError(f"dymu search exited {code}: {_last_line(out)}")

    table = s.work / "latency.json"
    profile = [sys.executable, "-m", "dymu", "profile", "--run", str(run), "--backend", "eager"]
    profile += ["--batch", "1", "--device", s.device, "--out", str(table)]
    extra = SMOKE_PROFILE if s.smoke else []
    limit, by_budget = _subprocess_limit(s, s.scale["search_cap_s"])
    start = time.perf_counter()
    code, out = _run_logged(profile + extra, logs / "profile.log", limit)
    profile_s = time.perf_counter() - start
    if code is None:
        raise _timed_out("dymu profile", limit, by_budget, s)
    if code != 0:
        raise RuntimeError(f"dymu profile exited {code}: {_last_line(out)}")
    written = json.loads(table.read_text())
    validation = written.get("validation") or written.get("info", {}).get("validation")
    if not validation:
        raise RuntimeError(f"{table.name} has no validation section (keys: {sorted(written)})")
    median, worst = validation["median_abs_rel_err"], validation["max_abs_rel_err"]
    return {
        "command": shlex.join(profile + extra),
        "search_s": round(search_s, 1),
        "profile_s": round(profile_s, 1),
        "validation_trees": validation.get("trees"),
        "median_abs_rel_err": median,
        "max_abs_rel_err": worst,
        "summary": f"validation |rel err| median {median:.3g}, max {worst:.3g}",
    }


def check_nccl(s: Suite) -> dict[str, Any]:
    """A one-process group (NCCL on CUDA, gloo on a CPU): init, all_reduce, destroy."""
    import datetime as dt

    import numpy as np
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise Skip("this torch build has no torch.distributed")
    backend = "nccl" if s.cuda else "gloo"
    if backend == "nccl" and not dist.is_nccl_available():
        raise Skip("this torch build has no NCCL")
    store = s.work / "pg_store"
    store.unlink(missing_ok=True)
    device = torch.device("cuda", torch.cuda.current_device()) if s.cuda else torch.device("cpu")
    if s.cuda:
        torch.cuda.set_device(device)
    start = time.perf_counter()
    dist.init_process_group(
        backend,
        init_method=f"file://{store}",
        rank=0,
        world_size=1,
        timeout=dt.timedelta(seconds=60),
        device_id=device if s.cuda else None,
    )
    init_s = time.perf_counter() - start
    try:
        x = torch.arange(4, dtype=torch.float32, device=device)
        dist.all_reduce(x)
        s.sync()
        if x.tolist() != [0.0, 1.0, 2.0, 3.0]:
            raise RuntimeError(f"all_reduce over one rank gave {x.tolist()}")
        big = torch.ones(2**18, device=device)  # 1 MiB of float32
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            dist.all_reduce(big)
            s.sync()
            times.append(1e3 * (time.perf_counter() - t0))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    ms = float(np.median(times[5:]))
    return {
        "backend": backend,
        "init_method": "file://",
        "world_size": 1,
        "init_s": init_s,
        "all_reduce_1mib_median_ms": ms,
        "summary": f"{backend} init {1e3 * init_s:.3g} ms, all_reduce 1 MiB {ms:.3g} ms",
    }


def check_tensorrt(s: Suite) -> dict[str, Any]:
    """An engine of the budget-0.5 tree through ``dymu.compile.trt_engine``, timed."""
    if importlib.util.find_spec("tensorrt") is None:
        raise Skip("tensorrt is not installed")
    try:
        import tensorrt as trt
    except Exception as exc:
        raise Skip(f"import tensorrt failed: {_one_line(exc)}") from None
    import torch

    from dymu.compile.onnx_export import export_onnx
    from dymu.compile.trt_engine import EngineRunner, build_engine, trt_version_key
    from dymu.errors import UserError

    m, name = s.model(), "budget_0.5"
    major, minor, _ = trt_version_key(trt.__version__).split(".")
    folder = s.work / "trt"
    onnx_path = folder / "model.onnx"
    for target in (f"{major}.{minor}", major):  # a minor dymu does not list: its major's
        try:
            export_onnx(m.net(name, "cpu"), onnx_path, input_shape=(1, 3, *m.size), target=target)
            break
        except UserError as exc:
            if target == major:
                raise
            print(f"ONNX target {target}: {exc}; trying {major}", flush=True)
    limit, _ = _subprocess_limit(s, s.scale["child_cap_s"])
    start = time.perf_counter()
    meta = build_engine(
        onnx_path,
        folder / "model.engine",
        max_batch=max(BATCHES),
        opt_batch=1,
        workspace_mib=1024,
        timing_cache=folder / "timing.cache",
        timeout_s=limit,
    )
    build_s = time.perf_counter() - start
    runner = EngineRunner(folder / "model.engine")
    net = m.net(name, s.device)
    rows = []
    for batch in BATCHES:
        x = _image(s, batch)
        with torch.no_grad():
            diff = _max_abs_diff(runner(x), net(x))
        row = {
            "backend": "tensorrt",
            "tree": name,
            "batch": batch,
            **_latency(s, lambda x=x: runner(x)),
        }
        row.update(flops_fraction=m.info["trees"][name]["flops_fraction"])
        row.update(max_abs_diff_vs_eager=diff, note="fp32 engine; TF32 allowed (TensorRT default)")
        rows.append(row)
    runner.close()
    return {
        "trt_version": trt.__version__,
        "engine": meta.to_json(),
        "build_s": round(build_s, 1),
        "rows": rows,
        "summary": f"build {build_s:.0f} s; " + _rows_text(rows),
    }


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Suite], dict[str, Any]]
    child: bool = False
    """Run in a child process of this script with a time limit (may hang or crash)."""
    needs_cuda: str | None = None
    """Why the check cannot run without CUDA (its skip reason on a CPU); None: it can."""


CHECKS = (
    Check("latency_eager", check_latency_eager),
    Check(
        "latency_cudagraph",
        check_latency_cudagraph,
        needs_cuda="CUDA graphs capture and replay CUDA kernels",
    ),
    Check("training", check_training),
    Check("nccl", check_nccl, child=True),
    Check("latency_table", check_latency_table),
    Check("tensorrt", check_tensorrt, child=True, needs_cuda="TensorRT engines run on NVIDIA GPUs"),
    Check(
        "latency_aoti",
        check_latency_aoti,
        child=True,
        needs_cuda="the AOTInductor packages are compiled for CUDA",
    ),
    Check("latency_compile", check_latency_compile, child=True),
)
"""Cheap checks first, then the compilers (TensorRT, AOTInductor: never run on a GPU before,
then torch.compile), so that a spent time budget costs the least urgent ones."""
NAMES = tuple(c.name for c in CHECKS)


# --------------------------------------------------------------------------- running


def run_check(check: Check, s: Suite) -> dict[str, Any]:
    """``{"status": passed | skipped | failed, "wall_s", "reason", "results"}``: a reason
    unless passed, results when the check returned (a ``"failure"`` entry in them fails it)."""
    start = time.perf_counter()
    try:
        if check.needs_cuda and not s.cuda:
            raise Skip(f"needs CUDA: {check.needs_cuda}")
        s.check_time()
        results = check.run(s)
        # A check that measured something but found a fault keeps its numbers.
        failure = results.pop("failure", None)
        record = {"status": "failed" if failure else "passed", "results": results}
        if failure:
            record["reason"] = failure
    except Skip as exc:
        record = {"status": "skipped", "reason": str(exc)}
    except Exception as exc:
        record = {"status": "failed", "reason": _one_line(exc)}
        record["traceback"] = traceback.format_exc(limit=-6)
    return {**record, "wall_s": round(time.perf_counter() - start, 2)}


def run_in_child(check: Check, s: Suite) -> dict[str, Any]:
    """``run_check`` in a fresh process of this script, killed after its time limit."""
    start = time.perf_counter()
    try:
        limit, by_budget = _subprocess_limit(s, s.scale["child_cap_s"])
    except Skip as exc:
        return {"status": "skipped", "reason": str(exc), "wall_s": 0.0}
    except RuntimeError as exc:  # out of time in smoke mode
        return {"status": "failed", "reason": _one_line(exc), "wall_s": 0.0}
    out = s.work / f"{check.name}.result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", check.name]
    cmd += ["--worker-out", str(out), "--device", s.device, "--work", str(s.work)]
    cmd += ["--compile-backend", s.compile_backend, "--time-budget-s", str(limit - 2)]
    cmd += ["--smoke"] if s.smoke else []
    (s.work / "logs").mkdir(parents=True, exist_ok=True)
    code, text = _run_logged(cmd, s.work / "logs" / f"{check.name}.log", limit)
    wall = round(time.perf_counter() - start, 2)
    if out.is_file():
        return {**json.loads(out.read_text()), "wall_s": wall}
    if code is None:
        exc = _timed_out(f"check {check.name}", limit, by_budget, s)
        return {"status": "skipped" if isinstance(exc, Skip) else "failed", "reason": str(exc),
                "wall_s": wall}  # fmt: skip
    return {
        "status": "failed",
        "reason": f"worker exited {code}: {_last_line(text)}",
        "wall_s": wall,
    }


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from dymu.compile.latency import cpu_model

    cuda = args.device.startswith("cuda")
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version() if cuda else None,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if cuda:
        env["tf32"] = {
            "cudnn_conv": getattr(torch.backends.cudnn.conv, "fp32_precision", None),
            "matmul": getattr(torch.backends.cuda.matmul, "fp32_precision", None),
        }
    with contextlib.suppress(Exception):
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    return env


def summary_text(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [
        f"gpu_suite ({result['mode']}, {env['device']}: {env['device_name']}), torch "
        f"{env['torch']}, CUDA {env['cuda_version']}, {result['wall_s']:.0f} s"
    ]
    for name, rec in result["checks"].items():
        detail = rec.get("reason") or rec.get("results", {}).get("summary", "")
        lines.append(f"  {name:<18} {rec['status']:<8} {rec['wall_s']:>6.1f} s  {detail}")
    counts = result["counts"]
    lines.append(
        f"{counts['passed']} passed, {counts['skipped']} skipped, {counts['failed']} failed"
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/gpu_suite.json")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if available")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few iterations")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {NAMES}")
    parser.add_argument("--time-budget-s", type=float, help="default 450, smoke 90")
    parser.add_argument("--compile-backend", help="default inductor (smoke on CPU: aot_eager)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder")
    parser.add_argument("--worker", choices=NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here (use --device cpu)")
    args.only = NAMES if args.only is None else tuple(args.only.split(","))
    unknown = [n for n in args.only if n not in NAMES]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {', '.join(NAMES)}")
    scale = SMOKE if args.smoke else FULL
    if args.time_budget_s is None:
        args.time_budget_s = scale["budget_s"]
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke and args.device == "cpu" else "inductor"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="dymu-gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    # Inductor's caches go to the work folder: compile times are cold and nothing leaks.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor"))
    suite = Suite(
        device=args.device,
        smoke=args.smoke,
        work=work,
        deadline=start + args.time_budget_s,
        compile_backend=args.compile_backend,
        scale=SMOKE if args.smoke else FULL,
    )
    if args.worker:  # a child of run_in_child
        from dymu.io import write_json

        write_json(args.worker_out, run_check(CHECKS[NAMES.index(args.worker)], suite))
        return 0

    checks: dict[str, Any] = {}
    try:
        for check in CHECKS:
            if check.name not in args.only:
                continue
            print(f"[{time.perf_counter() - start:5.0f} s] {check.name} ...", flush=True)
            child = check.child and (suite.cuda or not check.needs_cuda)
            rec = run_in_child(check, suite) if child else run_check(check, suite)
            checks[check.name] = rec
            print(
                f"        {rec['status']} in {rec['wall_s']} s {rec.get('reason', '')}", flush=True
            )
    finally:
        if args.work is None and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    from dymu.io import write_json

    counts = {
        k: sum(r["status"] == k for r in checks.values()) for k in ("passed", "skipped", "failed")
    }
    result = {
        "suite": "gpu_suite",
        "schema": SCHEMA,
        "mode": "smoke" if args.smoke else "full",
        "env": environment(args),
        "time_budget_s": args.time_budget_s,
        "wall_s": round(time.perf_counter() - start, 1),
        "counts": counts,
        "checks": checks,
    }
    write_json(args.out, result)
    print(summary_text(result))
    print(f"wrote {args.out}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
