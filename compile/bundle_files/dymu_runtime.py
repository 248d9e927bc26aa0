"""Standalone runtime for a dymu deploy bundle: verify it, build TensorRT engines, run it.

A bundle (``dymu export``) is a folder with ``manifest.json``, ``golden_input.npy`` and, per
tree, ``<hash>/model.onnx`` and ``<hash>/golden_outputs.npz``. This file is copied into
every bundle so that a device (a Jetson) can use it without installing dymu or PyTorch
training code: it needs numpy plus either onnxruntime or TensorRT (with torch for CUDA
buffers), and nothing from dymu.

Why it is built the way it is (see the bundle's README for the device steps):

* Engines are not portable across TensorRT versions or GPUs, so the bundle ships ONNX and
  ``build`` makes ``<hash>/model.engine`` on the device, one tree at a time (Jetson memory
  is shared by CPU and GPU), with a capped workspace and ONE timing cache for all trees
  (``timing.cache``: trees share layer shapes, so later builds are much faster).
* Each build runs in a child process: without a usable GPU TensorRT fails in native code,
  and such a crash must not take the caller down.
* Every engine gets ``model.engine.json`` (TensorRT version, GPU, compute capability,
  precision, shapes); an engine whose metadata does not match this device is refused with
  one readable line instead of failing inside TensorRT.
* TensorRT API families: 8.5/8.6 need the ``EXPLICIT_BATCH`` network flag; 10.x does not;
  11.x has no precision flags at all (networks are strongly typed), so only fp32 is built
  there from the fp32 ONNX. ``build_serialized_network`` and the tensor-name runtime API
  (``set_input_shape``/``set_tensor_address``/``execute_async_v3``) are common to all.

The TensorRT path follows NVIDIA's documented Python API and has not yet been run on a
device by dymu's authors; the ONNX Runtime path is tested.

CLI::

    python3 dymu_runtime.py verify BUNDLE [--backend onnxruntime|tensorrt] [--atol A]
    python3 dymu_runtime.py build BUNDLE [--precision fp32|fp16] [--workspace-mib N]
    python3 dymu_runtime.py bench-switch BUNDLE [--backend ...]
    python3 dymu_runtime.py profile BUNDLE [--backend ...] [--batch B]  # -> latency.json

Exit status: 0 ok, 1 golden-output mismatch or a failed build, 2 a refused request (missing
backend, bad bundle, mismatched engine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

PRECISIONS = ("fp32", "fp16")
BACKENDS = ("auto", "onnxruntime", "tensorrt")
ENGINE = "model.engine"
TIMING_CACHE = "timing.cache"
DEFAULT_ATOL = 1e-4
FP16_ATOL = 5e-2
MAX_BATCH = 32
LATENCY_FILE = "latency.json"
INSTALL_HINT = (
    "on Jetson install JetPack's python3-libnvinfer and create the venv with "
    "'python3 -m venv --system-site-packages' so it can see it; elsewhere install NVIDIA's "
    "TensorRT wheel"
)


class BundleError(Exception):
    """A request this runtime refuses (exit status 2): bad bundle, missing backend,
    engine built for another device. The message says what to do."""


class VerifyError(Exception):
    """Outputs differ from the golden outputs by more than the tolerance (exit status 1)."""


# --- bundle -------------------------------------------------------------------------------


def load_manifest(bundle: str | os.PathLike) -> dict[str, Any]:
    """The bundle's ``manifest.json``, checked for the keys this runtime relies on.

    Raises:
        BundleError: no manifest, not JSON, or lacking ``tasks``/``trees``/``input``/``budget``.
    """
    path = Path(bundle) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} not found: is {bundle} a dymu bundle?") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    missing = [k for k in ("tasks", "trees", "input", "budget") if k not in manifest]
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}")
    if not manifest["trees"]:
        raise BundleError(f"{path} lists no trees")
    return manifest


def _sha256(path: Path) -> str:  # dymu.io.sha256_file; this file must not import dymu
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_files(bundle: Path, tree: dict[str, Any]) -> None:
    """The tree's files exist and match the manifest's sha256 (a truncated copy would
    otherwise surface as a confusing parse error or a golden mismatch)."""
    for name, digest in tree.get("files", {}).items():
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{path} is missing; copy the whole bundle again")
        if _sha256(path) != digest:
            raise BundleError(f"{path} does not match its sha256 in the manifest; copy it again")


# --- ONNX Runtime -------------------------------------------------------------------------


def _ort_session(onnx_path: Path) -> Any:
    """An ONNX Runtime session on CUDA when available, else CPU, with :func:`cpu_threads`
    intra-op threads (stated, so that a latency table can name them).

    The TensorRT execution provider is left out on purpose: it would build engines
    implicitly, which is what ``build`` does explicitly and checkably.
    """
    ort = _require_onnxruntime()
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in ort.get_available_providers()] or None
    # Idle thread pools must not spin: several trees' sessions are held at once, and one
    # session's spinning threads would slow the next tree's calls.
    options = ort.SessionOptions()
    options.intra_op_num_threads = cpu_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(onnx_path), options, providers=providers)


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime as ort
    except ImportError as exc:
        hint = "pip install onnxruntime (onnxruntime-gpu where CUDA wheels exist)"
        raise BundleError(f"onnxruntime is not installed ({exc}); {hint}") from None
    return ort


class _OrtModel:
    """One tree in ONNX Runtime; outputs keyed by task name (the ONNX output names)."""

    def __init__(self, onnx_path: Path) -> None:
        self.session = _ort_session(onnx_path)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: images})
        return dict(zip(self.output_names, outs))  # noqa: B905 (Python 3.8 has no strict=)

    def identity(self) -> dict[str, str]:
        """What this session runs on: the provider it really uses (ONNX Runtime falls back
        to the CPU when CUDA fails to start) and that provider's device."""
        import onnxruntime as ort

        provider = self.session.get_providers()[0]
        if provider == "CPUExecutionProvider":
            threads = self.session.get_session_options().intra_op_num_threads
            device = cpu_device_name(threads)
        else:
            device = _cuda_name()
        return {
            "backend": "onnxruntime",
            "backend_version": f"onnxruntime {ort.__version__}",
            "provider": provider,
            "device": device,
        }


