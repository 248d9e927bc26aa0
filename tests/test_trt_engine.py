"""TensorRT engine build/run: version families, metadata, device checks, the build child.

Everything except the last test runs without TensorRT and without a GPU: the TensorRT
calls are checked against a small fake ``tensorrt`` module that has, per API family, only
the names that family documents (no ``BuilderFlag.FP16`` in 11.x, ...), so using a name
the real family lacks fails here too.
"""

from __future__ import annotations

import json
import signal
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dymu.compile import trt_engine
from dymu.compile.trt_engine import (
    DeviceInfo,
    EngineMeta,
    EngineRunner,
    _build_in_process,
    _run_child,
    build_engine,
    check_meta,
    meta_path,
    read_meta,
    timing_cache_path,
    trt_api,
    trt_version_key,
    write_meta,
)
from dymu.errors import RuntimeFailure, UserError

ORIN = DeviceInfo(trt_version="8.5.2.2", gpu_name="Orin", compute_capability="8.7")


def _meta(**changes: Any) -> EngineMeta:
    base = dict(
        trt_version="8.5.2.2",
        gpu_name="Orin",
        compute_capability="8.7",
        precision="fp16",
        input_name="image",
        min_shape=(1, 3, 32, 32),
        opt_shape=(2, 3, 32, 32),
        max_shape=(4, 3, 32, 32),
        output_names=("semseg", "depth"),
        onnx_sha256="ab" * 32,
        workspace_bytes=512 << 20,
        onnx_path="export/abc/model.onnx",
    )
    base.update(changes)
    return EngineMeta(**base)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    return text


# --- versions -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "api"),
    [
        ("8.5.2.2", "v8"),  # JetPack 5.1 (Xavier, Orin)
        ("8.6.1", "v8"),
        ("8.6.2.3", "v8"),  # JetPack 6.0
        ("10.3.0", "v10"),  # JetPack 6.1/6.2
        ("10.0.0b6", "v10"),  # pre-release suffix
        (" 10.15.1.29 ", "v10"),
        ("11.4.1", "v11"),  # JetPack 7
        ("11.0", "v11"),
    ],
)
def test_trt_api_families(version: str, api: str) -> None:
    assert trt_api(version) == api


@pytest.mark.parametrize(
    ("version", "words"),
    [
        ("8.4.3", "too old"),
        ("8.2.1.8", "too old"),
        ("7.1.3", "too old"),
        ("9.3.0", "not supported"),
        ("12.0.0", "not supported"),
        ("", "malformed"),
        ("ten", "malformed"),
        ("10", "malformed"),
        ("8.x.1", "malformed"),
        ("8.5.2.2.1", "malformed"),
    ],
)
def test_trt_api_refuses(version: str, words: str) -> None:
    with pytest.raises(UserError) as exc:
        trt_api(version)
    assert words in _one_line(exc)


def test_version_key_drops_build_number() -> None:
    assert trt_version_key("8.5.2.2") == trt_version_key("8.5.2.1") == "8.5.2"
    assert trt_version_key("10.3") == "10.3.0"


# --- metadata -----------------------------------------------------------------------------


def test_meta_round_trip(tmp_path: Path) -> None:
    meta = _meta()
    assert EngineMeta.from_json(json.loads(json.dumps(meta.to_json()))) == meta
    engine = tmp_path / "model.engine"
    written = write_meta(engine, meta)
    assert written == meta_path(engine) == tmp_path / "model.engine.json"
    on_disk = json.loads(written.read_text())
    assert on_disk["min_shape"] == [1, 3, 32, 32]
    assert on_disk["compute_capability"] == "8.7"
    assert read_meta(engine) == meta
    assert meta.api == "v8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine.json"]  # no temp left


