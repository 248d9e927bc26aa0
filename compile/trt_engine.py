"""Build TensorRT engines on the device from dymu's ONNX files, and run them from PyTorch.

Engines are not portable across TensorRT versions or GPU models (DEPLOY.md), so dymu ships
ONNX and builds the engine on the device that runs it. This module does that build and
the matching load, across the three TensorRT Python API families a Xavier + Orin + Thor
fleet needs (JetPack 5: 8.5, JetPack 6: 8.6 / 10.3, JetPack 7: 10.x / 11.x):

* network creation: 8.x needs the ``EXPLICIT_BATCH`` creation flag (it defaults to
  implicit batch); 10.x is always explicit batch (the flag is deprecated and ignored);
  11.x is also always strongly typed.
* build: ``builder.build_serialized_network(network, config)`` in all three (8.x's
  ``build_engine`` is gone in 10.x).
* FP16: ``config.set_flag(BuilderFlag.FP16)`` in 8.x and 10.x; 11.x removed every
  precision flag, so an fp16 engine needs an ONNX whose tensors are already fp16.
* workspace cap: ``config.set_memory_pool_limit(MemoryPoolType.WORKSPACE, n)`` (8.4+).
* timing cache: ``config.create_timing_cache(data)``, ``config.set_timing_cache(cache,
  ignore_mismatch)``, ``config.get_timing_cache().serialize()``.
* running: ``context.set_input_shape`` and ``context.set_tensor_address`` per I/O tensor
  name, then ``context.execute_async_v3(stream)``; this name-based API exists from 8.5
  (and is the only one from 10.0).

Three rules shape the code:

* ``tensorrt`` is imported inside functions only: it is a device-side dependency that is
  absent on most hosts (and in CI), and ``import dymu`` must stay light.
* A CUDA device is checked for before TensorRT is touched, and the build itself runs in a
  child process (``python -m dymu.compile.trt_engine build ...``): without a usable GPU
  ``trt.Builder`` fails and the lean runtime can segfault, and a native crash in the
  child must not take the caller (a long export or a search) down with it.
* Every engine gets an :class:`EngineMeta` written beside it (``<engine>.json``), and
  :class:`EngineRunner` refuses an engine whose TensorRT version, GPU compute capability
  or precision differs from what it runs with, instead of failing inside TensorRT.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from dymu import __version__ as DYMU_VERSION
from dymu.errors import DymuError, RuntimeFailure, UserError
from dymu.io import atomic_path, ensure_dir, sha256_file, write_bytes, write_json, write_text

if TYPE_CHECKING:
    import onnx

ApiLevel = Literal["v8", "v10", "v11"]
"""The TensorRT Python API family a version speaks (see the module docstring)."""

PRECISIONS = ("fp32", "fp16")

SUPPORTED = "8.5, 8.6, 10.x and 11.x"
"""The TensorRT releases dymu builds with, as error messages list them."""

INSTALL_HINT = (
    "install NVIDIA's TensorRT wheel on x86 (the PyPI 'tensorrt' package only downloads it "
    "from NVIDIA's index); on Jetson use the JetPack package python3-libnvinfer and create "
    "the venv with --system-site-packages so it can see it"
)

_VERSION = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?(?:\.(\d+))?([.+-]?[A-Za-z][\w.+-]*)?")


# --- versions -----------------------------------------------------------------------------


def _version_parts(version: str) -> tuple[int, int, int]:
    """``(major, minor, patch)`` of a TensorRT version string; a 4th (build) field is dropped.

    Raises:
        UserError: not of the form ``major.minor[.patch[.build]]`` (a suffix such as
            ``b6`` or ``.post1`` is allowed).
    """
    match = _VERSION.fullmatch(str(version).strip())
    if match is None:
        raise UserError(
            f"malformed TensorRT version {version!r}: expected major.minor[.patch[.build]] "
            f"such as 8.5.2.2 or 10.3.0"
        )
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def trt_version_key(version: str) -> str:
    """``"major.minor.patch"`` of ``version``: the part an engine is tied to.

    Engines record ``trt.__version__`` in full (``"8.5.2.2"``); two builds of one patch
    release differ only in the 4th field, which :func:`check_meta` ignores.
    """
    return ".".join(str(p) for p in _version_parts(version))


def trt_api(version: str) -> ApiLevel:
    """The Python API family of a TensorRT version (``"8.5.2.2"`` -> ``"v8"``).

    * ``v8`` (8.5, 8.6; JetPack 5.1 / 6.0): networks need the ``EXPLICIT_BATCH`` creation
      flag; FP16 is ``BuilderFlag.FP16``. 8.5 is the floor: it brought the name-based I/O
      API (``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``) this module
      runs engines with, and it is the newest TensorRT on Xavier.
    * ``v10`` (10.x): explicit batch is implicit (the flag is deprecated and ignored);
      binding-index APIs and ``build_engine`` are gone; FP16 is still ``BuilderFlag.FP16``.
    * ``v11`` (11.x): every network is strongly typed and all precision flags are gone, so
      an fp16 engine needs an ONNX whose tensors are already fp16.

    ``build_serialized_network`` and the tensor-name runtime API are common to all three.

    Raises:
        UserError: malformed, older than 8.5, 9.x (a limited LLM-only release line), or
            newer than the 11.x line this module was written against.
    """
    major, minor, _ = _version_parts(version)
    if major < 8 or (major == 8 and minor < 5):
        raise UserError(
            f"TensorRT {version} is too old: dymu needs {SUPPORTED} "
            f"(8.5 is the newest release on Jetson Xavier, JetPack 5.1)"
        )
    if major == 8:
        return "v8"
    if major == 10:
        return "v10"
    if major == 11:
        return "v11"
    raise UserError(f"TensorRT {version} is not supported: dymu builds with {SUPPORTED}")


# --- metadata -----------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineMeta:
    """What an engine was built from and for; stored beside it as ``<engine>.json``.

    The first four fields decide whether the engine can run on a device at all
    (:func:`check_meta`); the rest let a reader know what it computes without TensorRT.

    Attributes:
        trt_version: ``trt.__version__`` of the builder, in full (``"8.5.2.2"``).
        gpu_name: ``torch.cuda.get_device_name()`` of the build device (``"Orin"``).
        compute_capability: ``"major.minor"`` of the build GPU (``"8.7"`` for Orin).
        precision: ``"fp32"`` or ``"fp16"``.
        input_name: the one input tensor (dymu exports ``"image"``).
        min_shape, opt_shape, max_shape: the optimization profile of that input; only the
            batch (first) dimension varies.
        output_names: the engine's outputs in order (dymu's task names).
        onnx_sha256: sha256 of the ``.onnx`` file the engine was built from.
        workspace_bytes: the builder's workspace cap.
        dymu_version: the dymu that built it.
        onnx_path: the ONNX path at build time, for the "rebuild from" hint.
    """

    trt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    input_name: str
    min_shape: tuple[int, ...]
    opt_shape: tuple[int, ...]
    max_shape: tuple[int, ...]
    output_names: tuple[str, ...]
    onnx_sha256: str
    workspace_bytes: int
    dymu_version: str = DYMU_VERSION
    onnx_path: str = ""

    @property
    def api(self) -> ApiLevel:
        return trt_api(self.trt_version)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key in ("min_shape", "opt_shape", "max_shape", "output_names"):
            out[key] = list(out[key])
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> EngineMeta:
        """Inverse of :meth:`to_json`; unknown keys are ignored (newer dymu versions).

        Raises:
            UserError: a required key is missing or a value has the wrong type.
        """
        if not isinstance(obj, Mapping):
            raise UserError(f"engine metadata must be a JSON object, got {type(obj).__name__}")
        optional = {"dymu_version", "onnx_path"}
        missing = [f.name for f in fields(cls) if f.name not in obj and f.name not in optional]
        if missing:
            raise UserError(f"engine metadata lacks {', '.join(missing)}")
        try:
            return cls(
                trt_version=str(obj["trt_version"]),
                gpu_name=str(obj["gpu_name"]),
                compute_capability=str(obj["compute_capability"]),
                precision=str(obj["precision"]),
                input_name=str(obj["input_name"]),
                min_shape=tuple(int(d) for d in obj["min_shape"]),
                opt_shape=tuple(int(d) for d in obj["opt_shape"]),
                max_shape=tuple(int(d) for d in obj["max_shape"]),
                output_names=tuple(str(n) for n in obj["output_names"]),
                onnx_sha256=str(obj["onnx_sha256"]),
                workspace_bytes=int(obj["workspace_bytes"]),
                dymu_version=str(obj.get("dymu_version", "")),
                onnx_path=str(obj.get("onnx_path", "")),
            )
        except (TypeError, ValueError) as exc:
            raise UserError(f"malformed engine metadata: {exc}") from exc


def meta_path(engine_path: str | os.PathLike) -> Path:
    """``<engine>.json``: where the metadata of ``engine_path`` lives."""
    p = Path(engine_path)
    return p.with_name(p.name + ".json")


def write_meta(engine_path: str | os.PathLike, meta: EngineMeta) -> Path:
    """Write ``meta`` beside ``engine_path`` atomically; returns the metadata path."""
    return write_json(meta_path(engine_path), meta.to_json())


def read_meta(engine_path: str | os.PathLike) -> EngineMeta:
    """The metadata written beside ``engine_path``.

    Raises:
        UserError: missing, unreadable or malformed; the message says to rebuild.
    """
    path = meta_path(engine_path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(
            f"{path} not found: engine {Path(engine_path).name} has no dymu metadata; "
            f"rebuild it on this device from its ONNX"
        ) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read engine metadata {path}: {exc}") from exc
    try:
        return EngineMeta.from_json(obj)
    except UserError as exc:
        raise UserError(f"{path}: {exc}; rebuild the engine on this device") from exc


@dataclass(frozen=True)
class DeviceInfo:
    """The TensorRT and GPU an engine is about to be built or loaded on."""

    trt_version: str
    gpu_name: str
    compute_capability: str


def current_device(trt_version: str | None = None) -> DeviceInfo:
    """The TensorRT version and the current CUDA device of this process.

    Args:
        trt_version: skip importing ``tensorrt`` and use this version instead.
    """
    if trt_version is None:
        trt_version = _require_tensorrt().__version__
    index = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    return DeviceInfo(
        trt_version=str(trt_version),
        gpu_name=torch.cuda.get_device_name(index),
        compute_capability=f"{major}.{minor}",
    )


def check_meta(meta: EngineMeta, current: DeviceInfo, *, precision: str | None = None) -> None:
    """Refuse an engine that was built for another TensorRT, GPU or precision.

    TensorRT itself would fail on a version or GPU mismatch deep in deserialization (or,
    with the lean runtime, crash); a precision mismatch would silently run the wrong
    numerics. Checking the metadata first turns all three into one readable line.

    Args:
        meta: the engine's :class:`EngineMeta`.
        current: this device (:func:`current_device`).
        precision: the precision the caller expects; ``None`` accepts the engine's own.

    Raises:
        UserError: what differs (engine value vs this device), and that the engine must
            be rebuilt on this device from its ONNX.

    Warns:
        UserWarning: same compute capability but a different GPU name (e.g. Orin NX vs AGX
            Orin): TensorRT accepts such engines, but they were tuned for the other GPU.
    """
    diffs = []
    built, here = trt_version_key(meta.trt_version), trt_version_key(current.trt_version)
    if built != here:
        diffs.append(f"TensorRT {built} vs {here}")
    if meta.compute_capability != current.compute_capability:
        diffs.append(
            f"GPU compute capability {meta.compute_capability} ({meta.gpu_name}) vs "
            f"{current.compute_capability} ({current.gpu_name})"
        )
    if precision is not None and meta.precision != precision:
        diffs.append(f"precision {meta.precision} vs {precision} requested")
    if diffs:
        onnx = meta.onnx_path or f"the ONNX with sha256 {meta.onnx_sha256[:12]}..."
        raise UserError(
            f"engine does not match this device ({'; '.join(diffs)}; engine vs here): it must "
            f"be rebuilt on this device from {onnx}"
        )
    if meta.gpu_name != current.gpu_name:
        warnings.warn(
            f"engine was built on {meta.gpu_name}, running on {current.gpu_name} (same compute "
            f"capability {meta.compute_capability}); rebuild it here for best speed",
            stacklevel=2,
        )


def timing_cache_path(cache_dir: str | os.PathLike, device: DeviceInfo) -> Path:
    """The one timing cache file for ``device``, shared by every tree built on it.

    Trees of one space share layer shapes, so one cache per (TensorRT version, GPU) makes
    later builds several times faster (DEPLOY.md); caches from another TensorRT version or
    GPU are useless, hence both are in the name.
    """
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", device.gpu_name).strip("-").lower() or "gpu"
    sm = device.compute_capability.replace(".", "")
    return Path(cache_dir) / f"timing-trt{trt_version_key(device.trt_version)}-sm{sm}-{gpu}.cache"


# --- preconditions ------------------------------------------------------------------------


def _require_cuda() -> None:
    if not torch.cuda.is_available():
        raise RuntimeFailure("TensorRT needs a CUDA GPU; none found")


def _require_tensorrt() -> Any:
    """The ``tensorrt`` module, or a one-line :class:`UserError` saying how to install it."""
    try:
        import tensorrt
    except (ImportError, OSError) as exc:  # OSError: bindings present, libnvinfer missing
        raise UserError(f"TensorRT is not installed: {exc} ({INSTALL_HINT})") from None
    return tensorrt


# --- ONNX inspection (host-side, no TensorRT) ---------------------------------------------


def onnx_float_types(model: onnx.ModelProto) -> tuple[str, set[str]]:
    """``(input dtype, dtypes of floating-point weights)`` of a model, as lower-case ONNX
    type names (``"float"``, ``"float16"``).

    Weights are initializers and ``Constant`` node values; external data is not loaded
    (only the declared types are read).
    """
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    tensors = list(model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute if a.name == "value" and a.HasField("t")]
    weights = {
        TensorProto.DataType.Name(t.data_type).lower() for t in tensors if t.data_type in floats
    }
    graph_inputs = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in graph_inputs]
    input_type = "none"
    if inputs:
        elem = inputs[0].type.tensor_type.elem_type
        input_type = TensorProto.DataType.Name(elem).lower() if elem else "undefined"
    return input_type, weights


def _check_strongly_typed_precision(onnx_path: Path, precision: str, version: str) -> None:
    """TensorRT 11 has no precision flags: the ONNX's own types must match ``precision``."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    input_type, weights = onnx_float_types(model)
    has_fp16 = "float16" in {input_type, *weights}
    if precision == "fp16" and not has_fp16:
        raise UserError(
            f"TensorRT {version} has no FP16 flag (networks are strongly typed), so an fp16 "
            f"engine needs an fp16 ONNX, but {onnx_path.name} is fp32 (input {input_type}, "
            f"weights {', '.join(sorted(weights)) or 'none'}); convert it first (e.g. "
            f"ModelOpt AutoCast) or build with precision fp32"
        )
    if precision == "fp32" and has_fp16:
        raise UserError(
            f"{onnx_path.name} holds fp16 tensors, and TensorRT {version} builds exactly the "
            f"types in the ONNX; build it with precision fp16"
        )