# --- device names (as dymu's latency tables write them) -------------------------------------


def cpu_threads() -> int:
    """The intra-op threads ONNX Runtime gets here: ``MKL_NUM_THREADS`` or
    ``OMP_NUM_THREADS`` when set (the knob to change it), else every CPU this process may
    run on. PyTorch picks its threads the same way, and dymu's tables are measured with
    PyTorch's count, so a table and this runtime name one machine alike."""
    for var in ("MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        try:
            n = int(os.environ.get(var, ""))
        except ValueError:
            continue
        if n >= 1:
            return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows: the same
    words as dymu's own ``cpu_model``."""
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_device_name(threads: int) -> str:
    """A CPU as a latency table names it: the model and the threads (the same CPU with
    other threads is another device, since latency changes with them)."""
    return f"cpu: {cpu_model()} ({threads} threads)"


def _cuda_name() -> str:
    """The name of CUDA device 0 (the one ONNX Runtime's CUDA provider uses by default)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "CUDA device 0"


# --- TensorRT: versions, device, metadata -------------------------------------------------


def _require_tensorrt() -> Any:
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: bindings present, libnvinfer missing
        raise BundleError(f"TensorRT is not installed ({exc}); {INSTALL_HINT}") from None
    return tensorrt


def _require_torch_cuda() -> Any:
    """torch with a CUDA device: TensorRT buffers live in torch CUDA tensors here."""
    try:
        import torch
    except ImportError:
        raise BundleError(
            "the TensorRT backend needs PyTorch with CUDA for its buffers (on Jetson: "
            "NVIDIA's PyTorch wheel for your JetPack)"
        ) from None
    if not torch.cuda.is_available():
        raise BundleError("TensorRT needs a CUDA GPU; torch sees none")
    return torch


def trt_api(version: str) -> str:
    """``"v8"`` (8.5, 8.6), ``"v10"`` or ``"v11"``: the Python API family of a version.

    Raises:
        BundleError: older than 8.5 (no tensor-name API), 9.x, or newer than 11.x.
    """
    major, minor = _version_key(version)[:2]
    if major == 8 and minor >= 5:
        return "v8"
    if major in (10, 11):
        return f"v{major}"
    raise BundleError(f"TensorRT {version} is not supported: use 8.5, 8.6, 10.x or 11.x")


def _version_key(version: str) -> tuple[int, int, int]:
    """``(major, minor, patch)``: engines are tied to these; the 4th (build) field is not."""
    parts = [int(p) for p in re.findall(r"\d+", str(version))[:3]]
    if not parts:
        raise BundleError(f"malformed TensorRT version {version!r}")
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def current_device() -> dict[str, str]:
    """``{trt_version, gpu_name, compute_capability}`` of this process's TensorRT and GPU."""
    trt = _require_tensorrt()
    torch = _require_torch_cuda()
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "trt_version": str(trt.__version__),
        "gpu_name": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}.{minor}",
    }