def test_meta_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = tmp_path / "model.engine"
    write_meta(engine, _meta())
    before = meta_path(engine).read_bytes()
    real_write = Path.write_bytes

    def torn_write(self: Path, data: bytes) -> int:  # half the bytes, then the disk "fails"
        real_write(self, data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_bytes", torn_write)
    with pytest.raises(OSError):
        write_meta(engine, _meta(precision="fp32"))
    monkeypatch.undo()
    assert meta_path(engine).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.engine.json"]


def test_meta_missing_or_malformed(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    with pytest.raises(UserError) as exc:
        read_meta(engine)
    assert "rebuild" in _one_line(exc)
    obj = _meta().to_json()
    del obj["precision"], obj["onnx_sha256"]
    meta_path(engine).write_text(json.dumps(obj))
    with pytest.raises(UserError) as exc:
        read_meta(engine)
    assert "precision" in _one_line(exc) and "onnx_sha256" in str(exc.value)
    meta_path(engine).write_text("{not json")
    with pytest.raises(UserError):
        read_meta(engine)


def test_meta_ignores_unknown_keys() -> None:
    obj = {**_meta().to_json(), "added_by_a_newer_dymu": 1}
    assert EngineMeta.from_json(obj) == _meta()


# --- device checks ------------------------------------------------------------------------


def test_check_meta_accepts_same_device() -> None:
    check_meta(_meta(), ORIN)
    check_meta(_meta(), ORIN, precision="fp16")
    # Another build of the same patch release (4th field) is the same TensorRT.
    check_meta(_meta(), DeviceInfo("8.5.2.1", "Orin", "8.7"))


@pytest.mark.parametrize(
    ("current", "precision", "words"),
    [
        (DeviceInfo("8.5.3.1", "Orin", "8.7"), None, ["TensorRT 8.5.2 vs 8.5.3"]),
        (DeviceInfo("10.3.0", "Orin", "8.7"), None, ["TensorRT 8.5.2 vs 10.3.0"]),
        (
            DeviceInfo("8.5.2.2", "Xavier", "7.2"),
            None,
            ["compute capability 8.7 (Orin) vs 7.2 (Xavier)"],
        ),
        (ORIN, "fp32", ["precision fp16 vs fp32"]),
        (
            DeviceInfo("10.3.0", "Thor", "11.0"),
            "fp32",
            ["TensorRT 8.5.2 vs 10.3.0", "8.7 (Orin) vs 11.0 (Thor)", "precision fp16 vs fp32"],
        ),
    ],
)
def test_check_meta_refuses(current: DeviceInfo, precision: str | None, words: list[str]) -> None:
    with pytest.raises(UserError) as exc:
        check_meta(_meta(), current, precision=precision)
    text = _one_line(exc)
    for word in words:
        assert word in text
    assert "rebuilt on this device" in text and "export/abc/model.onnx" in text


def test_check_meta_warns_on_other_gpu_of_same_capability() -> None:
    with pytest.warns(UserWarning, match="Orin NX"):
        check_meta(_meta(), DeviceInfo("8.5.2.2", "Orin NX", "8.7"))


def test_timing_cache_is_per_device(tmp_path: Path) -> None:
    a = timing_cache_path(tmp_path, ORIN)
    assert a == tmp_path / "timing-trt8.5.2-sm87-orin.cache"
    assert timing_cache_path(tmp_path, DeviceInfo("8.5.2.1", "Orin", "8.7")) == a  # same TRT
    assert timing_cache_path(tmp_path, DeviceInfo("10.3.0", "Orin", "8.7")) != a


# --- preconditions of build_engine --------------------------------------------------------


def test_build_engine_needs_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeFailure) as exc:
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
    assert _one_line(exc) == "TensorRT needs a CUDA GPU; none found"
    assert exc.value.exit_code == 1


def test_build_engine_needs_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    with pytest.raises(UserError) as exc:
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine")
    text = _one_line(exc)
    assert text.startswith("TensorRT is not installed: ")
    assert "python3-libnvinfer" in text and "--system-site-packages" in text
    assert exc.value.exit_code == 2


# --- the build child ----------------------------------------------------------------------


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_run_child_reports_last_stderr_line() -> None:
    code = (
        "import sys; print('progress chatter', file=sys.stderr); "
        "print('Traceback ...', file=sys.stderr); "
        "print('TypeError: factory function returned nullptr', file=sys.stderr); sys.exit(1)"
    )
    with pytest.raises(RuntimeFailure) as exc:
        _run_child(_py(code), what="TensorRT build of m.onnx")
    text = _one_line(exc)
    assert text == (
        "TensorRT build of m.onnx failed (exit 1): TypeError: factory function returned nullptr"
    )


def test_run_child_maps_exit_2_to_user_error() -> None:
    code = "import sys; print('error: bad ONNX', file=sys.stderr); sys.exit(2)"
    with pytest.raises(UserError) as exc:
        _run_child(_py(code), what="build")
    assert _one_line(exc) == "bad ONNX"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_run_child_survives_native_crash() -> None:
    code = "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"
    with pytest.raises(RuntimeFailure) as exc:
        _run_child(_py(code), what="build")
    assert signal.SIGSEGV.name in _one_line(exc)


def test_run_child_timeout() -> None:
    with pytest.raises(RuntimeFailure, match=r"did not finish within 0\.5 s"):
        _run_child(_py("import time; time.sleep(30)"), what="build", timeout_s=0.5)


def test_build_engine_reports_failing_child(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    onnx_path = _tiny_onnx(tmp_path / "m.onnx")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt("10.3.0"))
    seen: dict[str, Any] = {}
    real_command = trt_engine._child_command

    def command(*args: Any, **kwargs: Any) -> list[str]:
        seen["cmd"] = real_command(*args, **kwargs)
        return _py("import sys; sys.stderr.write('out of memory on the device\\n'); sys.exit(1)")

    monkeypatch.setattr(trt_engine, "_child_command", command)
    with pytest.raises(RuntimeFailure) as exc:
        build_engine(onnx_path, tmp_path / "out" / "m.engine", precision="fp16", max_batch=4)
    log = tmp_path / "out" / "m.engine.build.log"
    assert _one_line(exc).endswith(
        f"failed (exit 1): out of memory on the device (full log: {log})"
    )
    assert log.read_text() == "out of memory on the device\n"
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "dymu.compile.trt_engine", "build"]
    assert cmd[cmd.index("--precision") + 1] == "fp16"
    assert cmd[cmd.index("--max-batch") + 1] == "4"
    assert not (tmp_path / "out" / "m.engine").exists()


