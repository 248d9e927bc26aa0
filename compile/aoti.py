"""AOTInductor packages of materialized trees: a compiled backend that needs only PyTorch.

TensorRT is the device's engine, but it cannot be built or checked without NVIDIA's
libraries and a GPU (DEPLOY.md). AOTInductor (``torch._inductor.aoti_compile_and_package``)
compiles an exported program ahead of time into one ``.pt2`` package: C++ kernels on a CPU,
Triton kernels on a CUDA GPU, plus a C++ wrapper, loaded back with
``torch._inductor.aoti_load_package`` and called like the module. It is a second backend
that runs wherever PyTorch and a C++ compiler run, and on a GPU the reference for how close
an engine gets to the launch-overhead floor.

- :func:`compile_aoti` exports a tree with ``torch.export`` (batch axis a ``Dim`` in
  ``[1, max_batch]`` unless static), compiles it for ``"cpu"`` or ``"cuda"`` and writes the
  package atomically. dymu's own facts (input shape, batch range, task names) travel inside
  the package as AOTInductor metadata, so a package describes itself.
- :func:`load_aoti` loads a package for the device it was compiled for, refusing others.
- :func:`aoti_parity` runs it against PyTorch like
  :func:`~dymu.compile.onnx_export.ort_parity` does for ONNX Runtime, with the same result.
- :class:`CudaGraphRunner` replays a CUDA package inside captured CUDA graphs, one per input
  shape, which removes the per-kernel launch cost that dominates batch-1 latency of small
  nets. The package must be loaded with ``single_threaded=True``: ``aoti_load_package``
  documents ``run_single_threaded`` as the switch that avoids the runtime's thread
  synchronisation conflicting with CUDA graph capture.

A package is tied to what it was compiled on: the device kind, the CPU instruction set or
GPU, the PyTorch version, and on a CPU the number of OpenMP threads (inductor fixes it in
the kernels at compile time; recorded as ``cpu_threads``). Compile it on the machine that
runs it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dymu.compile.parity import check_eval_mode, parity_report
from dymu.errors import RuntimeFailure, UserError
from dymu.io import atomic_path, sha256_file

PACKAGE_NAME = "model.pt2"
"""File name of a tree's package inside an export bundle folder."""

DEVICES = ("cpu", "cuda")

MAX_BATCH = 64
"""Largest batch a dynamic-batch package accepts (the upper bound of its batch ``Dim``)."""

_INPUT = "image"
_META_SHAPE = "dymu.input_shape"
_META_DYNAMIC = "dymu.dynamic_batch"
_META_MAX_BATCH = "dymu.max_batch"
_META_OUTPUTS = "dymu.output_names"
_META_DEVICE = "AOTI_DEVICE_KEY"
"""Metadata key AOTInductor itself writes: the device kind the package was compiled for."""


