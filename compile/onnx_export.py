"""Export a materialized tree to one self-contained, verified ONNX file (DESIGN.md, compile).

The file is what ships to a device, where TensorRT builds the engine (DEPLOY.md), so
:func:`export_onnx` checks on the host everything that can be checked without TensorRT:

1. the module's ``{task: tensor}`` output is flattened by :class:`TupleOutputs` (the
   detectron2-style tracing adapter) so the ONNX outputs are named after the tasks;
2. the exporter and opset come from :mod:`dymu.compile.trt_support` for the TensorRT target
   (TorchScript exporter at opset 17 for 8.x, torch.export-based at 18 for 10.x/11.x);
3. the file is written inline (no ``.onnx.data`` sidecar) through a temporary file, then
   the opset actually written is read back and compared with the one asked for (the new
   exporter silently turns a request for opset < 18 into 18), ``onnx.checker`` runs with
   ``full_check=True``, and the graph's operators are checked against the target's parser;
   only a file that passes all of this is renamed to ``path``.

:func:`ort_parity` then runs the file in ONNX Runtime against PyTorch on several batch
sizes. ``onnx``, ``onnxruntime`` and ``onnxscript`` are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from dymu.compile.parity import check_eval_mode, parity_report
from dymu.compile.trt_support import DYNAMO, LEGACY, Report, TrtTarget, check_graph, resolve
from dymu.errors import RuntimeFailure, UserError
from dymu.io import atomic_path, sha256_file

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

INPUT_NAME = "image"
BATCH_DIM = "batch"

_QUIET_LOGGERS = ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")
"""Loggers whose warnings during export are progress chatter or about optional packages
(``torchvision is not installed. Skipping torchvision::nms``), not about dymu's graph."""

_NOISE = (
    re.compile(r"legacy TorchScript-based ONNX export"),  # chosen on purpose for TensorRT 8.x
    re.compile(r"The feature will be removed"),  # same deprecation, second message
    re.compile(r"isinstance\(treespec, LeafSpec\)"),  # torch-internal pytree deprecation
)
"""Warnings dropped from :attr:`ExportResult.warnings`; anything else is kept."""