def test_child_entry_point_reports_one_line(tmp_path: Path) -> None:
    """The real ``python -m dymu.compile.trt_engine build`` child, on input it refuses."""
    cmd = trt_engine._child_command(
        tmp_path / "missing.onnx",
        tmp_path / "m.engine",
        precision="fp32",
        min_batch=1,
        opt_batch=1,
        max_batch=1,
        workspace_mib=256,
        timing_cache=None,
    )
    with pytest.raises(UserError) as exc:
        _run_child(cmd, what="build")
    assert _one_line(exc) == f"ONNX file {tmp_path / 'missing.onnx'} not found"


# --- the TensorRT calls, against a fake tensorrt ------------------------------------------


def _tiny_onnx(path: Path, dtype: str = "float") -> Path:
    """A one-Conv ONNX file (no TensorRT needed); ``dtype`` "float16" makes an fp16 model."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    weight = np.full((4, 3, 3, 3), 0.1, dtype=np.float16 if dtype == "float16" else np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["semseg"], pads=[1, 1, 1, 1])],
        "tiny",
        [helper.make_tensor_value_info("image", elem, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("semseg", elem, ["batch", 4, 8, 8])],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _fake_trt(
    version: str,
    *,
    parse_errors: tuple[str, ...] = (),
    input_shape: tuple[int, ...] = (-1, 3, 8, 8),
    plan: bytes | None = b"PLAN",
) -> types.ModuleType:
    """A minimal ``tensorrt`` of one API family that records the calls made on it.

    Only names the family documents exist: ``EXPLICIT_BATCH`` in 8.x and (deprecated) in
    10.x, ``BuilderFlag.FP16`` in 8.x and 10.x, neither in 11.x.
    """
    major = int(version.split(".")[0])
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    calls: list[tuple] = []
    trt.calls = calls  # type: ignore[attr-defined]

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity: str) -> None:
            self.severity = severity

    class TimingCache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data + b"|tactics"

    class Config:
        cache: TimingCache | None = None

        def set_memory_pool_limit(self, pool: str, size: int) -> None:
            calls.append(("set_memory_pool_limit", pool, size))

        def set_flag(self, flag: str) -> None:
            calls.append(("set_flag", flag))

        def add_optimization_profile(self, profile: Any) -> int:
            calls.append(("add_optimization_profile",))
            return 0

        def create_timing_cache(self, data: bytes) -> TimingCache:
            calls.append(("create_timing_cache", bytes(data)))
            return TimingCache(bytes(data))

        def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
            calls.append(("set_timing_cache", ignore_mismatch))
            self.cache = cache
            return True

        def get_timing_cache(self) -> TimingCache | None:
            return self.cache

    class Profile:
        def set_shape(self, name: str, min: tuple, opt: tuple, max: tuple) -> None:
            calls.append(("set_shape", name, tuple(min), tuple(opt), tuple(max)))

    outputs = [types.SimpleNamespace(name="semseg"), types.SimpleNamespace(name="depth")]

    class Network:
        num_inputs = 1
        num_outputs = len(outputs)

        def get_input(self, i: int) -> Any:
            return types.SimpleNamespace(name="image", shape=input_shape)

        def get_output(self, i: int) -> Any:
            return outputs[i]

    class Builder:
        def __init__(self, logger: Logger) -> None:
            calls.append(("Builder",))

        def create_network(self, *flags: int) -> Network:  # flags=0 is its default
            calls.append(("create_network", *flags))
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
            calls.append(("build_serialized_network",))
            return plan

    class OnnxParser:
        def __init__(self, network: Network, logger: Logger) -> None:
            self.num_errors = len(parse_errors)

        def parse_from_file(self, path: str) -> bool:
            calls.append(("parse_from_file", path))
            return not parse_errors

        def get_error(self, i: int) -> str:
            return parse_errors[i]

    trt.Logger = Logger
    trt.Builder = Builder
    trt.OnnxParser = OnnxParser
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    flags = {"STRONGLY_TYPED": 1} if major >= 10 else {}
    if major <= 10:
        flags["EXPLICIT_BATCH"] = 0
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(**flags)
    trt.BuilderFlag = types.SimpleNamespace(
        TF32="TF32", **({"FP16": "FP16"} if major <= 10 else {})
    )
    return trt


def _build(trt: types.ModuleType, tmp_path: Path, onnx_path: Path, **kwargs: Any) -> EngineMeta:
    """``_build_in_process`` with ``trt`` as ``tensorrt`` (a real one is put back after)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", trt)
        return _build_in_process(
            onnx_path,
            tmp_path / "model.engine",
            device=DeviceInfo(trt.__version__, "Orin", "8.7"),
            **kwargs,
        )