@dataclass(frozen=True)
class AotiResult:
    """What :func:`compile_aoti` wrote, for the export manifest.

    Attributes:
        path: the ``.pt2`` package.
        device: ``"cpu"`` or ``"cuda"``, the device kind it runs on.
        device_name: the GPU's name on CUDA, else the CPU instruction set the kernels use
            (e.g. ``"cpu (AVX2)"``).
        torch_version: PyTorch that compiled it (a package needs the same to load).
        input_shape: ``(B, C, H, W)`` traced; with a dynamic batch ``B`` is free.
        dynamic_batch: whether the batch axis runs over ``[1, max_batch]``.
        max_batch: largest accepted batch (``B`` when static).
        output_names: task names, in the module's output order.
        cpu_threads: OpenMP threads fixed into CPU kernels (None on CUDA).
        size_bytes, sha256: of the package.
        compile_s: wall time of export and compilation.
    """

    path: Path
    device: str
    device_name: str
    torch_version: str
    input_shape: tuple[int, int, int, int]
    dynamic_batch: bool
    max_batch: int
    output_names: tuple[str, ...]
    cpu_threads: int | None
    size_bytes: int
    sha256: str
    compile_s: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the path as a string)."""
        return {
            "path": str(self.path),
            "device": self.device,
            "device_name": self.device_name,
            "torch_version": self.torch_version,
            "input_shape": list(self.input_shape),
            "dynamic_batch": self.dynamic_batch,
            "max_batch": self.max_batch,
            "output_names": list(self.output_names),
            "cpu_threads": self.cpu_threads,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "compile_s": round(self.compile_s, 3),
        }


def find_compiler() -> str | None:
    """The C++ compiler inductor would use, or None when there is none.

    Inductor tries the entries of ``torch._inductor.config.cpp.cxx`` in order (``$CXX`` or
    ``g++`` by default; a None entry means "install one with conda", which it only does
    when ``TORCH_INDUCTOR_INSTALL_GXX`` is set, so it is skipped here). Checking first turns
    a failure deep inside compilation into one line before any work.
    """
    from torch._inductor import config

    names = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    for name in names:
        if name is not None and (found := shutil.which(name)) is not None:
            return found
    return None


def default_device() -> str:
    """``"cuda"`` when a CUDA device is visible, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    """Refuse an unknown device kind, or CUDA where there is none, before any work."""
    if device not in DEVICES:
        raise UserError(f"unknown AOTInductor device {device!r}; choose one of cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeFailure("AOTInductor on cuda needs a CUDA device; none found")


def check_compiler() -> str:
    """The C++ compiler's path; a :class:`UserError` naming what was looked for if none."""
    from torch._inductor import config

    found = find_compiler()
    if found is None:
        names = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
        looked = ", ".join(n for n in names if n is not None) or "nothing"
        raise UserError(
            f"AOTInductor needs a C++ compiler and none was found (looked for {looked}); "
            "install g++ or set CXX"
        )
    return found


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UserError(f"input_shape must be 4 positive ints (B, C, H, W), got {list(shape)}")
    return shape  # type: ignore[return-value]


def _output_names(module: nn.Module, example: Tensor) -> list[str]:
    """Task names in output order, from one eager call (which also proves the module runs)."""
    with torch.no_grad():
        out = module(example)
    if (
        not isinstance(out, Mapping)
        or not out
        or not all(isinstance(v, Tensor) for v in out.values())
    ):
        raise UserError(
            f"AOTInductor needs a module returning {{task name: tensor}}, got {type(out).__name__}"
        )
    return [str(name) for name in out]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide torch-internal deprecation chatter printed while exporting and compiling."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.|copyreg")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        yield


def _device_name(device: str, isa: str | None) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({isa})" if isa else "cpu"


# --- public API ---------------------------------------------------------------------------


def compile_aoti(
    net: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int],
    dynamic_batch: bool = True,
    device: str = "cpu",
    max_batch: int = MAX_BATCH,
    seed: int = 0,
) -> AotiResult:
    """Export ``net`` (``image -> {task: tensor}``) and compile it into one AOTInductor package.

    Args:
        net: an eval-mode module such as a
            :class:`~dymu.compile.materialize.MaterializedTree`; it is not modified (a copy
            is moved to CUDA when compiling for it).
        path: the ``.pt2`` file to write (atomically; parent folders are created).
        input_shape: ``(B, C, H, W)``. With ``dynamic_batch``, ``B`` only sizes the tracing
            example, traced at ``max(B, 2)`` so a batch size baked into the graph cannot hide
            behind size-1 broadcasting (as in :func:`~dymu.compile.onnx_export.export_onnx`).
        dynamic_batch: accept any batch in ``[1, max_batch]``; False fixes it at ``B``.
        device: ``"cpu"`` (C++ kernels) or ``"cuda"`` (Triton kernels for this GPU).
        max_batch: upper bound of the dynamic batch axis.
        seed: seed of the random tracing example.

    Returns:
        An :class:`AotiResult` describing the package.

    Raises:
        UserError: bad device, shape, module or path, or no C++ compiler (nothing written).
        RuntimeFailure: CUDA asked for but absent, or export or compilation failed.
    """
    from torch._inductor import aoti_compile_and_package

    start = time.perf_counter()
    check_device(device)
    shape = _check_input_shape(input_shape)
    if dynamic_batch and not (isinstance(max_batch, int) and max_batch >= 2):
        raise UserError(f"max_batch must be an int >= 2 with a dynamic batch, got {max_batch!r}")
    dest = Path(path)
    if dest.suffix != ".pt2" or dest.is_dir():
        raise UserError(f"AOTInductor package path must be a .pt2 file, got {dest}")
    check_eval_mode(net, "AOTInductor")
    check_compiler()

    module = copy.deepcopy(net).to(device) if device != "cpu" else net
    trace_shape = (max(shape[0], 2), *shape[1:]) if dynamic_batch else shape
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand(trace_shape, generator=gen).to(device)  # [B, C, H, W]
    names = _output_names(module, example)
    dynamic = (
        {_INPUT: {0: torch.export.Dim("batch", min=1, max=max_batch)}} if dynamic_batch else None
    )
    metadata = {
        _META_SHAPE: ",".join(str(d) for d in shape),
        _META_DYNAMIC: str(int(dynamic_batch)),
        _META_MAX_BATCH: str(max_batch if dynamic_batch else shape[0]),
        _META_OUTPUTS: ",".join(names),
    }
    with _quiet(), atomic_path(dest) as tmp:
        # aoti_compile_and_package insists on a .pt2 name; atomic_path's temp file has none.
        staged = tmp.with_name(tmp.name + ".pt2")
        try:
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
            aoti_compile_and_package(
                program,
                package_path=str(staged),
                inductor_configs={"aot_inductor.metadata": metadata},
            )
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise UserError(f"cannot write {dest}: {exc.strerror or exc}") from exc
        except Exception as exc:  # export and inductor raise many types; keep the cause
            staged.unlink(missing_ok=True)
            raise RuntimeFailure(
                f"AOTInductor compile for {device} failed: {_first_line(exc)}"
            ) from exc
        try:
            # Loading once proves the package loads here and names the instruction set.
            isa = load_aoti(staged, device).get_metadata().get("AOTI_CPU_ISA")
            os.replace(staged, tmp)
        finally:
            staged.unlink(missing_ok=True)

    return AotiResult(
        path=dest,
        device=device,
        device_name=_device_name(device, isa),
        torch_version=torch.__version__,
        input_shape=shape,
        dynamic_batch=dynamic_batch,
        max_batch=max_batch if dynamic_batch else shape[0],
        output_names=tuple(names),
        cpu_threads=torch.get_num_threads() if device == "cpu" else None,
        size_bytes=dest.stat().st_size,
        sha256=sha256_file(dest),
        compile_s=time.perf_counter() - start,
    )