# --- building -----------------------------------------------------------------------------


def _check_build_args(
    onnx_path: Path, precision: str, min_batch: int, opt_batch: int, max_batch: int, mib: int
) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UserError(
            f"batch sizes must satisfy 1 <= min <= opt <= max, got min={min_batch} "
            f"opt={opt_batch} max={max_batch}"
        )
    if mib < 1:
        raise UserError(f"workspace_mib must be >= 1, got {mib}")
    if not onnx_path.is_file():
        raise UserError(f"ONNX file {onnx_path} not found")


def _profile_shapes(
    name: str, shape: Sequence[int], min_batch: int, opt_batch: int, max_batch: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """min/opt/max shapes of the input: only the batch dimension may vary."""
    dims = tuple(int(d) for d in shape)
    if not dims:
        raise UserError(f"input {name!r} is a scalar; dymu engines take a batched image")
    if any(d < 0 for d in dims[1:]):
        raise UserError(
            f"input {name!r} has shape {list(dims)}: only the batch (first) dimension may be "
            f"dynamic; export the ONNX with a fixed image size"
        )
    if dims[0] >= 0 and not min_batch == opt_batch == max_batch == dims[0]:
        raise UserError(
            f"input {name!r} has a fixed batch of {dims[0]} but batches {min_batch}-{max_batch} "
            f"were asked for; export the ONNX with a dynamic batch axis"
        )
    rest = dims[1:]
    return (min_batch, *rest), (opt_batch, *rest), (max_batch, *rest)


def _load_timing_cache(config: Any, path: Path | None) -> None:
    """Give the builder the device's shared timing cache (an empty one if none yet)."""
    if path is None:
        return
    data = b""
    if path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if cache is None or config.set_timing_cache(cache, ignore_mismatch=False) is False:
        # A cache from another TensorRT build or GPU: start afresh, do not mix.
        print(f"warning: ignoring timing cache {path} (made elsewhere)", file=sys.stderr)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config: Any, path: Path | None) -> None:
    if path is None:
        return
    cache = config.get_timing_cache()
    if cache is not None:
        write_bytes(path, bytes(memoryview(cache.serialize())))