def _named(calls: list[tuple], name: str) -> list[tuple]:
    return [c for c in calls if c[0] == name]


@pytest.mark.parametrize(
    ("version", "precision", "flags", "fp16_flag"),
    [
        ("8.5.2.2", "fp16", (1 << 0,), True),  # EXPLICIT_BATCH, BuilderFlag.FP16
        ("8.6.2.3", "fp32", (1 << 0,), False),
        ("10.3.0", "fp16", (), True),  # no creation flag, still BuilderFlag.FP16
        ("10.3.0", "fp32", (), False),
        ("11.4.1", "fp32", (), False),
    ],
)
def test_build_calls_per_api_family(
    tmp_path: Path, version: str, precision: str, flags: tuple[int, ...], fp16_flag: bool
) -> None:
    trt = _fake_trt(version)
    onnx_path = _tiny_onnx(tmp_path / "model.onnx")
    meta = _build(
        trt,
        tmp_path,
        onnx_path,
        precision=precision,
        min_batch=1,
        opt_batch=2,
        max_batch=4,
        workspace_mib=256,
    )
    calls = trt.calls
    assert _named(calls, "create_network") == [("create_network", *flags)]
    assert _named(calls, "parse_from_file") == [("parse_from_file", str(onnx_path))]
    assert _named(calls, "set_memory_pool_limit") == [
        ("set_memory_pool_limit", "WORKSPACE", 256 << 20)
    ]
    assert _named(calls, "set_flag") == ([("set_flag", "FP16")] if fp16_flag else [])
    assert _named(calls, "set_shape") == [
        ("set_shape", "image", (1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8))
    ]
    assert _named(calls, "add_optimization_profile") and _named(calls, "build_serialized_network")
    assert not _named(calls, "create_timing_cache")  # no cache asked for

    engine = tmp_path / "model.engine"
    assert engine.read_bytes() == b"PLAN"
    assert read_meta(engine) == meta
    assert meta.trt_version == version and meta.precision == precision
    assert meta.max_shape == (4, 3, 8, 8) and meta.output_names == ("semseg", "depth")
    assert meta.workspace_bytes == 256 << 20 and meta.compute_capability == "8.7"
    assert len(meta.onnx_sha256) == 64


