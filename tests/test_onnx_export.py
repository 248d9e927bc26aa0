"""ONNX export of materialized trees: the opset asked for is the opset written, one inline
file named by task, onnx.checker and the static TensorRT check pass, ONNX Runtime matches
PyTorch on several batch sizes, and failures are one clear error that leaves no file."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.external_data_helper import uses_external_data
from tiny import mobilenet_anchor, randomise_batchnorms
from torch import nn

from dymu.compile import onnx_export, trt_support
from dymu.compile.materialize import materialize
from dymu.compile.onnx_export import export_onnx, ort_parity, verify_opset
from dymu.compile.trt_support import check_graph, opset_for, resolve
from dymu.config import ModelConfig
from dymu.errors import RuntimeFailure, UserError
from dymu.models.anchor import build_anchor
from dymu.space.tree import TreeSpec
from dymu.tasks import TaskSpec

SPECS = [
    TaskSpec("semseg", "semseg", 5),
    TaskSpec("depth", "depth"),
    TaskSpec("normals", "normals"),
]
TASKS = [s.name for s in SPECS]
SIZE = (32, 32)
PARITY_TOL = 1e-4  # DEPLOY.md measured ~1e-7 on a 3-output tree

needs_onnxscript = pytest.mark.skipif(
    not onnx_export.has_onnxscript(), reason="the torch.export-based exporter needs onnxscript"
)


@pytest.fixture(scope="module")
def net() -> nn.Module:
    """A branching tree (random parents) of a width-4, 3-task anchor."""
    anchor = build_anchor(ModelConfig(width=4), SPECS, seed=0)
    randomise_batchnorms(anchor, seed=0)
    anchor.eval()
    tree = TreeSpec.random(len(SPECS), anchor.num_layers, np.random.default_rng(3))
    return materialize(anchor, tree)


# (target, dynamic batch, traced batch, exporter, opset): TensorRT 8.x through the
# TorchScript exporter at 17; 10.x / 11.x through the torch.export-based one at 18.
CASES = [
    pytest.param(("8.5", True, 1, "legacy", 17), id="trt8.5-dynamic"),
    pytest.param(("8.6.1", False, 2, "legacy", 17), id="trt8.6-static"),
    pytest.param(("10.3", True, 1, "dynamo", 18), id="trt10.3-dynamic", marks=needs_onnxscript),
    pytest.param(("11", False, 1, "dynamo", 18), id="trt11-static", marks=needs_onnxscript),
]


@pytest.fixture(scope="module", params=CASES)
def exported(request, net, tmp_path_factory):
    target, dynamic, batch, _, _ = request.param
    folder = tmp_path_factory.mktemp("export")
    result = export_onnx(
        net,
        folder / "model.onnx",
        input_shape=(batch, 3, *SIZE),
        target=target,
        dynamic_batch=dynamic,
    )
    return result, request.param


def test_the_opset_asked_for_is_the_opset_written(exported):
    result, (target, _, _, exporter, opset) = exported
    assert opset_for(target) == opset
    assert (result.exporter, result.opset) == (exporter, opset)
    model = onnx.load(str(result.path))
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    assert default == [opset]


def test_one_self_contained_file(exported):
    result, _ = exported
    assert [p.name for p in result.path.parent.iterdir()] == ["model.onnx"]  # no .data, no tmp
    model = onnx.load(str(result.path), load_external_data=False)
    assert model.graph.initializer and not any(
        uses_external_data(t) for t in model.graph.initializer
    )
    onnx.checker.check_model(model, full_check=True)
    assert result.size_bytes == result.path.stat().st_size
    # No stack traces naming this host's files: the bytes do not depend on the install path.
    assert str(Path(onnx_export.__file__).resolve().parent).encode() not in result.path.read_bytes()
    json.dumps(result.to_json())  # manifest-ready


def test_inputs_and_outputs_are_named_and_batched(exported):
    result, (_, dynamic, batch, _, _) = exported
    graph = onnx.load(str(result.path)).graph
    assert [i.name for i in graph.input] == ["image"]
    assert [o.name for o in graph.output] == TASKS == list(result.output_names)
    for value in [*graph.input, *graph.output]:
        dim0 = value.type.tensor_type.shape.dim[0]
        assert (dim0.dim_param == "batch") if dynamic else (dim0.dim_value == batch)
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]] == [3, *SIZE]


def test_onnx_runtime_matches_pytorch(exported, net):
    result, (_, dynamic, batch, _, _) = exported
    parity = ort_parity(net, result.path, batch_sizes=(1, 2, 3))
    assert parity["batch_sizes"] == ([1, 2, 3] if dynamic else [batch])
    assert set(parity["per_task"]) == set(TASKS)
    assert parity["overall"] < PARITY_TOL and parity["allclose"], parity


def test_dymus_graph_passes_the_static_trt_check(exported):
    result, (target, *_) = exported
    assert result.report.ok, result.report.text()
    report = check_graph(result.path, target)
    assert report.ok and report.op_counts["Conv"] > 0 and "Resize" in report.op_counts
    assert not result.warnings, result.warnings  # known exporter noise is filtered


# --- targets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "opset", "max_opset"),
    [
        ("8.5", 17, 17),
        ("8.5.2", 17, 17),
        ("8.6", 17, 17),
        ("10.0", 18, 20),
        ("10.3", 18, 20),
        ("TensorRT 10.3.0.30", 18, 20),
        ("10.15", 18, 24),
        ("11", 18, 24),
        ("11.4.1", 18, 24),
        ("11.5", 18, 25),
    ],
)
def test_targets_resolve_to_their_parser(target, opset, max_opset):
    t = resolve(target)
    assert (opset_for(target), t.max_opset, t.min_opset) == (opset, max_opset, 9)


def test_declared_table_is_consistent():
    """Every release's export opset is parseable, and later releases only add support."""
    rows = trt_support._RELEASES
    for r in rows:
        t = resolve(f"{r.major}.{r.minor}")
        assert t.min_opset <= t.export_opset <= t.max_opset
        # The ops dymu's exporters emit for its networks are in every table.
        assert {"Conv", "Relu", "Clip", "Add", "Concat", "Resize", "ReduceMean"} <= t.ops
    for older, newer in itertools.pairwise(rows):
        assert older.ops <= newer.ops and older.max_opset <= newer.max_opset


