"""Which ONNX a TensorRT version can parse: a declared table, the export opset, a static check.

Engines are built on the device (DEPLOY.md), so the first place a bad ONNX file would
fail is a Jetson, minutes into a build. :func:`check_graph` catches most parse failures on
the host instead: it compares the graph's operators and opset against what the ONNX parser
of the target TensorRT release is documented to accept.

Sources of the tables below, honestly stated (checked late 2026):

* Opset ranges: onnx-tensorrt ``docs/operators.md`` headers: "TensorRT 8.5 supports
  operators up to Opset 17" (release/8.5-GA), 8.6 the same, "TensorRT 10.0 supports
  operators in the inclusive range of opset 9 to opset 20", "TensorRT 10.15 ... opset 9 to
  opset 24"; DEPLOY.md agrees. For 10.1-10.14 no header was at hand, so they keep 10.0's
  20: a lower bound (the 10.9 changelog already mentions opset-21 GroupNorm), which can
  only make the check stricter, never let a bad file through. TensorRT 11.x: NVIDIA's
  "ONNX Opset Guide" and DEPLOY.md say 25, but the TensorRT 11.5 GitHub release note says
  "Added support for ONNX opset 25", so 11.0-11.4 are declared with 24 and 11.5 with 25.
* Operator sets: the 8.5 set is transcribed from onnx-tensorrt ``docs/operators.md`` on
  branch release/8.5-GA (rows marked Y), the 10.15 set from ``docs/operators.md`` of the
  10.15 release. Every other release is derived from those two and the onnx-tensorrt
  ``docs/Changelog.md`` ("Added support for X" lines), not transcribed from its own
  table: 8.6 = 8.5 + the 8.6 EA additions; 10.0 = 10.15 minus the ops the changelog says
  10.1-10.15 added; 11.x = 10.15 + what the TensorRT 11.0 / 11.2.1 release notes add. An
  op the 10.x changelog forgot to mention would therefore be claimed for 10.0 too early.
* Restrictions: only the ``Resize`` attribute restrictions of the operator tables are
  checked (dymu's heads upsample with ``Resize``); data types and the other per-operator
  restrictions are not. A clean report is a strong hint, not a guarantee: building the
  engine on the device is the real test.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING

from dymu.errors import UserError

if TYPE_CHECKING:
    import onnx

LEGACY = "legacy"
"""The TorchScript-based ``torch.onnx.export(dynamo=False)``: writes opset <= 20 exactly."""

DYNAMO = "dynamo"
"""The torch.export-based exporter (torch's default since 2.9); builds opset-18 graphs."""

MIN_OPSET = 9
"""Oldest opset every declared parser accepts ("backward compatible to opset 9")."""

# --- operator sets ------------------------------------------------------------------------


def _ops(names: str) -> frozenset[str]:
    """A set of operator names from a whitespace-separated list (reads like the table)."""
    return frozenset(names.split())


_OPS_8_5 = _ops(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization
    Cast Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten
    Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GRU HardSigmoid HardSwish Identity If ImageScaler
    InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg
    NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
    RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1
    ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
    Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice
    Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu
    Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """
)
"""onnx-tensorrt release/8.5-GA ``docs/operators.md``, rows marked Y."""

_OPS_10_15 = _ops(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
    GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid
    HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN
    LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
    LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul
    Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
    QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
    Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
    ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization
    RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND
    Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth
    Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile TopK Transpose
    Trilu Unsqueeze Upsample Where Xor
    """
)
"""onnx-tensorrt ``docs/operators.md`` of TensorRT 10.15, rows marked Y."""

# Additions per release from onnx-tensorrt docs/Changelog.md ("Added support for ...").
_ADDED_10 = {
    1: {"DeformConv"},
    4: {"BlackmanWindow", "HammingWindow", "HannWindow"},
    5: {"STFT"},
    14: {"Attention"},
    15: {"RotaryEmbedding", "RMSNormalization", "TensorScatter"},
}
_OPS_10_0 = _OPS_10_15.difference(*_ADDED_10.values())


@dataclass(frozen=True)
class _Release:
    """One declared row: the parser of TensorRT ``major.minor`` (and later patch levels)."""

    major: int
    minor: int
    max_opset: int
    ops: frozenset[str]
    local_functions: bool  # model-local ONNX functions: parser support from TensorRT 9.0


def _declare() -> tuple[_Release, ...]:
    rows = [
        _Release(8, 5, 17, _OPS_8_5, False),
        # 8.6 EA changelog: GroupNormalization, LayerNormalization, IsInf.
        _Release(8, 6, 17, _OPS_8_5 | {"GroupNormalization", "LayerNormalization", "IsInf"}, False),
    ]
    ops = _OPS_10_0
    for minor in range(16):  # 10.0 .. 10.15
        ops = ops | _ADDED_10.get(minor, set())
        rows.append(_Release(10, minor, 24 if minor >= 15 else 20, frozenset(ops), True))
    # TensorRT 11.0 release: "Added support for Swish operator"; 11.2.1 release notes: ONNX
    # DFT via a cuFFT plugin; 11.5: "Added support for ONNX opset 25".
    for minor in range(6):  # 11.0 .. 11.5
        ops = ops | {"Swish"} | ({"DFT"} if minor >= 2 else set())
        rows.append(_Release(11, minor, 25 if minor >= 5 else 24, frozenset(ops), True))
    return tuple(rows)


_RELEASES = _declare()
_BY_VERSION = {(r.major, r.minor): r for r in _RELEASES}

KNOWN_TARGETS = "8.5, 8.6, 10.0-10.15, 11.0-11.5 (a patch level such as 8.5.2 is accepted)"
"""The declared TensorRT releases, as error messages list them."""

_RESIZE_MODES = {"nearest", "linear"}
_RESIZE_TRANSFORMS = {
    "half_pixel",
    "pytorch_half_pixel",
    "tf_half_pixel_for_nn",
    "asymmetric",
    "align_corners",
}
"""``Resize`` restrictions common to the 8.5 and 10.15 operator tables."""


# --- targets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrtTarget:
    """A resolved TensorRT target: what its ONNX parser accepts and how dymu exports for it.

    Attributes:
        name: the version as the user gave it, normalised (``"8.5.2"``).
        release: ``(major, minor)`` of the declared table row used.
        min_opset, max_opset: the parser's inclusive opset range.
        ops: default-domain (``ai.onnx``) operators its parser imports.
        local_functions: whether the parser imports model-local ONNX functions.
        export_opset: the opset :func:`opset_for` exports at.
        exporter: :data:`LEGACY` or :data:`DYNAMO`.
    """

    name: str
    release: tuple[int, int]
    min_opset: int
    max_opset: int
    ops: frozenset[str] = field(repr=False)
    local_functions: bool
    export_opset: int
    exporter: str

    @property
    def label(self) -> str:
        return f"TensorRT {self.name}"


_VERSION = re.compile(r"(?:tensorrt|trt)?\s*v?(\d+)(?:\.(\d+))?((?:\.\d+){0,2})", re.IGNORECASE)


def resolve(target: str) -> TrtTarget:
    """The declared parser of a TensorRT version string such as ``"8.5"``, ``"10.3.0"``, ``"11"``.

    A patch level is ignored (parsers change per minor release). A major version alone
    means its oldest declared minor (``"11"`` -> 11.0): the conservative reading, since
    later minors only add operators and opsets.

    Raises:
        UserError: malformed, or not a declared release; the message lists the known ones.
    """
    text = str(target).strip()
    match = _VERSION.fullmatch(text)
    if match is None:
        raise UserError(f"malformed TensorRT target {target!r}; known targets: {KNOWN_TARGETS}")
    major = int(match.group(1))
    minors = sorted(r.minor for r in _RELEASES if r.major == major)
    minor = int(match.group(2)) if match.group(2) is not None else (minors[0] if minors else 0)
    row = _BY_VERSION.get((major, minor))
    if row is None:
        raise UserError(f"unknown TensorRT target {target!r}; known targets: {KNOWN_TARGETS}")
    # 8.x: Jetson's JetPack 5/6 (TensorRT 8.5/8.6) stop at opset 17, which the torch.export
    # exporter cannot write (it silently gives 18), so the TorchScript exporter writes 17.
    # 10.x/11.x: opset 18, see opset_for.
    exporter, opset = (LEGACY, 17) if major < 10 else (DYNAMO, 18)
    return TrtTarget(
        name=f"{major}.{minor}{match.group(3) or ''}",
        release=(major, minor),
        min_opset=MIN_OPSET,
        max_opset=row.max_opset,
        ops=row.ops,
        local_functions=row.local_functions,
        export_opset=opset,
        exporter=exporter,
    )


def opset_for(target: str) -> int:
    """The ONNX opset dymu exports at for a TensorRT target.

    * 8.5 / 8.6 (JetPack 5.1 / 6.0; Xavier stops at 8.5): 17, the newest their parser
      reads, written by the TorchScript exporter (``dynamo=False``), because the
      torch.export-based exporter turns a request for opset < 18 into 18 (DEPLOY.md).
    * 10.x / 11.x: 18. It is the opset the torch.export-based exporter builds natively
      (any other opset is produced by a separate version-conversion pass that can fail or
      silently keep 18), it is inside every 10.x and 11.x parser's range (<= 20), so one file
      serves a mixed fleet of JetPack 6 and 7 devices, and dymu's convolutional trees use no
      operator that a newer opset adds or changes in a way TensorRT would exploit.

    Raises:
        UserError: for an unknown or malformed target.
    """
    return resolve(target).export_opset


# --- static check -------------------------------------------------------------------------


@dataclass
class Report:
    """Result of :func:`check_graph`.

    Attributes:
        target: the label of the TensorRT version checked against (``"TensorRT 10.3"``).
        opset: the graph's default-domain opset (``None`` when it declares none).
        opset_range: the parser's inclusive ``(min, max)`` opset.
        op_counts: operator -> number of nodes, subgraphs and local functions included;
            operators outside the default domain are written ``domain::Op``.
        unsupported: the entries of ``op_counts`` the parser does not import.
        problems: one readable line per reason the parser would (likely) reject the graph.
    """

    target: str
    opset: int | None
    opset_range: tuple[int, int]
    op_counts: dict[str, int]
    unsupported: dict[str, int]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        """A readable multi-line report (what ``dymu export`` prints)."""
        lo, hi = self.opset_range
        nodes = sum(self.op_counts.values())
        lines = [
            f"{self.target} ONNX parser check: {'OK' if self.ok else 'PROBLEMS'}",
            f"  opset {self.opset} (parser reads {lo}-{hi})",
            f"  {nodes} nodes, {len(self.op_counts)} op types: "
            + ", ".join(f"{op} x{n}" for op, n in self.op_counts.items()),
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def _graph_nodes(
    graph: onnx.GraphProto, functions: dict[tuple[str, str], onnx.FunctionProto]
) -> Iterator[tuple[onnx.NodeProto, bool]]:
    """Every node of ``graph``, its subgraphs and called local functions, recursively.

    Yields ``(node, is_local_function_call)``; a call is followed by its body's nodes.
    """
    from onnx import AttributeProto

    stack = [iter(graph.node)]
    seen_functions: set[tuple[str, str]] = set()
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
            continue
        key = (node.domain, node.op_type)
        is_call = key in functions
        yield node, is_call
        if is_call and key not in seen_functions:  # count a function body once per model
            seen_functions.add(key)
            stack.append(iter(functions[key].node))
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                stack.append(iter(attr.g.node))
            elif attr.type == AttributeProto.GRAPHS:
                stack.extend(iter(g.node) for g in attr.graphs)


def _resize_problems(node: onnx.NodeProto, label: str) -> list[str]:
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("mode", b"nearest").decode()
    transform = attrs.get("coordinate_transformation_mode", b"half_pixel").decode()
    problems = []
    if mode not in _RESIZE_MODES:
        problems.append(f"Resize {node.name or '?'}: mode {mode!r} is not supported by {label}")
    if transform not in _RESIZE_TRANSFORMS:
        problems.append(
            f"Resize {node.name or '?'}: coordinate_transformation_mode {transform!r} "
            f"is not supported by {label}"
        )
    if attrs.get("antialias", 0):
        problems.append(f"Resize {node.name or '?'}: antialias is not supported by {label}")
    return problems


def _computed_axes(node: onnx.NodeProto, constants: set[str]) -> bool:
    """Whether a Reduce node takes its (optional) axes input from a computed tensor."""
    return len(node.input) > 1 and bool(node.input[1]) and node.input[1] not in constants


def check_graph(model: onnx.ModelProto | str | PathLike, target: str) -> Report:
    """Compare a model's operators and opset with what ``target``'s ONNX parser imports.

    Args:
        model: the model, or the path of an ``.onnx`` file (external weights not loaded).
        target: a TensorRT version, as :func:`resolve` reads it.

    Returns:
        A :class:`Report`; ``report.ok`` is False when any operator, the opset, a
        ``Resize`` attribute or a local function is outside what the parser supports.

    Raises:
        UserError: for an unknown or malformed target.
    """
    import onnx

    t = resolve(target)
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    functions = {(f.domain, f.name): f for f in model.functions}

    nodes = list(_graph_nodes(model.graph, functions))
    # Names whose value is known when the engine is built (main-graph initializers and
    # Constant outputs; initializers of subgraphs are not collected: rare, and a miss only
    # makes the axes check below stricter).
    constants = {i.name for i in model.graph.initializer} | {
        out for node, _ in nodes if node.op_type == "Constant" for out in node.output
    }
    counts: Counter[str] = Counter()
    problems: list[str] = []
    calls: set[str] = set()
    for node, is_call in nodes:
        default = node.domain in ("", "ai.onnx")
        name = node.op_type if default else f"{node.domain}::{node.op_type}"
        if is_call:
            calls.add(name)
            continue
        counts[name] += 1
        if default and node.op_type == "Resize":
            problems += _resize_problems(node, t.label)
        elif default and node.op_type.startswith("Reduce") and _computed_axes(node, constants):
            # Opset 18 moved Reduce* axes from an attribute to an input; the parser needs it
            # constant ("`axes` must be an initializer", 10.15 operator table).
            problems.append(
                f"{node.op_type} {node.name or '?'}: axes input {node.input[1]!r} is not a "
                f"build-time constant, which {t.label} requires"
            )

    unsupported = {
        op: n for op, n in counts.items() if "::" in op or op not in t.ops
    }  # a non-default domain needs a TensorRT plugin of that name
    lo, hi = t.min_opset, t.max_opset
    if opset is None:
        problems.insert(0, "the model imports no default-domain (ai.onnx) opset")
    elif not lo <= opset <= hi:
        problems.insert(0, f"opset {opset} is outside the {t.label} parser's range {lo}-{hi}")
    for op, n in sorted(unsupported.items()):
        why = (
            f"custom-domain op {op} (x{n}) needs a TensorRT plugin"
            if "::" in op
            else f"op {op} (x{n}) is not supported by the {t.label} ONNX parser"
        )
        problems.append(why)
    if calls and not t.local_functions:
        problems.append(
            f"model-local functions {sorted(calls)} need TensorRT >= 9.0 (inline them first)"
        )
    return Report(
        target=t.label,
        opset=opset,
        opset_range=(lo, hi),
        op_counts=dict(sorted(counts.items())),
        unsupported=dict(sorted(unsupported.items())),
        problems=problems,
    )