def _build_in_process(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 1,
    workspace_mib: int = 512,
    timing_cache: str | os.PathLike | None = None,
    device: DeviceInfo | None = None,
) -> EngineMeta:
    """The real TensorRT build; runs in the child process that :func:`build_engine` starts.

    Parses the ONNX, caps the workspace, adds one optimization profile (dynamic batch) on
    the single input, sets FP16 the way the installed TensorRT's API family wants it,
    reuses the device's timing cache, builds with ``build_serialized_network`` and writes
    engine, metadata and timing cache atomically.

    Args:
        device: the build device; default :func:`current_device` (tests pass one).

    Raises:
        UserError: bad arguments, an ONNX TensorRT cannot parse (errors by index), an input
            whose shape does not fit the profile, or fp16 asked of an fp32 ONNX on 11.x.
        RuntimeFailure: the builder produced no engine.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    _check_build_args(onnx_path, precision, min_batch, opt_batch, max_batch, workspace_mib)
    trt = _require_tensorrt()
    version = str(trt.__version__)
    api = trt_api(version)
    if api == "v11":  # checked before the builder exists: cheap, and no GPU needed
        _check_strongly_typed_precision(onnx_path, precision, version)
    device = device or current_device(version)
    workspace = int(workspace_mib) << 20

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # 8.x defaults to implicit batch, which ONNX networks cannot use; 10.x is always
    # explicit batch (the flag is deprecated and ignored) and 11.x also always strongly typed.
    if api == "v8":
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH))
    else:  # no flags: the documented 10.x/11.x call
        network = builder.create_network()
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file: sidecar weights resolve
        errors = [
            f"error {i}: {' '.join(str(parser.get_error(i)).split())}"
            for i in range(parser.num_errors)
        ]
        raise UserError(
            f"TensorRT {version} cannot parse {onnx_path.name}: "
            + ("; ".join(errors) or "no error reported")
        )
    if network.num_inputs != 1:
        raise UserError(f"{onnx_path.name} has {network.num_inputs} inputs; dymu engines take 1")
    tensor = network.get_input(0)
    input_name = tensor.name
    shapes = _profile_shapes(input_name, tuple(tensor.shape), min_batch, opt_batch, max_batch)
    output_names = tuple(network.get_output(i).name for i in range(network.num_outputs))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if precision == "fp16" and api in ("v8", "v10"):
        config.set_flag(trt.BuilderFlag.FP16)  # 11.x: the fp16 is in the ONNX (checked above)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *shapes)
    config.add_optimization_profile(profile)
    _load_timing_cache(config, cache_path)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeFailure(
            f"TensorRT {version} could not build an engine from {onnx_path.name} (its "
            f"errors are in the log before this line; a larger workspace_mib may help)"
        )
    meta = EngineMeta(
        trt_version=version,
        gpu_name=device.gpu_name,
        compute_capability=device.compute_capability,
        precision=precision,
        input_name=input_name,
        min_shape=shapes[0],
        opt_shape=shapes[1],
        max_shape=shapes[2],
        output_names=output_names,
        onnx_sha256=sha256_file(onnx_path),
        workspace_bytes=workspace,
        onnx_path=str(onnx_path),
    )
    with atomic_path(engine_path) as tmp:
        tmp.write_bytes(bytes(memoryview(serialized)))
    write_meta(engine_path, meta)
    _save_timing_cache(config, cache_path)
    return meta


def _child_command(
    onnx_path: Path,
    engine_path: Path,
    *,
    precision: str,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    workspace_mib: int,
    timing_cache: Path | None,
) -> list[str]:
    """The command line that runs :func:`_build_in_process` in a fresh interpreter."""
    cmd = [
        sys.executable,
        "-m",
        "dymu.compile.trt_engine",
        "build",
        "--onnx",
        str(onnx_path),
        "--engine",
        str(engine_path),
        "--precision",
        precision,
        "--min-batch",
        str(min_batch),
        "--opt-batch",
        str(opt_batch),
        "--max-batch",
        str(max_batch),
        "--workspace-mib",
        str(workspace_mib),
    ]
    if timing_cache is not None:
        cmd += ["--timing-cache", str(timing_cache)]
    return cmd


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _run_child(
    cmd: Sequence[str],
    *,
    what: str,
    timeout_s: float | None = None,
    log_path: Path | None = None,
) -> None:
    """Run ``cmd``; turn a failure into one line quoting the child's last stderr line.

    A child that reports a :class:`UserError` exits with status 2 and is re-raised as one;
    any other failure, a signal (a native crash) included, is a :class:`RuntimeFailure`.
    With ``log_path``, a failing child's whole stderr (TensorRT's own log) is saved there
    and the message names the file; a stale log from an earlier failure is removed.
    """
    try:
        proc = subprocess.run(
            list(cmd), capture_output=True, text=True, errors="replace", timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        raise RuntimeFailure(f"{what} did not finish within {timeout_s:g} s") from None
    except OSError as exc:
        raise RuntimeFailure(f"{what} could not start: {exc}") from exc
    if proc.returncode == 0:
        if log_path is not None:
            log_path.unlink(missing_ok=True)
        return
    line = _last_line(proc.stderr) or _last_line(proc.stdout)
    line = line.removeprefix("error: ")
    if proc.returncode == UserError.exit_code:
        raise UserError(line or f"{what} refused its input")
    log = ""
    if log_path is not None and (proc.stderr or proc.stdout):
        write_text(log_path, proc.stdout + proc.stderr)
        log = f" (full log: {log_path})"
    if proc.returncode < 0:
        try:
            name = signal.Signals(-proc.returncode).name
        except ValueError:
            name = f"signal {-proc.returncode}"
        raise RuntimeFailure(f"{what} crashed ({name})" + (f": {line}" if line else "") + log)
    raise RuntimeFailure(
        f"{what} failed (exit {proc.returncode}): {line or 'no error message on stderr'}{log}"
    )


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    precision: str = "fp32",
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 1,
    workspace_mib: int = 512,
    timing_cache: str | os.PathLike | None = None,
    timeout_s: float | None = None,
) -> EngineMeta:
    """Build a TensorRT engine from an ONNX file, on this device, in a child process.

    Call it once per engine (not in parallel): on a Jetson the CPU and GPU share memory,
    which is also why the workspace is capped (256 MiB - 1 GiB is sensible there).

    Args:
        onnx_path: the ONNX file (one input whose first dimension is the batch).
        engine_path: where the engine goes; ``<engine_path>.json`` gets its
            :class:`EngineMeta`. Both are written atomically.
        precision: ``"fp32"`` or ``"fp16"``. On TensorRT 11.x fp16 must already be in the
            ONNX (there is no FP16 flag any more). fp32 keeps TensorRT's default of allowing
            TF32 on GPUs that have it.
        min_batch, opt_batch, max_batch: the optimization profile of the batch dimension.
        workspace_mib: cap on the builder's workspace memory pool.
        timing_cache: the device's shared timing cache file (see :func:`timing_cache_path`);
            read if present, then updated. ``None``: no cache.
        timeout_s: give up on the build after this long (``None``: wait).

    Returns:
        The :class:`EngineMeta` written beside the engine.

    Raises:
        RuntimeFailure: no CUDA device; the build failed or crashed (with the child's last
            stderr line; its whole log is kept as ``<engine_path>.build.log``).
        UserError: TensorRT is not installed; bad arguments or an ONNX TensorRT refuses.
    """
    _require_cuda()
    _require_tensorrt()
    onnx_path, engine_path = Path(onnx_path).resolve(), Path(engine_path).resolve()
    cache = Path(timing_cache).resolve() if timing_cache is not None else None
    _check_build_args(onnx_path, precision, min_batch, opt_batch, max_batch, workspace_mib)
    ensure_dir(engine_path.parent)
    cmd = _child_command(
        onnx_path,
        engine_path,
        precision=precision,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_mib=workspace_mib,
        timing_cache=cache,
    )
    log = engine_path.with_name(engine_path.name + ".build.log")
    _run_child(cmd, what=f"TensorRT build of {onnx_path.name}", timeout_s=timeout_s, log_path=log)
    return read_meta(engine_path)


# --- running ------------------------------------------------------------------------------

_TORCH_DTYPES = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "UINT8": torch.uint8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
}
"""``trt.DataType`` member name -> torch dtype (by name: members differ across releases)."""


def _torch_dtype(trt_dtype: Any) -> torch.dtype:
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    if name not in _TORCH_DTYPES:
        raise RuntimeFailure(f"engine tensor type {name} has no torch equivalent")
    return _TORCH_DTYPES[name]


class EngineRunner:
    """Run a dymu TensorRT engine on PyTorch CUDA tensors.

    The engine's metadata is checked against this device before TensorRT sees the file,
    so a mismatched engine fails with one line instead of inside deserialization. Buffers
    are torch CUDA tensors, and execution is enqueued on torch's current stream, so the
    runner composes with surrounding PyTorch code without extra synchronisation. One
    runner holds one execution context: do not call it from several threads at once.

    Args:
        engine_path: an engine written by :func:`build_engine`.
        precision: the precision the caller expects (``None``: whatever it was built with).
        device: override the detected device (for tests).

    Raises:
        UserError: engine or metadata missing, or built for another device/precision.
        RuntimeFailure: no CUDA device, or TensorRT could not load the engine.
    """

    def __init__(
        self,
        engine_path: str | os.PathLike,
        *,
        precision: str | None = None,
        device: DeviceInfo | None = None,
    ) -> None:
        path = Path(engine_path)
        if not path.is_file():
            raise UserError(f"engine file {path} not found")
        self.meta = read_meta(path)
        _require_cuda()
        trt = _require_tensorrt()
        check_meta(self.meta, device or current_device(trt.__version__), precision=precision)

        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if self._engine is None:
            raise RuntimeFailure(f"TensorRT could not deserialize {path} (see its log above)")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise RuntimeFailure(f"TensorRT could not create an execution context for {path}")
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        inputs = [n for n in names if is_input[n]]
        if len(inputs) != 1:
            raise RuntimeFailure(f"{path} has inputs {inputs}; dymu engines take exactly one")
        self.input_name = inputs[0]
        self.output_names = tuple(n for n in names if not is_input[n])
        self._dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in names}

    def close(self) -> None:
        """Release context, engine and runtime, in that order (TensorRT wants the runtime
        to outlive the engines it deserialized, which attribute clean-up does not ensure)."""
        for attr in ("_context", "_engine", "_runtime"):
            if hasattr(self, attr):
                setattr(self, attr, None)

    def __del__(self) -> None:
        self.close()

    def __call__(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the engine on a batch; outputs keyed by tensor (task) name.

        ``image`` is moved to the current CUDA device and cast to the engine's input type
        if needed. The work is enqueued on ``torch.cuda.current_stream()``; reading the
        outputs from PyTorch on that stream needs no synchronisation.

        Raises:
            UserError: the image's shape is outside the engine's optimization profile.
            RuntimeFailure: TensorRT refused the shape or failed to enqueue.
        """
        meta = self.meta
        if not isinstance(image, torch.Tensor):
            raise UserError(f"expected a torch.Tensor image, got {type(image).__name__}")
        lo, hi = meta.min_shape, meta.max_shape
        shape = tuple(image.shape)
        if len(shape) != len(lo) or shape[1:] != tuple(lo[1:]) or not lo[0] <= shape[0] <= hi[0]:
            raise UserError(
                f"image of shape {list(shape)} does not fit the engine: it takes "
                f"[{lo[0]}..{hi[0]}, {', '.join(str(d) for d in lo[1:])}]"
            )
        device = torch.device("cuda", torch.cuda.current_device())
        x = image.to(device=device, dtype=self._dtypes[self.input_name]).contiguous()
        ctx = self._context
        if ctx.set_input_shape(self.input_name, shape) is False:
            raise RuntimeFailure(f"TensorRT refused input shape {list(shape)}")
        ctx.set_tensor_address(self.input_name, x.data_ptr())
        outputs: dict[str, torch.Tensor] = {}
        for name in self.output_names:
            out_shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
            out = torch.empty(out_shape, dtype=self._dtypes[name], device=device)
            ctx.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        stream = torch.cuda.current_stream(device)
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise RuntimeFailure("TensorRT execute_async_v3 failed (see its log above)")
        # ``x`` may be freed when this returns: the caching allocator only reuses its
        # memory for work queued later on the same stream, i.e. after the engine ran.
        return outputs