@pytest.mark.parametrize(
    "target", ["", "abc", "8.4", "9.0", "10.16", "11.9", "12", "10..3", "10.3.1.2.5", "-1", "8.x"]
)
def test_bad_targets_are_one_line_user_errors(target):
    with pytest.raises(UserError) as err:
        opset_for(target)
    message = str(err.value)
    assert "\n" not in message and "known targets" in message and "8.5" in message


# --- static check on hand-made graphs -------------------------------------------------------


def _model(nodes, opset=17, functions=(), extra_opsets=()):
    """A float [1, 4] -> [1, 4] model from ``nodes`` reading 'x' and writing 'y'."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def test_check_flags_an_unsupported_op():
    model = _model(
        [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Hardmax", ["h"], ["y"])]
    )
    onnx.checker.check_model(model, full_check=True)
    report = check_graph(model, "8.5")  # Hardmax arrived in TensorRT 9.2
    assert not report.ok and report.unsupported == {"Hardmax": 1}
    assert any("Hardmax" in p and "8.5" in p for p in report.problems)
    assert report.op_counts == {"Hardmax": 1, "Relu": 1}
    assert check_graph(model, "10.3").ok
    text = report.text()
    assert "PROBLEMS" in text and "Hardmax x1" in text and "opset 17" in text


def test_check_flags_a_too_new_or_too_old_opset():
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    report = check_graph(_model(relu, opset=21), "10.3")
    assert not report.ok and report.opset == 21 and report.opset_range == (9, 20)
    assert "opset 21" in report.problems[0] and "9-20" in report.problems[0]
    assert check_graph(_model(relu, opset=21), "10.15").ok
    assert not check_graph(_model(relu, opset=18), "8.6").ok
    assert not check_graph(_model(relu, opset=8), "11").ok
    assert check_graph(_model(relu, opset=17), "8.5").ok


def test_check_flags_custom_domains_resize_modes_subgraphs_and_local_functions():
    custom = _model(
        [helper.make_node("Foo", ["x"], ["y"], domain="my.ops")],
        extra_opsets=[helper.make_opsetid("my.ops", 1)],
    )
    report = check_graph(custom, "10.3")
    assert report.unsupported == {"my.ops::Foo": 1} and "plugin" in report.problems[0]

    roi, scales = helper.make_tensor("roi", TensorProto.FLOAT, [0], []), "scales"
    cubic = _model(
        [
            helper.make_node("Constant", [], ["roi"], value=roi),
            helper.make_node(
                "Constant",
                [],
                [scales],
                value=helper.make_tensor("s", TensorProto.FLOAT, [2], [1, 1]),
            ),
            helper.make_node("Resize", ["x", "roi", scales], ["y"], mode="cubic"),
        ]
    )
    assert any("cubic" in p for p in check_graph(cubic, "10.3").problems)

    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    reduce_const = [
        helper.make_node("Constant", [], ["axes"], value=axes),
        helper.make_node("ReduceMean", ["x", "axes"], ["y"]),
    ]
    assert check_graph(_model(reduce_const, opset=18), "10.3").ok
    reduce_dynamic = [
        helper.make_node("Shape", ["x"], ["shape"], start=0, end=1),  # computed axes
        helper.make_node("ReduceMean", ["x", "shape"], ["y"]),
    ]
    assert any("axes" in p for p in check_graph(_model(reduce_dynamic, opset=18), "10.3").problems)

    # LayerNormalization hidden in an If branch is still found (TensorRT 8.6+ only).
    branch = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["z"])],
        "then",
        [],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 4])],
        initializer=[
            helper.make_tensor("g", TensorProto.FLOAT, [4], [1] * 4),
            helper.make_tensor("b", TensorProto.FLOAT, [4], [0] * 4),
        ],
    )
    cond = helper.make_tensor("c", TensorProto.BOOL, [], [True])
    iffy = _model(
        [
            helper.make_node("Constant", [], ["c"], value=cond),
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
        ]
    )
    assert check_graph(iffy, "8.5").unsupported == {"LayerNormalization": 2}
    assert check_graph(iffy, "8.6").ok

    # A model-local function's body is checked; TensorRT 8.x cannot import the function.
    fn = helper.make_function(
        "local",
        "MyRelu",
        ["a"],
        ["b"],
        [helper.make_node("Relu", ["a"], ["b"])],
        [helper.make_opsetid("", 17)],
    )
    with_fn = _model(
        [helper.make_node("MyRelu", ["x"], ["y"], domain="local")],
        functions=[fn],
        extra_opsets=[helper.make_opsetid("local", 1)],
    )
    assert check_graph(with_fn, "10.3").op_counts == {"Relu": 1}
    assert check_graph(with_fn, "10.3").ok
    assert any("local functions" in p for p in check_graph(with_fn, "8.5").problems)


# --- failures ------------------------------------------------------------------------------


class _LayerNormNet(nn.Module):
    """Exports a LayerNormalization node at opset 17: parseable from TensorRT 8.6, not 8.5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.LayerNorm([4, 8, 8])

    def forward(self, image):
        return {"x": self.norm(self.conv(image))}