def load_aoti(path: str | os.PathLike, device: str = "cpu", *, single_threaded: bool = False):
    """Load a package for ``device``; it must have been compiled for that device kind.

    Args:
        path: a ``.pt2`` written by :func:`compile_aoti`.
        device: ``"cpu"`` or ``"cuda"``.
        single_threaded: load without the runtime's thread synchronisation, which CUDA graph
            capture needs (:class:`CudaGraphRunner`); such a model must not be called from
            several threads at once.

    Returns:
        The loaded model (``torch._inductor``'s ``AOTICompiledModel``): called on a
        ``[B, C, H, W]`` tensor on ``device`` it returns ``{task: tensor}``.

    Raises:
        UserError: no such file, or a package compiled for another device kind.
        RuntimeFailure: CUDA asked for but absent, or the package does not load here
            (another PyTorch version, instruction set or GPU).
    """
    from torch._inductor import aoti_load_package

    check_device(device)
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no AOTInductor package {p}")
    try:
        with _quiet():
            model = aoti_load_package(str(p), run_single_threaded=single_threaded)
    except Exception as exc:  # the C++ loader raises RuntimeError with a long message
        raise RuntimeFailure(f"cannot load AOTInductor package {p}: {_first_line(exc)}") from exc
    compiled_for = model.get_metadata().get(_META_DEVICE, "?")
    if compiled_for != device:
        raise UserError(f"{p} was compiled for {compiled_for}, not {device}: compile it here")
    return model


def package_info(model) -> dict[str, Any]:
    """dymu's metadata of a loaded package: ``input_shape``, ``dynamic_batch``,
    ``max_batch``, ``output_names`` (what :func:`compile_aoti` stored in it)."""
    meta = model.get_metadata()
    try:
        return {
            "input_shape": tuple(int(d) for d in meta[_META_SHAPE].split(",")),
            "dynamic_batch": meta[_META_DYNAMIC] == "1",
            "max_batch": int(meta[_META_MAX_BATCH]),
            "output_names": meta[_META_OUTPUTS].split(","),
        }
    except (KeyError, ValueError):
        raise UserError(
            "the package was not written by dymu's compile_aoti: no dymu metadata"
        ) from None