class TupleOutputs(nn.Module):
    """Tracing adapter: returns ``module(image)[name]`` for each name, as a tuple.

    Exporters name graph outputs by position; a dict output would otherwise get names like
    ``output_0`` or flattened pytree keys. The adapter fixes the order, and the exporter's
    ``output_names`` then carry the task names into the file.
    """

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        super().__init__()
        self.module = module
        self.names = tuple(names)

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        out = self.module(image)
        return tuple(out[name] for name in self.names)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` wrote, for the export manifest.

    Attributes:
        path: the ``.onnx`` file (weights inline).
        target: the TensorRT version exported for (normalised, e.g. ``"10.3"``).
        exporter: ``"legacy"`` (TorchScript) or ``"dynamo"`` (torch.export-based).
        opset: the default-domain opset read back from the file.
        input_name: ``"image"``.
        output_names: task names, in the module's output order.
        input_shape: ``(B, C, H, W)`` traced; with a dynamic batch, ``B`` is a free axis.
        dynamic_batch: whether axis 0 of the input and outputs is the symbol ``"batch"``.
        size_bytes, sha256: of the file, so a device can tell it got the right one.
        report: the static TensorRT parser check of the written graph.
        warnings: exporter warnings worth reading (known noise removed).
        notes: decisions taken on the user's behalf (e.g. an exporter fallback).
        seconds: wall time of export and checks.
    """

    path: Path
    target: str
    exporter: str
    opset: int
    input_name: str
    output_names: tuple[str, ...]
    input_shape: tuple[int, int, int, int]
    dynamic_batch: bool
    size_bytes: int
    sha256: str
    report: Report = field(repr=False)
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings, the report as its fields)."""
        return {
            "path": str(self.path),
            "target": self.target,
            "exporter": self.exporter,
            "opset": self.opset,
            "input_name": self.input_name,
            "output_names": list(self.output_names),
            "input_shape": list(self.input_shape),
            "dynamic_batch": self.dynamic_batch,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "trt_check": {
                "target": self.report.target,
                "ok": self.report.ok,
                "opset_range": list(self.report.opset_range),
                "op_counts": self.report.op_counts,
                "problems": self.report.problems,
            },
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "seconds": round(self.seconds, 3),
        }


# --- helpers ------------------------------------------------------------------------------


def has_onnxscript() -> bool:
    """Whether the torch.export-based exporter can run (it builds graphs with onnxscript)."""
    return importlib.util.find_spec("onnxscript") is not None


def written_opset(model: onnx.ModelProto) -> int | None:
    """The default-domain (``""`` / ``"ai.onnx"``) opset a model imports, or None."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def verify_opset(model: onnx.ModelProto, expected: int, exporter: str) -> None:
    """Fail unless the model's default-domain opset is exactly ``expected``.

    Raises:
        RuntimeFailure: naming the opset asked for and the one written.
    """
    got = written_opset(model)
    if got != expected:
        raise RuntimeFailure(
            f"asked the {exporter} ONNX exporter for opset {expected} but the file imports "
            f"opset {got}; refusing to ship it"
        )


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape):
        raise UserError(f"input_shape must be 4 positive ints (B, C, H, W), got {input_shape!r}")
    return shape  # type: ignore[return-value]


def _output_names(module: nn.Module, example: Tensor) -> list[str]:
    """Task names in output order, from one eager call (which also proves the module runs)."""
    with torch.no_grad():
        out = module(example)
    if not isinstance(out, Mapping) or not out:
        raise UserError(
            f"export needs a module returning {{task name: tensor}}, got {type(out).__name__}"
        )
    names = list(out)
    bad = [n for n in names if not isinstance(n, str) or not n or n == INPUT_NAME]
    if bad:
        raise UserError(f"output names must be non-empty strings other than 'image': {bad}")
    not_tensors = [n for n, v in out.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise UserError(f"outputs {not_tensors} are not tensors")
    return names


def _choose_exporter(t: TrtTarget, exporter: str) -> tuple[str, list[str]]:
    """Resolve ``exporter`` ("auto", "legacy", "dynamo") for target ``t``; also return notes."""
    if exporter not in ("auto", LEGACY, DYNAMO):
        raise UserError(f"unknown exporter {exporter!r}; choose auto, {LEGACY} or {DYNAMO}")
    if exporter == DYNAMO and t.export_opset < 18:
        raise UserError(
            f"the {DYNAMO} exporter cannot write opset {t.export_opset} ({t.label} reads "
            f"<= {t.max_opset}); use exporter='{LEGACY}' or 'auto'"
        )
    chosen = t.exporter if exporter == "auto" else exporter
    notes: list[str] = []
    if chosen == DYNAMO and not has_onnxscript():
        if exporter == DYNAMO:
            raise UserError(
                "the torch.export-based ONNX exporter needs onnxscript: pip install onnxscript"
            )
        # The TorchScript exporter writes opset 18 too, so the file is the same kind of file.
        chosen = LEGACY
        notes.append(
            f"onnxscript is not installed: used the TorchScript exporter at opset "
            f"{t.export_opset} instead of the torch.export-based one"
        )
        log.warning(notes[-1])
    return chosen, notes


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[list[warnings.WarningMessage]]:
    """Record warnings and mute the exporters' loggers below ERROR for the block."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _useful_warnings(caught: list[warnings.WarningMessage]) -> tuple[str, ...]:
    """First lines of the recorded warnings, known noise removed, deduplicated in order."""
    lines: dict[str, None] = {}
    for w in caught:
        text = (str(w.message).strip().splitlines() or [""])[0]
        if text and not any(p.search(text) for p in _NOISE):
            lines[f"{w.category.__name__}: {text}"] = None
    return tuple(lines)


def _run_exporter(
    adapter: nn.Module,
    example: Tensor,
    dest: Path,
    *,
    exporter: str,
    opset: int,
    names: list[str],
    dynamic_batch: bool,
) -> None:
    """One ``torch.onnx.export`` call writing ``dest`` inline."""
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": names,
        "opset_version": opset,
        "verbose": False,
    }
    if exporter == LEGACY:
        kwargs["dynamo"] = False  # weights inline (it has no external-data switch below 2 GiB)
        kwargs["do_constant_folding"] = True
        if dynamic_batch:
            kwargs["dynamic_axes"] = {n: {0: BATCH_DIM} for n in [INPUT_NAME, *names]}
    else:
        kwargs["dynamo"] = True
        kwargs["external_data"] = False  # one self-contained file, no .onnx.data
        kwargs["optimize"] = True
        if dynamic_batch:
            # Keyed by the adapter's forward argument; output batch axes follow by tracing.
            kwargs["dynamic_shapes"] = {INPUT_NAME: {0: torch.export.Dim(BATCH_DIM)}}
    torch.onnx.export(adapter, (example,), str(dest), **kwargs)


def _remove_sidecars(tmp: Path) -> list[str]:
    """Delete files next to ``tmp`` named after it (``<tmp>.data``); return their names.

    ``atomic_path`` removes the temporary file itself; an exporter that wrote external
    data beside it would otherwise leave a stray half of an artifact behind.
    """
    found = [p for p in tmp.parent.glob(f"{tmp.name}*") if p != tmp]
    for p in found:
        p.unlink(missing_ok=True)
    return [p.name for p in found]


def _no_external_data(model: onnx.ModelProto, tmp: Path) -> None:
    """Fail if any weight lives outside the file (a sidecar would not travel with it)."""
    from onnx.external_data_helper import uses_external_data

    outside = [t.name for t in model.graph.initializer if uses_external_data(t)]
    sidecars = _remove_sidecars(tmp)
    if outside or sidecars:
        raise RuntimeFailure(
            f"the exporter wrote weights outside the .onnx file ({len(outside)} tensors, "
            f"{sidecars}); expected one self-contained file"
        )


_HOST_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node")
"""Per-node metadata the torch.export-based exporter writes that names files on this host
(absolute paths in Python stack traces): dropped, so the file (and its sha256) does not
depend on where dymu is installed. The module ``namespace`` of each node is kept, since it
is what ties a TensorRT parser error back to a dymu module."""


def _strip_host_metadata(model: onnx.ModelProto) -> int:
    """Remove :data:`_HOST_METADATA` from every node, in place; return how many entries."""
    from onnx import AttributeProto

    removed = 0
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            keep = [p for p in node.metadata_props if p.key not in _HOST_METADATA]
            if len(keep) != len(node.metadata_props):
                removed += len(node.metadata_props) - len(keep)
                del node.metadata_props[:]
                node.metadata_props.extend(keep)
            for attr in node.attribute:
                if attr.type == AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)
    return removed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# --- public API ---------------------------------------------------------------------------


def export_onnx(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    input_shape: Sequence[int],
    target: str = "10.3",
    dynamic_batch: bool = True,
    exporter: str = "auto",
    strict: bool = True,
    seed: int = 0,
) -> ExportResult:
    """Export ``module`` (``image -> {task: tensor}``) to one verified ONNX file at ``path``.

    Args:
        module: an eval-mode module such as a
            :class:`~dymu.compile.materialize.MaterializedTree`; it is not modified.
        path: the ``.onnx`` file to write (atomically; parent folders are created).
        input_shape: ``(B, C, H, W)``. With ``dynamic_batch`` the batch axis is free and
            ``B`` only sizes the tracing example, which is traced at ``max(B, 2)``: a batch
            size accidentally baked into the graph then shows up as a wrong shape at the
            other sizes :func:`ort_parity` runs, instead of hiding behind size-1 broadcasting.
        target: TensorRT version the file is for (``"8.5"``, ``"10.3"``, ``"11"``...); it
            picks exporter and opset (:func:`~dymu.compile.trt_support.opset_for`).
        dynamic_batch: make axis 0 of input and outputs the symbol ``"batch"`` (build the
            engine with one optimization profile over it); False fixes it at ``B``.
        exporter: ``"auto"`` (the target's choice; the TorchScript exporter at the same
            opset when onnxscript is missing), or force ``"legacy"`` / ``"dynamo"``.
        strict: raise when the static TensorRT parser check finds problems (the file is
            then not written); False records them in ``result.report`` only.
        seed: seed of the random tracing example (exports are reproducible).

    Returns:
        An :class:`ExportResult` describing the file.

    Raises:
        UserError: bad target, shape, module outputs, exporter choice, or an unwritable
            path (nothing is written).
        RuntimeFailure: the exporter failed, wrote another opset than asked, the checker or
            (with ``strict``) the TensorRT check rejected the graph (nothing is written).
    """
    import onnx

    start = time.perf_counter()
    t = resolve(target)
    shape = _check_input_shape(input_shape)
    dest = Path(path)
    if dest.is_dir():
        raise UserError(f"ONNX output path {dest} is a directory")
    check_eval_mode(module, "export")
    chosen, notes = _choose_exporter(t, exporter)
    opset = t.export_opset

    trace_shape = (max(shape[0], 2), *shape[1:]) if dynamic_batch else shape
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand(trace_shape, generator=gen)  # [B, C, H, W]
    names = _output_names(module, example)
    adapter = TupleOutputs(module, names)
    adapter.training = False  # not .eval(): that would recurse into the caller's module

    with _quiet_exporter() as caught, atomic_path(dest) as tmp:
        try:
            _run_exporter(
                adapter,
                example,
                tmp,
                exporter=chosen,
                opset=opset,
                names=names,
                dynamic_batch=dynamic_batch,
            )
            model = onnx.load(str(tmp), load_external_data=False)
        except OSError as exc:
            _remove_sidecars(tmp)
            raise UserError(f"cannot write ONNX file {dest}: {exc.strerror or exc}") from exc
        except Exception as exc:  # the exporters raise many types; keep the cause chained
            _remove_sidecars(tmp)
            raise RuntimeFailure(
                f"ONNX export ({chosen} exporter, opset {opset}) failed: {_first_line(exc)}"
            ) from exc
        report = _check_written(model, tmp, t, opset, chosen, names, strict)

    return ExportResult(
        path=dest,
        target=t.name,
        exporter=chosen,
        opset=opset,
        input_name=INPUT_NAME,
        output_names=tuple(names),
        input_shape=shape,
        dynamic_batch=dynamic_batch,
        size_bytes=dest.stat().st_size,
        sha256=sha256_file(dest),
        report=report,
        warnings=_useful_warnings(caught),
        notes=tuple(notes),
        seconds=time.perf_counter() - start,
    )


def _check_written(model, tmp: Path, t, opset: int, chosen: str, names, strict: bool):
    """Check the freshly written file ``tmp`` (loaded as ``model``): weights inline, the
    opset asked for, host metadata stripped (rewritten if needed), onnx.checker, the static
    TensorRT parser check (raising with ``strict``) and the task names as outputs.
    Returns the TensorRT check's report."""
    import onnx

    _no_external_data(model, tmp)
    verify_opset(model, opset, chosen)
    if _strip_host_metadata(model):
        onnx.save(model, str(tmp))  # still inline: nothing here moves weights out
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise RuntimeFailure(f"exported ONNX fails onnx.checker: {_first_line(exc)}") from exc
    report = check_graph(model, t.name)
    if strict and not report.ok:
        raise RuntimeFailure(
            f"exported graph will not parse on {t.label}: {'; '.join(report.problems)}"
        )
    outputs = [o.name for o in model.graph.output]
    if outputs != names:
        raise RuntimeFailure(f"ONNX outputs are {outputs}, expected the task names {names}")
    return report


def ort_parity(
    module: nn.Module,
    path: str | os.PathLike,
    batch_sizes: Sequence[int] = (1, 2, 3),
    *,
    seed: int = 0,
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> dict[str, Any]:
    """Max abs difference between ONNX Runtime (CPU) and PyTorch outputs, per task.

    Each batch size gets its own random input (uniform in [0, 1), like a normalised image).
    A file with a static batch axis is run only at that batch size; height and width are
    read from the file's input, which dymu always exports with fixed spatial dims.

    Args:
        module: the module that was exported (``image -> {task: tensor}``), eval mode.
        path: the ``.onnx`` file.
        batch_sizes: batch sizes to run when the batch axis is dynamic.
        seed: seed of the inputs.
        atol, rtol: the tolerance behind ``allclose`` (DEPLOY.md: fp32 1e-5 / 1e-4).

    Returns:
        ``{"per_task": {task: max abs err}, "overall": float, "batch_sizes": [...],
        "allclose": bool}``: errors are maxima over all batch sizes and elements.

    Raises:
        UserError: the file's input is not ``[B, C, H, W]`` with fixed C, H, W.
        RuntimeFailure: output names or shapes differ between the file and the module.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    dims = inp.shape  # e.g. ["batch", 3, 32, 32] or [1, 3, 32, 32]
    if len(dims) != 4 or not all(isinstance(d, int) for d in dims[1:]):
        raise UserError(f"{path}: input {inp.name} has shape {dims}; expected [B, C, H, W]")
    static_batch = dims[0] if isinstance(dims[0], int) else None
    sizes = [static_batch] if static_batch is not None else list(batch_sizes)
    names = [o.name for o in session.get_outputs()]

    gen = torch.Generator().manual_seed(seed)

    def pairs():
        for b in sizes:
            x = torch.rand(b, *dims[1:], generator=gen)  # [b, C, H, W]
            with torch.no_grad():
                want = {k: v.detach().cpu().numpy() for k, v in module(x).items()}
            got = dict(zip(names, session.run(names, {inp.name: x.numpy()}), strict=True))
            yield b, got, want

    return parity_report(pairs(), names, atol=atol, rtol=rtol, backend="ONNX Runtime")