def test_strict_trt_check_blocks_an_unparseable_graph(tmp_path):
    model = _LayerNormNet().eval()
    with pytest.raises(RuntimeFailure, match="LayerNormalization") as err:
        export_onnx(model, tmp_path / "m.onnx", input_shape=(1, 3, 8, 8), target="8.5")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []
    loose = export_onnx(
        model, tmp_path / "m.onnx", input_shape=(1, 3, 8, 8), target="8.5", strict=False
    )
    assert not loose.report.ok and loose.report.unsupported == {"LayerNormalization": 1}
    assert export_onnx(model, tmp_path / "n.onnx", input_shape=(1, 3, 8, 8), target="8.6").report.ok


def test_an_opset_other_than_asked_is_refused_and_nothing_written(net, tmp_path, monkeypatch):
    """What the torch.export exporter does to a request for 17: it silently writes 18."""
    real = onnx_export._run_exporter

    def silently_18(*args, **kwargs):
        real(*args, **{**kwargs, "opset": 18})

    monkeypatch.setattr(onnx_export, "_run_exporter", silently_18)
    with pytest.raises(RuntimeFailure, match=r"opset 17 .* opset 18"):
        export_onnx(net, tmp_path / "m.onnx", input_shape=(1, 3, *SIZE), target="8.5")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeFailure):
        verify_opset(
            onnx.load(str(_write(_model([helper.make_node("Relu", ["x"], ["y"])], 18), tmp_path))),
            17,
            "x",
        )