def test_build_v11_fp16_needs_fp16_onnx(tmp_path: Path) -> None:
    trt = _fake_trt("11.4.1")
    with pytest.raises(UserError) as exc:
        _build(trt, tmp_path, _tiny_onnx(tmp_path / "fp32.onnx"), precision="fp16")
    text = _one_line(exc)
    assert "fp16 ONNX" in text and "fp32.onnx is fp32" in text
    assert not _named(trt.calls, "Builder")  # refused before TensorRT was touched
    assert not (tmp_path / "model.engine").exists()

    meta = _build(trt, tmp_path, _tiny_onnx(tmp_path / "fp16.onnx", "float16"), precision="fp16")
    assert meta.precision == "fp16"
    assert not _named(trt.calls, "set_flag")  # 11.x has no FP16 flag to set
    with pytest.raises(UserError, match="build it with precision fp16"):
        _build(trt, tmp_path, tmp_path / "fp16.onnx", precision="fp32")


def test_build_shares_timing_cache(tmp_path: Path) -> None:
    onnx_path = _tiny_onnx(tmp_path / "model.onnx")
    cache = tmp_path / "caches" / "timing.cache"
    trt = _fake_trt("10.3.0")
    _build(trt, tmp_path, onnx_path, timing_cache=cache)
    assert _named(trt.calls, "create_timing_cache") == [("create_timing_cache", b"")]
    assert _named(trt.calls, "set_timing_cache") == [("set_timing_cache", False)]
    assert cache.read_bytes() == b"|tactics"
    trt = _fake_trt("10.3.0")  # the next tree's build, in a new child process
    _build(trt, tmp_path, onnx_path, timing_cache=cache)
    assert _named(trt.calls, "create_timing_cache") == [("create_timing_cache", b"|tactics")]
    assert cache.read_bytes() == b"|tactics|tactics"


def test_build_reports_parser_errors_by_index(tmp_path: Path) -> None:
    trt = _fake_trt(
        "8.5.2.2",
        parse_errors=("In node 3 (importFoo): UNSUPPORTED_NODE:\n  Foo", "second problem"),
    )
    with pytest.raises(UserError) as exc:
        _build(trt, tmp_path, _tiny_onnx(tmp_path / "m.onnx"))
    text = _one_line(exc)
    assert "cannot parse m.onnx" in text
    assert "error 0: In node 3 (importFoo): UNSUPPORTED_NODE: Foo; error 1: second problem" in text
    assert not _named(trt.calls, "build_serialized_network")


def test_build_refuses_shapes_the_profile_cannot_cover(tmp_path: Path) -> None:
    onnx_path = _tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(UserError, match="fixed batch of 1"):
        _build(_fake_trt("10.3.0", input_shape=(1, 3, 8, 8)), tmp_path, onnx_path, max_batch=4)
    with pytest.raises(UserError, match="only the batch"):
        _build(_fake_trt("10.3.0", input_shape=(-1, 3, -1, -1)), tmp_path, onnx_path)
    with pytest.raises(UserError, match="1 <= min <= opt <= max"):
        _build(_fake_trt("10.3.0"), tmp_path, onnx_path, min_batch=2, opt_batch=1)
    with pytest.raises(UserError, match="unknown precision"):
        _build(_fake_trt("10.3.0"), tmp_path, onnx_path, precision="int8")