@contextlib.contextmanager
def _ieee_fp32(device: str) -> Iterator[None]:
    """Full fp32 for convolutions and matmuls on CUDA for the block, then the old settings.

    cuDNN convolutions default to TF32 on Ampere and later (about 1e-3 relative error), on
    both the package's and the reference's side but through different algorithms; parity is
    meant to measure the compiler, so it runs in IEEE fp32 like the CPU reference.
    """
    if device != "cuda":
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def aoti_parity(
    net: nn.Module,
    path: str | os.PathLike,
    *,
    batch_sizes: Sequence[int] = (1, 2, 3),
    device: str = "cpu",
    seed: int = 0,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """Max abs difference between the package and PyTorch outputs, per task.

    The reference is ``net`` where it is (on the CPU for an export), the package runs on
    ``device``; each batch size gets its own random input, uniform in [0, 1). A package
    with a static batch is run only at its batch size. On CUDA both run in IEEE fp32
    (no TF32), so the difference is the compiler's, not TF32 rounding.

    Args:
        net: the module that was compiled (``image -> {task: tensor}``), eval mode.
        path: the ``.pt2`` package.
        batch_sizes: batch sizes to run when the batch is dynamic (each <= its max).
        device: the device the package was compiled for.
        seed: seed of the inputs.
        atol, rtol: the tolerance behind ``allclose`` (as for ONNX Runtime).

    Returns:
        ``{"per_task": {task: max abs err}, "overall": float, "batch_sizes": [...],
        "allclose": bool}``, as :func:`~dymu.compile.onnx_export.ort_parity`.

    Raises:
        UserError: a batch size outside the package's range, or a package without dymu's
            metadata or compiled for another device.
        RuntimeFailure: output names or shapes differ between the package and ``net``.
    """

    model = load_aoti(path, device)
    info = package_info(model)
    _, *chw = info["input_shape"]
    sizes = list(batch_sizes) if info["dynamic_batch"] else [info["max_batch"]]
    bad = [b for b in sizes if not 1 <= b <= info["max_batch"]]
    if bad:
        raise UserError(f"batch sizes {bad} are outside the package's 1..{info['max_batch']}")
    ref_device = next((p.device for p in net.parameters()), torch.device("cpu"))
    names = info["output_names"]
    gen = torch.Generator().manual_seed(seed)

    def pairs():
        for b in sizes:
            x = torch.rand(b, *chw, generator=gen)  # [b, C, H, W]
            want = net(x.to(ref_device))
            got = model(x.to(device))
            yield (
                b,
                {k: v.cpu().numpy() for k, v in got.items()},
                {k: v.cpu().numpy() for k, v in want.items()},
            )

    with torch.no_grad(), _ieee_fp32(device):
        return parity_report(pairs(), names, atol=atol, rtol=rtol, backend="package")


class CudaGraphRunner:
    """A CUDA package replayed from captured CUDA graphs, one graph per input shape.

    The first call at a shape warms the package up on a side stream and captures one call
    into a graph (``torch.cuda.graph``, PyTorch's documented whole-network capture); every
    later call copies the input into the graph's static input and replays it. Replaying one
    graph launches all kernels at once, which removes the per-kernel CPU launch cost that
    dominates batch-1 latency of small nets.

    The returned tensors are the graph's static outputs: the next call at the same shape
    overwrites them, so copy what must outlive it.

    Args:
        model: a package loaded with ``load_aoti(path, "cuda", single_threaded=True)``.
        warmup: calls before capture (lazy initialisation must not happen while capturing).
    """

    def __init__(self, model, *, warmup: int = 3) -> None:
        if not torch.cuda.is_available():
            raise RuntimeFailure("CUDA graphs need a CUDA device; none found")
        self.model = model
        self.warmup = warmup
        self._graphs: dict[tuple[int, ...], tuple[Any, Tensor, dict[str, Tensor]]] = {}

    def _capture(self, x: Tensor) -> tuple[Any, Tensor, dict[str, Tensor]]:
        static_in = x.detach().clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self.model(static_in)
        return graph, static_in, static_out

    def __call__(self, x: Tensor) -> dict[str, Tensor]:
        """``{task: tensor}`` for ``x`` ``[B, C, H, W]`` on the GPU (static output buffers)."""
        key = tuple(x.shape)
        if key not in self._graphs:
            self._graphs[key] = self._capture(x)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(x)
        graph.replay()
        return static_out