# --- child entry point --------------------------------------------------------------------


def _main(argv: Sequence[str] | None = None) -> int:
    """``python -m dymu.compile.trt_engine build ...``: the child side of build_engine."""
    parser = argparse.ArgumentParser(
        prog="python -m dymu.compile.trt_engine",
        description="Build one TensorRT engine (run by dymu.compile.trt_engine.build_engine).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build an engine from an ONNX file")
    build.add_argument("--onnx", required=True)
    build.add_argument("--engine", required=True)
    build.add_argument("--precision", choices=PRECISIONS, default="fp32")
    build.add_argument("--min-batch", type=int, default=1)
    build.add_argument("--opt-batch", type=int, default=1)
    build.add_argument("--max-batch", type=int, default=1)
    build.add_argument("--workspace-mib", type=int, default=512)
    build.add_argument("--timing-cache", default=None)
    args = parser.parse_args(argv)
    try:
        _build_in_process(
            args.onnx,
            args.engine,
            precision=args.precision,
            min_batch=args.min_batch,
            opt_batch=args.opt_batch,
            max_batch=args.max_batch,
            workspace_mib=args.workspace_mib,
            timing_cache=args.timing_cache,
        )
    except DymuError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # e.g. trt.Builder's "factory function returned nullptr"
        traceback.print_exc()
        text = " ".join(str(exc).split())
        print(f"error: {type(exc).__name__}: {text}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main())