def test_build_without_engine_is_runtime_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="could not build an engine"):
        _build(_fake_trt("10.3.0", plan=None), tmp_path, _tiny_onnx(tmp_path / "m.onnx"))
    assert not (tmp_path / "model.engine").exists()
    assert not meta_path(tmp_path / "model.engine").exists()


# --- EngineRunner (without a GPU: the checks before any CUDA work) -------------------------


def _fake_runtime_trt(version: str) -> types.ModuleType:
    trt = _fake_trt(version)
    modes = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    float32 = types.SimpleNamespace(name="FLOAT")
    names = ["image", "semseg", "depth"]

    class Engine:
        num_io_tensors = len(names)

        def get_tensor_name(self, i: int) -> str:
            return names[i]

        def get_tensor_mode(self, name: str) -> str:
            return modes.INPUT if name == "image" else modes.OUTPUT

        def get_tensor_dtype(self, name: str) -> Any:
            return float32

        def create_execution_context(self) -> object:
            return object()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            trt.calls.append(("Runtime",))

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            trt.calls.append(("deserialize_cuda_engine", bytes(data)))
            return Engine()

    trt.Runtime = Runtime
    trt.TensorIOMode = modes
    return trt


def test_runner_checks_meta_before_tensorrt(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"PLAN")
    write_meta(
        engine, _meta(min_shape=(1, 3, 8, 8), opt_shape=(2, 3, 8, 8), max_shape=(4, 3, 8, 8))
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    trt = _fake_runtime_trt("10.3.0")
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    with pytest.raises(UserError) as exc:
        EngineRunner(engine, device=DeviceInfo("10.3.0", "Orin", "8.7"))
    assert "TensorRT 8.5.2 vs 10.3.0" in _one_line(exc)
    with pytest.raises(UserError, match="precision fp16 vs fp32"):
        EngineRunner(engine, precision="fp32", device=ORIN)
    assert trt.calls == []  # nothing was deserialized

    runner = EngineRunner(engine, precision="fp16", device=ORIN)
    assert trt.calls == [("Runtime",), ("deserialize_cuda_engine", b"PLAN")]
    assert runner.input_name == "image" and runner.output_names == ("semseg", "depth")
    with pytest.raises(UserError, match=r"takes \[1\.\.4, 3, 8, 8\]"):
        runner(torch.zeros(1, 3, 9, 9))
    with pytest.raises(UserError, match="does not fit"):
        runner(torch.zeros(5, 3, 8, 8))


def test_runner_needs_engine_and_meta(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        EngineRunner(tmp_path / "missing.engine")
    (tmp_path / "bare.engine").write_bytes(b"PLAN")
    with pytest.raises(UserError, match="no dymu metadata"):
        EngineRunner(tmp_path / "bare.engine")


# --- the real thing -----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.trt
def test_real_engine_matches_pytorch(tmp_path: Path) -> None:
    """Build a real engine from a 2-conv net and compare its outputs with PyTorch's."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)
    ).eval()
    onnx_path = tmp_path / "tiny.onnx"
    torch.onnx.export(
        net,
        (torch.randn(2, 3, 16, 16),),
        str(onnx_path),
        dynamo=False,
        opset_version=17,
        input_names=["image"],
        output_names=["out"],
        dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}},
    )
    cache = tmp_path / "timing.cache"
    meta = build_engine(
        onnx_path,
        tmp_path / "tiny.engine",
        precision="fp32",
        min_batch=1,
        opt_batch=2,
        max_batch=4,
        workspace_mib=256,
        timing_cache=cache,
    )
    assert meta.input_name == "image" and meta.output_names == ("out",)
    assert meta.max_shape == (4, 3, 16, 16) and cache.stat().st_size > 0
    runner = EngineRunner(tmp_path / "tiny.engine", precision="fp32")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 16, 16)
        got = runner(x)["out"]
        torch.cuda.current_stream().synchronize()
        with torch.no_grad():
            ref = net(x)
        # fp32 engines may use TF32 (TensorRT's default on Ampere and later): ~1e-3 error.
        torch.testing.assert_close(got.cpu(), ref, atol=1e-2, rtol=1e-2)