def meta_path(engine_path: str | os.PathLike) -> Path:
    """``<engine>.json``: the engine's metadata (the same place dymu itself writes it)."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


META_KEYS = ("trt_version", "gpu_name", "compute_capability", "precision", "input_name")


def read_engine_meta(engine_path: str | os.PathLike) -> dict[str, Any]:
    """The metadata beside an engine.

    Raises:
        BundleError: missing, not JSON, or lacking a key the device check needs.
    """
    path = meta_path(engine_path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(
            f"{path} not found: the engine has no metadata; rebuild it with "
            f"'python3 dymu_runtime.py build .'"
        ) from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise BundleError(f"{path} lacks {', '.join(missing)}; rebuild the engine")
    return meta


def check_engine_meta(
    meta: dict[str, Any],
    device: dict[str, str],
    *,
    precision: str | None = None,
    onnx_sha256: str | None = None,
) -> None:
    """Refuse an engine built for another TensorRT, GPU, precision or ONNX.

    TensorRT would fail deep in deserialization on a version or GPU mismatch (or crash,
    with the lean runtime); a precision mismatch would silently give other numerics; an
    engine from an older ONNX would run the wrong tree. One line says what differs.

    Args:
        meta: the engine's metadata (:func:`read_engine_meta`).
        device: this device (:func:`current_device`).
        precision: the precision expected (``None``: accept the engine's).
        onnx_sha256: the ONNX the engine must come from (``None``: do not check).

    Raises:
        BundleError: the differences, engine vs here, and that it must be rebuilt.
    """
    diffs = []
    built, here = _version_key(meta["trt_version"]), _version_key(device["trt_version"])
    if built != here:
        diffs.append(f"TensorRT {'.'.join(map(str, built))} vs {'.'.join(map(str, here))}")
    if str(meta["compute_capability"]) != str(device["compute_capability"]):
        diffs.append(
            f"GPU compute capability {meta['compute_capability']} ({meta['gpu_name']}) vs "
            f"{device['compute_capability']} ({device['gpu_name']})"
        )
    if precision is not None and meta["precision"] != precision:
        diffs.append(f"precision {meta['precision']} vs {precision} requested")
    if onnx_sha256 is not None and meta.get("onnx_sha256") not in (None, onnx_sha256):
        diffs.append("built from another model.onnx")
    if diffs:
        raise BundleError(
            f"engine does not match this device ({'; '.join(diffs)}; engine vs here): "
            f"rebuild it here with 'python3 dymu_runtime.py build .'"
        )
    if meta["gpu_name"] != device["gpu_name"]:
        warnings.warn(
            f"engine was built on {meta['gpu_name']}, running on {device['gpu_name']} "
            f"(same compute capability); rebuild it here for best speed",
            stacklevel=2,
        )


# --- TensorRT: building -------------------------------------------------------------------


def _profile_shapes(
    shape: list[int], max_batch: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """min/opt/max of the input: batch 1..max_batch (opt 1: the controller's use), or the
    fixed batch of a static-batch export."""
    rest = tuple(int(d) for d in shape[1:])
    if any(d < 0 for d in rest):
        raise BundleError(f"input shape {shape}: only the batch dimension may be dynamic")
    if shape[0] >= 0:
        fixed = (int(shape[0]), *rest)
        return fixed, fixed, fixed
    return (1, *rest), (1, *rest), (max_batch, *rest)


def _build_one(
    onnx_path: Path, engine_path: Path, precision: str, workspace_mib: int, max_batch: int
) -> dict[str, Any]:
    """Build one engine in this process (the child side of :func:`build_engines`)."""
    trt = _require_tensorrt()
    version = str(trt.__version__)
    api = trt_api(version)
    if api == "v11" and precision != "fp32":
        raise BundleError(
            f"TensorRT {version} has no precision flags (strongly typed networks) and this "
            f"bundle's ONNX is fp32: build with --precision fp32"
        )
    device = current_device()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if api == "v8":  # 8.x defaults to implicit batch, which ONNX networks cannot use
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    else:  # 10.x/11.x: always explicit batch
        network = builder.create_network()
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"TensorRT {version} cannot parse {onnx_path}: {errors or '?'}")
    tensor = network.get_input(0)
    shapes = _profile_shapes(list(tensor.shape), max_batch)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if api in ("v8", "v10"):
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif hasattr(trt.BuilderFlag, "TF32"):
            # fp32 means fp32: TF32 (on by default on Ampere/Orin) would exceed the
            # golden outputs' 1e-4 tolerance that verify checks.
            config.clear_flag(trt.BuilderFlag.TF32)
    profile = builder.create_optimization_profile()
    profile.set_shape(tensor.name, *shapes)
    config.add_optimization_profile(profile)

    cache_path = engine_path.parent.parent / TIMING_CACHE
    data = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or config.set_timing_cache(cache, ignore_mismatch=False) is False:
        print(f"warning: ignoring {cache_path} (made on another device)", file=sys.stderr)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT could not build {onnx_path} (see its log above)")
    meta = {
        **device,
        "precision": precision,
        "input_name": tensor.name,
        "min_shape": list(shapes[0]),
        "opt_shape": list(shapes[1]),
        "max_shape": list(shapes[2]),
        "output_names": [network.get_output(i).name for i in range(network.num_outputs)],
        "onnx_sha256": _sha256(onnx_path),
        "workspace_bytes": int(workspace_mib) << 20,
        "onnx_path": str(onnx_path),
    }
    _write_atomic(engine_path, bytes(memoryview(serialized)))
    _write_atomic(meta_path(engine_path), json.dumps(meta, indent=2).encode())
    timing = config.get_timing_cache()
    if timing is not None:
        _write_atomic(cache_path, bytes(memoryview(timing.serialize())))
    return meta


def _write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file: a killed build never leaves a truncated engine."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_engines(
    bundle: str | os.PathLike,
    precision: str = "fp32",
    workspace_mib: int = 512,
    max_batch: int = MAX_BATCH,
    timeout_s: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Build ``<hash>/model.engine`` (+ ``.json``) for every tree, one child process each.

    One at a time and with a capped workspace because Jetson memory is shared; every
    build reads and updates the bundle's one ``timing.cache``.

    Returns:
        ``{hash: engine metadata}``.

    Raises:
        BundleError: bad arguments, no TensorRT or GPU, or an ONNX TensorRT refuses.
        RuntimeError: a build failed or crashed (its last stderr line is quoted).
    """
    if precision not in PRECISIONS:
        raise BundleError(f"unknown precision {precision!r}; use {' or '.join(PRECISIONS)}")
    if workspace_mib < 1 or max_batch < 1:
        raise BundleError("workspace_mib and max_batch must be >= 1")
    bundle = Path(bundle).resolve()
    manifest = load_manifest(bundle)
    _require_tensorrt()
    _require_torch_cuda()
    metas = {}
    for tree in manifest["trees"]:
        h = tree["hash"]
        _check_files(bundle, tree)
        engine = bundle / h / ENGINE
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "_build-one",
            str(bundle / h / "model.onnx"),
            str(engine),
            precision,
            str(workspace_mib),
            str(max_batch),
        ]
        print(f"building {h} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            lines = [x for x in (proc.stderr + proc.stdout).splitlines() if x.strip()]
            last = lines[-1] if lines else "no message"
            if last.startswith("error: "):  # str.removeprefix is Python 3.9+
                last = last[len("error: ") :]
            if proc.returncode == 2:
                raise BundleError(last)
            raise RuntimeError(f"TensorRT build of {h} failed (exit {proc.returncode}): {last}")
        metas[h] = read_engine_meta(engine)
        print(f"built {h} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return metas


# --- TensorRT: running --------------------------------------------------------------------


class _TrtModel:
    """One tree's engine, run on torch CUDA tensors (numpy in, numpy out).

    The metadata is checked against this device before TensorRT sees the engine.
    """

    def __init__(self, engine_path: Path, onnx_sha256: str | None = None) -> None:
        if not engine_path.is_file():
            raise BundleError(
                f"{engine_path} not found: build the engines on this device first with "
                f"'python3 dymu_runtime.py build .'"
            )
        trt = _require_tensorrt()
        self.torch = torch = _require_torch_cuda()
        self.meta = read_engine_meta(engine_path)
        self.device = current_device()
        check_engine_meta(self.meta, self.device, onnx_sha256=onnx_sha256)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {engine_path}")
        self._context = self._engine.create_execution_context()
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_name = next(n for n in names if is_input[n])
        self.output_names = [n for n in names if not is_input[n]]
        table = {
            "FLOAT": torch.float32,
            "HALF": torch.float16,
            "BF16": torch.bfloat16,
            "INT32": torch.int32,
            "INT64": torch.int64,
            "INT8": torch.int8,
            "UINT8": torch.uint8,
            "BOOL": torch.bool,
        }
        self._dtypes = {}
        for n in names:
            dt = engine.get_tensor_dtype(n)
            self._dtypes[n] = table[getattr(dt, "name", str(dt).rsplit(".", 1)[-1])]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        torch, meta, ctx = self.torch, self.meta, self._context
        lo, hi = meta.get("min_shape"), meta.get("max_shape")
        if lo and hi and not (lo[0] <= images.shape[0] <= hi[0]):
            raise ValueError(f"batch {images.shape[0]} is outside the engine's {lo[0]}..{hi[0]}")
        device = torch.device("cuda", torch.cuda.current_device())
        x = torch.from_numpy(np.ascontiguousarray(images)).to(
            device=device, dtype=self._dtypes[self.input_name]
        )
        if ctx.set_input_shape(self.input_name, tuple(x.shape)) is False:
            raise ValueError(f"TensorRT refused input shape {list(x.shape)}")
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        outs = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self._dtypes[name], device=device)
            ctx.set_tensor_address(name, outs[name].data_ptr())
        stream = torch.cuda.current_stream(device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see its log above)")
        return {k: v.float().cpu().numpy() for k, v in outs.items()}  # .cpu() synchronises

    def identity(self) -> dict[str, str]:
        """What this engine runs on: TensorRT's version and the GPU, named as a latency
        table names it."""
        return {
            "backend": "tensorrt",
            "backend_version": f"tensorrt {self.device['trt_version']}",
            "device": self.device["gpu_name"],
        }


# --- controller ---------------------------------------------------------------------------


def _resolve_backend(backend: str) -> str:
    """``auto``: TensorRT when it, torch and a CUDA GPU are all present, else ONNX Runtime."""
    if backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        return backend
    if backend == "tensorrt":  # refuse now, not at the first set(): clearer, and earlier
        _require_tensorrt()
        _require_torch_cuda()
        return backend
    try:
        _require_tensorrt()
        _require_torch_cuda()
    except BundleError:
        return "onnxruntime"
    return "tensorrt"


class Controller:
    """Switch between the bundle's models at run time by task preference.

    A bundle holds one model per exported preference: its tree with the adaptation the
    search evaluated for that preference (the manifest calls them ``trees``; an entry's
    ``tree`` names the tree it runs). ``set(preference, budget)`` picks the model of the
    exported preference nearest to the requested one (Euclidean; ties go to the first in
    the manifest) and loads its ONNX Runtime session or TensorRT engine once; later
    switches back to it reuse the loaded model (cache by its hash), so a switch is a
    dictionary lookup after warm-up.

    Budget rule: a bundle holds the trees of ONE budget (``manifest["budget"]``, a
    fraction of the anchor's FLOPs) and every tree costs at most that. A requested budget
    is accepted when it is >= the bundle's budget (the bundle's trees fit within it), and
    refused when below it: no tree in the bundle is known to fit a smaller budget, and
    silently running one would break the caller's compute limit. A looser budget does not
    give a bigger tree: export another bundle for that.

    Latency rule: ``set(preference, latency_ms=X, batch=B)`` picks among the trees this
    device measured at most X ms at batch B (``profile``: ``latency.json`` in the bundle,
    made with the controller's backend, provider and threads on this device, at that
    batch) the one serving the nearest preference; a target below every tree's measured
    latency is refused, naming the fastest.

    Args:
        bundle: the bundle folder.
        backend: ``auto`` (TensorRT if usable, else ONNX Runtime), ``onnxruntime`` or
            ``tensorrt`` (engines built with ``build`` first).

    Attributes:
        last_switch_seconds: wall time of the last ``set`` (load included when cold).
        tree: the manifest entry of the current tree (``None`` before ``set``).
    """

    def __init__(self, bundle: str | os.PathLike, backend: str = "auto") -> None:
        self.bundle = Path(bundle)
        self.manifest = load_manifest(self.bundle)
        self.tasks = list(self.manifest["tasks"])
        self.budget = float(self.manifest["budget"])
        self.backend = _resolve_backend(backend)
        self._points = np.array(
            [p for t in self.manifest["trees"] for p in t["preferences"]], dtype=np.float64
        )
        self._owner = [t for t in self.manifest["trees"] for _ in t["preferences"]]
        self._models: dict[str, Any] = {}
        self.tree: dict[str, Any] | None = None
        self.last_switch_seconds: float | None = None
        self._identity: dict[str, str] | None = None

    def _check(self, preference: Any, budget: Any) -> tuple[np.ndarray, float]:
        try:
            r = np.asarray(preference, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"preference must be a list of numbers, got {preference!r}") from None
        n = len(self.tasks)
        if r.shape != (n,):
            raise ValueError(
                f"preference must have {n} weights (one per task: {', '.join(self.tasks)}), "
                f"got shape {list(r.shape)}"
            )
        if not np.all(np.isfinite(r)):
            raise ValueError(f"preference must be finite, got {r.tolist()}")
        if np.any(r < 0):
            raise ValueError(f"preference weights must be >= 0, got {r.tolist()}")
        if abs(r.sum() - 1.0) > 1e-6:
            raise ValueError(f"preference must sum to 1 (within 1e-6), got sum {r.sum():.8g}")
        try:
            b = float(budget)
        except (TypeError, ValueError):
            raise ValueError(f"budget must be a number, got {budget!r}") from None
        if not math.isfinite(b):
            raise ValueError(f"budget must be finite, got {budget!r}")
        if b < self.budget - 1e-9:
            raise ValueError(
                f"budget {b:g} is below this bundle's budget {self.budget:g}: its trees may "
                f"cost up to {self.budget:g} of the anchor's FLOPs; export a bundle for {b:g}"
            )
        return r, b

    def select(
        self, preference: Any, budget: Any = None, latency_ms: float | None = None, batch: int = 1
    ) -> dict[str, Any]:
        """The manifest entry of the tree ``set`` would switch to (validates; loads nothing
        but, with ``latency_ms``, one tree to learn what this controller runs on)."""
        r, _ = self._check(preference, self.budget if budget is None else budget)
        distance = np.linalg.norm(self._points - r, axis=1)  # [P] to every served preference
        if latency_ms is not None:
            measured = self._measured(batch)
            fits = np.array([measured[t["hash"]] <= latency_ms for t in self._owner])
            if not fits.any():
                fastest = min(measured.values())
                raise ValueError(
                    f"latency_ms {latency_ms:g}: the fastest tree of this bundle measured "
                    f"{fastest:.3f} ms on this device ({self.backend})"
                )
            distance = np.where(fits, distance, np.inf)
        return self._owner[int(np.argmin(distance))]

    def _measured(self, batch: int) -> dict[str, float]:
        """Each tree's median latency in ms from the bundle's ``latency.json``, which must
        come from this backend, provider and device (threads included) at ``batch``."""
        path = self.bundle / LATENCY_FILE
        again = f"run 'python3 dymu_runtime.py profile . --backend {self.backend} --batch {batch}'"
        if not path.is_file():
            raise BundleError(f"{path} not found: {again} first")
        try:
            table = json.loads(path.read_text(encoding="utf-8"))
            trees = {h: float(v["ms"]) for h, v in table["trees"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BundleError(f"cannot read {path} ({exc}); {again}") from None
        for key, here in [*self.identity().items(), ("batch", batch)]:
            if table.get(key) != here:
                raise BundleError(
                    f"{path} was measured for {key} {table.get(key)}, not {here}; {again}"
                )
        missing = [t["hash"] for t in self.manifest["trees"] if t["hash"] not in trees]
        if missing:
            raise BundleError(f"{path} lacks trees {', '.join(missing)}; {again}")
        return trees

    def identity(self) -> dict[str, str]:
        """What this controller runs on (backend and its version, ONNX Runtime's provider,
        the device), as ``latency.json`` records it: read from a loaded tree, since only a
        session knows the provider it really got."""
        if self._identity is None:
            if not self._models:
                first = self.manifest["trees"][0]
                self._models[first["hash"]] = self._load(first)
            self._identity = next(iter(self._models.values())).identity()
        return self._identity

    def set(
        self,
        preference: Any,
        budget: Any = None,
        *,
        latency_ms: float | None = None,
        batch: int = 1,
    ) -> dict[str, Any]:
        """Switch to the tree for ``preference`` within ``budget`` (default: the bundle's)
        or, with ``latency_ms``, within that measured latency for calls of ``batch``
        images; returns its manifest entry.

        Raises:
            ValueError: preference not ``len(tasks)`` finite non-negative weights summing
                to 1 (within 1e-6), a budget that is not a finite number >= the bundle's
                budget, or a latency below every tree's.
            BundleError: ``latency_ms`` without a ``latency.json`` of this backend,
                provider and device at ``batch``.
        """
        t0 = time.perf_counter()
        tree = self.select(preference, budget, latency_ms, batch)
        h = tree["hash"]
        if h not in self._models:
            self._models[h] = self._load(tree)
        self.tree = tree
        self.last_switch_seconds = time.perf_counter() - t0
        return tree

    def _load(self, tree: dict[str, Any]) -> Any:
        folder = self.bundle / tree["hash"]
        if self.backend == "onnxruntime":
            return _OrtModel(folder / "model.onnx")
        onnx = folder / "model.onnx"
        return _TrtModel(folder / ENGINE, _sha256(onnx) if onnx.is_file() else None)

    @property
    def loaded(self) -> list[str]:
        """Hashes of the trees whose sessions/engines are held."""
        return list(self._models)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run the current tree on ``images`` [B, 3, H, W] float32; outputs by task name."""
        if self.tree is None:
            raise RuntimeError("call set(preference, budget) before running the controller")
        x = np.asarray(images)
        shape = self.manifest["input"]["shape"]
        if x.ndim != 4 or list(x.shape[1:]) != list(shape[1:]):
            want = ", ".join(map(str, shape[1:]))
            raise ValueError(f"images must be [B, {want}], got {list(x.shape)}")
        outs = self._models[self.tree["hash"]](np.ascontiguousarray(x, dtype=np.float32))
        return {task: outs[task] for task in self.tasks}


# --- verify and bench ---------------------------------------------------------------------


def verify(
    bundle: str | os.PathLike, backend: str = "onnxruntime", atol: float | None = None
) -> dict[str, float]:
    """Run every tree on ``golden_input.npy`` and compare with its ``golden_outputs.npz``.

    This is the device-side proof that the model runs as exported (same numbers as
    PyTorch on the export machine). ``atol`` defaults to 1e-4, or 5e-2 for fp16 engines.

    Returns:
        ``{hash: max absolute error over all tasks}``.

    Raises:
        VerifyError: some tree is off by more than ``atol`` (all trees are listed).
        BundleError: bad bundle, missing backend or engine.
    """
    bundle = Path(bundle)
    ctl = Controller(bundle, backend)
    golden = np.load(bundle / ctl.manifest.get("golden_input", {}).get("file", "golden_input.npy"))
    errors, bad = {}, []
    for tree in ctl.manifest["trees"]:
        _check_files(bundle, tree)
        ctl.set(tree["preferences"][0], ctl.budget)
        model = ctl._models[tree["hash"]]
        tol = atol
        if tol is None:
            fp16 = getattr(model, "meta", {}).get("precision") == "fp16"
            tol = FP16_ATOL if fp16 else DEFAULT_ATOL
        outs = ctl(golden)
        ref = np.load(bundle / tree["hash"] / "golden_outputs.npz")
        err = max(float(np.max(np.abs(outs[t] - ref[t]))) for t in ctl.tasks)
        errors[tree["hash"]] = err
        if not err <= tol:
            bad.append(f"{tree['hash']} (max error {err:.2e} > {tol:g})")
    if bad:
        raise VerifyError(f"golden outputs differ ({ctl.backend}): {', '.join(bad)}")
    return errors


def bench_switch(
    bundle: str | os.PathLike, backend: str = "auto", rounds: int = 3
) -> dict[str, Any]:
    """Time ``Controller.set`` between trees: cold (first load of each tree) and warm
    (cycling through loaded trees), plus the first run after a switch.

    Switching cost decides whether a device can follow preference changes in real time
    or must keep every tree loaded; this measures both halves.
    """
    ctl = Controller(bundle, backend)
    shape = list(ctl.manifest["input"]["shape"])
    x = np.zeros([1, *shape[1:]], dtype=np.float32)
    prefs = [t["preferences"][0] for t in ctl.manifest["trees"]]
    cold, first_run, warm = [], [], []
    for r in prefs:
        ctl.set(r, ctl.budget)
        cold.append(ctl.last_switch_seconds)
        t0 = time.perf_counter()
        ctl(x)
        first_run.append(time.perf_counter() - t0)
    for _ in range(rounds):
        for r in prefs:
            ctl.set(r, ctl.budget)
            warm.append(ctl.last_switch_seconds)
    return {
        "backend": ctl.backend,
        "trees": len(prefs),
        "cold_switch_s": {"mean": float(np.mean(cold)), "max": float(np.max(cold))},
        "first_run_after_load_s": {"mean": float(np.mean(first_run))},
        "warm_switch_s": {"mean": float(np.mean(warm)), "max": float(np.max(warm))},
    }


def profile(
    bundle: str | os.PathLike,
    backend: str = "auto",
    batch: int = 1,
    warmup: int = 3,
    rounds: int = 5,
    reps: int = 10,
) -> dict[str, Any]:
    """Measure every tree of the bundle on this device and write ``latency.json``.

    As dymu's own ``dymu profile`` does: warm-up calls, then rounds that visit every tree
    in a new random order and time ``reps`` calls of each; a tree's latency is the median
    of its per-round medians, its spread (max - min) / median of those. The table is what
    ``Controller.set(preference, latency_ms=X, batch=B)`` picks by; it names the batch, the
    backend, the provider the sessions really use and the device as dymu's tables do (a
    CPU's model and threads, or the GPU), and the controller refuses it for any other.
    """
    ctl = Controller(bundle, backend)
    shape = list(ctl.manifest["input"]["shape"])
    x = np.random.default_rng(0).random([batch, *shape[1:]], dtype=np.float32)
    models = {t["hash"]: ctl._load(t) for t in ctl.manifest["trees"]}
    ctl._models.update(models)  # the table names what these very sessions run on
    for model in models.values():
        for _ in range(warmup):
            model(x)
    rng = np.random.default_rng(0)
    keys = list(models)
    medians: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(rounds):
        for i in rng.permutation(len(keys)):
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                models[keys[i]](x)
                times.append(time.perf_counter() - t0)
            medians[keys[i]].append(1e3 * float(np.median(times)))
    trees = {}
    for k, ms in medians.items():
        mid = float(np.median(ms))
        trees[k] = {"ms": mid, "spread": (max(ms) - min(ms)) / mid}
    table = {
        **ctl.identity(),
        "batch": batch,
        "input_size": shape[2:],
        "protocol": {"warmup": warmup, "rounds": rounds, "reps": reps, "order": "interleaved"},
        "trees": trees,
    }
    _write_atomic(Path(bundle) / LATENCY_FILE, (json.dumps(table, indent=2) + "\n").encode())
    return table


# --- CLI ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dymu_runtime.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("verify", help="compare every tree with its golden outputs")
    p.add_argument("bundle")
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--atol", type=float, default=None)
    p = sub.add_parser("build", help="build TensorRT engines for this device")
    p.add_argument("bundle")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--workspace-mib", type=int, default=512)
    p.add_argument("--max-batch", type=int, default=MAX_BATCH)
    p = sub.add_parser("bench-switch", help="time switching between trees (JSON)")
    p.add_argument("bundle")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--rounds", type=int, default=3)
    p = sub.add_parser("profile", help="measure every tree here; write latency.json")
    p.add_argument("bundle")
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=10)
    p = sub.add_parser("_build-one", help=argparse.SUPPRESS)
    for name in ("onnx", "engine", "precision", "workspace_mib", "max_batch"):
        p.add_argument(name)
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            errors = verify(args.bundle, args.backend, args.atol)
            print(json.dumps({"ok": True, "max_error": errors}, indent=2))
        elif args.command == "build":
            metas = build_engines(args.bundle, args.precision, args.workspace_mib, args.max_batch)
            print(json.dumps({"built": sorted(metas)}, indent=2))
        elif args.command == "profile":
            if min(args.batch, args.rounds, args.reps) < 1:
                raise BundleError("--batch, --rounds and --reps must be >= 1")
            table = profile(args.bundle, args.backend, args.batch, 3, args.rounds, args.reps)
            print(json.dumps(table, indent=2))
        elif args.command == "bench-switch":
            print(json.dumps(bench_switch(args.bundle, args.backend, args.rounds), indent=2))
        else:
            _build_one(
                Path(args.onnx),
                Path(args.engine),
                args.precision,
                int(args.workspace_mib),
                int(args.max_batch),
            )
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (VerifyError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