def _write(model, folder: Path) -> Path:
    path = folder / "hand.onnx"
    onnx.save(model, str(path))
    return path


def test_a_failing_exporter_leaves_no_partial_file(net, tmp_path, monkeypatch):
    def half_then_crash(adapter, example, dest, **kwargs):
        Path(dest).write_bytes(b"\x08\x07partial")
        raise RuntimeError("simulated crash\nwith a long traceback-like tail")

    monkeypatch.setattr(onnx_export, "_run_exporter", half_then_crash)
    with pytest.raises(RuntimeFailure, match="simulated crash") as err:
        export_onnx(net, tmp_path / "m.onnx", input_shape=(1, 3, *SIZE), target="8.5")
    assert "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_path_is_a_clear_error(net, tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(UserError, match="cannot create directory"):
        export_onnx(net, blocker / "sub" / "m.onnx", input_shape=(1, 3, *SIZE), target="8.5")
    with pytest.raises(UserError, match="is a directory"):
        export_onnx(net, tmp_path, input_shape=(1, 3, *SIZE), target="8.5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_dir"]


def test_bad_inputs_are_user_errors(net, tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(UserError, match="known targets"):
        export_onnx(net, path, input_shape=(1, 3, *SIZE), target="7.1")
    with pytest.raises(UserError, match="input_shape"):
        export_onnx(net, path, input_shape=(3, *SIZE), target="8.5")
    with pytest.raises(UserError, match="cannot write opset 17"):
        export_onnx(net, path, input_shape=(1, 3, *SIZE), target="8.5", exporter="dynamo")
    training = nn.Sequential(nn.Conv2d(3, 3, 1)).train()
    with pytest.raises(UserError, match="eval-mode"):
        export_onnx(training, path, input_shape=(1, 3, *SIZE), target="8.5")
    with pytest.raises(UserError, match="task name: tensor"):
        export_onnx(nn.Conv2d(3, 3, 1).eval(), path, input_shape=(1, 3, *SIZE), target="8.5")
    assert list(tmp_path.iterdir()) == []


def test_without_onnxscript_newer_targets_fall_back_at_the_same_opset(net, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "has_onnxscript", lambda: False)
    result = export_onnx(net, tmp_path / "m.onnx", input_shape=(1, 3, *SIZE), target="10.3")
    assert (result.exporter, result.opset) == ("legacy", 18) and result.notes
    assert ort_parity(net, result.path, batch_sizes=(2,))["overall"] < PARITY_TOL
    with pytest.raises(UserError, match="pip install onnxscript"):
        export_onnx(
            net, tmp_path / "n.onnx", input_shape=(1, 3, *SIZE), target="10.3", exporter="dynamo"
        )


def test_mobilenetv2_tree_exports(tmp_path):
    """Depthwise convs, ReLU6 (Clip) and a DeepLabV3+ head survive export."""
    anchor = mobilenet_anchor(SPECS[:2])
    tree = TreeSpec.random(2, anchor.num_layers, np.random.default_rng(1))
    net = materialize(anchor, tree)
    result = export_onnx(net, tmp_path / "m.onnx", input_shape=(1, 3, *SIZE), target="8.5")
    assert result.report.ok and result.report.op_counts.get("Clip", 0) > 0
    parity = ort_parity(net, result.path, batch_sizes=(1, 3))
    assert parity["overall"] < PARITY_TOL, parity


def test_importing_the_module_does_not_import_onnx_or_onnxruntime():
    code = (
        "import sys, dymu.compile.onnx_export, dymu.compile.trt_support;"
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
