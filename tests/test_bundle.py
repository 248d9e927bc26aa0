"""The deploy bundle's standalone runtime: files, isolation, verify, Controller, refusals.

The runtime must work on a device without dymu, so it is exercised both in an isolated
subprocess (``python -I``, cwd = bundle: ``import dymu`` impossible) and imported from the
bundle by path. TensorRT is absent here: only its refusal and metadata logic are tested.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from tiny import TINY, load_script

from dymu.cli.main import main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bundle")
    argv = ["search", "--run", str(tmp / "run"), *TINY, f"data.cache_dir={tmp / 'cache'}"]
    assert main(argv) == 0
    out = tmp / "E"
    argv = ["export", "--run", str(tmp / "run"), "--budget", "1", "--grid", "2", "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def rt(bundle):
    """The bundle's own dymu_runtime.py, imported by path (as a device would use it)."""
    return load_script(bundle / "dymu_runtime.py", "dymu_runtime_under_test")


BLOCK_DYMU = (
    "import runpy, sys; sys.modules['dymu'] = None; "  # `import dymu` now raises ImportError
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def _isolated(bundle, *args, env=None):
    """Run the bundle's runtime with ``-I`` from inside the bundle, with ``dymu`` blocked
    (and ``env`` added to the environment).

    ``-I`` drops PYTHONPATH, the user site and the cwd from sys.path, but an editable
    install of dymu lives in site-packages, so the import is also blocked outright.
    """
    return subprocess.run(
        [sys.executable, "-I", "-c", BLOCK_DYMU, "dymu_runtime.py", *args],
        cwd=bundle,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_bundle_holds_runtime_and_readme(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    for name, digest in manifest["runtime"]["files"].items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest
    readme = (bundle / "README.md").read_text()
    assert "{{" not in readme
    assert "--system-site-packages" in readme and "python3 dymu_runtime.py build ." in readme
    assert "verify . --backend tensorrt" in readme and "not yet been run on a device" in readme
    assert f"TensorRT {manifest['trt_version']}" in readme
    for tree in manifest["trees"]:
        assert tree["hash"] in readme


def test_runtime_source_does_not_import_dymu(bundle):
    tree = ast.parse((bundle / "dymu_runtime.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "dymu"]


def test_verify_onnxruntime_in_isolation(bundle):
    proc = _isolated(bundle, "verify", ".", "--backend", "onnxruntime")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert result["ok"] and set(result["max_error"]) == {t["hash"] for t in manifest["trees"]}
    assert max(result["max_error"].values()) < 1e-4
    proc = _isolated(bundle, "verify", ".", "--atol", "1e-12")  # golden mismatch: exit 1
    assert proc.returncode == 1 and "golden outputs differ" in proc.stderr


def test_controller_picks_reuses_and_matches_golden(bundle, rt):
    manifest = rt.load_manifest(bundle)
    ctl = rt.Controller(bundle, backend="onnxruntime")
    golden = np.load(bundle / "golden_input.npy")
    for tree in manifest["trees"]:
        for pref in tree["preferences"]:
            assert ctl.set(pref, manifest["budget"])["hash"] == tree["hash"]
        assert ctl.last_switch_seconds >= 0
        outs = ctl(golden)
        ref = np.load(bundle / tree["hash"] / "golden_outputs.npz")
        assert list(outs) == manifest["tasks"]
        for task in manifest["tasks"]:
            np.testing.assert_allclose(outs[task], ref[task], atol=1e-4, rtol=0)
    first = manifest["trees"][0]
    session = ctl._models[first["hash"]]
    ctl.set(first["preferences"][0], manifest["budget"])
    assert ctl._models[first["hash"]] is session  # cached, not reloaded
    assert len(ctl.loaded) == len(manifest["trees"])
    # an off-grid preference goes to the nearest grid point's tree
    p = np.asarray(first["preferences"][0]) * 0.98 + 0.02 / len(manifest["tasks"])
    assert ctl.set(p, 1.0)["hash"] == first["hash"]


@pytest.mark.parametrize(
    ("preference", "budget", "message"),
    [
        ([0.5, 0.5], 1.0, "must have 3 weights"),
        ([0.5, 0.6, -0.1], 1.0, ">= 0"),
        ([0.5, float("nan"), 0.5], 1.0, "finite"),
        ([0.5, 0.5, 0.5], 1.0, "sum to 1"),
        ([1, 0, 0], 0.5, "below this bundle's budget"),
        ([1, 0, 0], float("inf"), "budget must be finite"),
        ([1, 0, 0], "lots", "budget must be a number"),
    ],
)
def test_bad_preference_or_budget_raises(bundle, rt, preference, budget, message):
    ctl = rt.Controller(bundle, backend="onnxruntime")
    with pytest.raises(ValueError, match=message):
        ctl.set(preference, budget)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
@pytest.mark.parametrize(
    "args",
    [("build", "."), ("verify", ".", "--backend", "tensorrt")],
)
def test_tensorrt_path_refuses_cleanly_without_it(bundle, args):
    proc = _isolated(bundle, *args)
    assert proc.returncode == 2
    assert "TensorRT is not installed" in proc.stderr
    assert "--system-site-packages" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(bundle.glob("*/model.engine"))


def _meta(**kw):
    meta = {
        "trt_version": "8.5.2.2",
        "gpu_name": "Orin",
        "compute_capability": "8.7",
        "precision": "fp32",
        "input_name": "image",
        "onnx_sha256": "abc",
    }
    return {**meta, **kw}


def test_engine_metadata_mismatch_is_refused(rt, tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    rt.meta_path(engine).write_text(json.dumps(_meta()))
    meta = rt.read_engine_meta(engine)
    here = {"trt_version": "8.5.2.1", "gpu_name": "Orin", "compute_capability": "8.7"}
    rt.check_engine_meta(meta, here, precision="fp32", onnx_sha256="abc")  # build field ignored
    cases = [
        ({**here, "trt_version": "10.3.0"}, {}, "TensorRT 8.5.2 vs 10.3.0"),
        ({**here, "compute_capability": "7.2", "gpu_name": "Xavier"}, {}, "capability 8.7"),
        (here, {"precision": "fp16"}, "precision fp32 vs fp16"),
        (here, {"onnx_sha256": "def"}, "another model.onnx"),
    ]
    for device, kw, message in cases:
        with pytest.raises(rt.BundleError, match=message):
            rt.check_engine_meta(meta, device, **kw)
    with pytest.warns(UserWarning, match="built on Orin"):
        rt.check_engine_meta(meta, {**here, "gpu_name": "Orin NX"})
    rt.meta_path(engine).write_text(json.dumps({"trt_version": "8.5"}))
    with pytest.raises(rt.BundleError, match="lacks"):
        rt.read_engine_meta(engine)
    rt.meta_path(engine).unlink()
    with pytest.raises(rt.BundleError, match="not found"):
        rt.read_engine_meta(engine)


def test_trt_api_families_and_profiles(rt):
    assert rt.trt_api("8.5.2.2") == "v8" and rt.trt_api("8.6.2") == "v8"
    assert rt.trt_api("10.3.0") == "v10" and rt.trt_api("11.4.1") == "v11"
    for bad in ("8.4.3", "9.0", "12.0"):
        with pytest.raises(rt.BundleError, match="not supported"):
            rt.trt_api(bad)
    one, eight = (1, 3, 32, 32), (8, 3, 32, 32)
    assert rt._profile_shapes([-1, 3, 32, 32], 8) == (one, one, eight)
    assert rt._profile_shapes([1, 3, 32, 32], 8)[2] == (1, 3, 32, 32)


def test_profile_on_the_device_and_latency_targets(bundle, rt, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    proc = _isolated(
        copy, "profile", ".", "--backend", "onnxruntime", "--rounds", "2", "--reps", "2"
    )
    assert proc.returncode == 0, proc.stderr
    table = json.loads((copy / "latency.json").read_text())
    manifest = rt.load_manifest(copy)
    assert sorted(table["trees"]) == sorted(t["hash"] for t in manifest["trees"])
    assert table["backend"] == "onnxruntime" and table["batch"] == 1
    assert all(v["ms"] > 0 and v["spread"] >= 0 for v in table["trees"].values())
    ctl = rt.Controller(copy, backend="onnxruntime")
    pref = manifest["trees"][0]["preferences"][0]
    slowest = max(v["ms"] for v in table["trees"].values())
    assert ctl.set(pref, latency_ms=slowest)["hash"] == manifest["trees"][0]["hash"]
    # only the fastest tree fits a target at its latency: every preference gets it
    fastest = min(table["trees"], key=lambda h: table["trees"][h]["ms"])
    for tree in manifest["trees"]:
        target = table["trees"][fastest]["ms"]
        assert ctl.set(tree["preferences"][0], latency_ms=target)["hash"] == fastest
    with pytest.raises(ValueError, match="fastest tree of this bundle measured"):
        ctl.set(pref, latency_ms=table["trees"][fastest]["ms"] / 2)
    table["device"] = "another device"
    (copy / "latency.json").write_text(json.dumps(table))
    with pytest.raises(rt.BundleError, match=r"device another device, not cpu: .* run '"):
        ctl.set(pref, latency_ms=slowest)


def test_runtime_names_the_cpu_as_dymu_tables_do(bundle, rt, tmp_path, monkeypatch):
    # dymu's tables name a CPU with the threads it ran on; a runtime table without them
    # would pass for a measurement made with any other thread count.
    from dymu.compile import latency

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    args = ("profile", ".", "--backend", "onnxruntime", "--rounds", "1", "--reps", "1")
    proc = _isolated(copy, *args, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    table = json.loads((copy / "latency.json").read_text())
    assert table["device"] == f"cpu: {latency.cpu_model()} (1 threads)"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    ctl = rt.Controller(copy, backend="onnxruntime")
    assert ctl.identity()["device"] == f"cpu: {latency.cpu_model()} (3 threads)"
    (session,) = [m.session for m in ctl._models.values()]
    assert session.get_session_options().intra_op_num_threads == 3  # the threads named


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_runtime_names_the_provider_its_sessions_use(bundle, rt, tmp_path, monkeypatch):
    # CUDA listed but unusable: ONNX Runtime runs the session on the CPU, and the table
    # must say so, not name the first provider on the list.
    import onnxruntime as ort

    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: wanted)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    table = rt.profile(copy, "onnxruntime", warmup=0, rounds=1, reps=1)
    assert table["provider"] == "CPUExecutionProvider" and table["device"].startswith("cpu: ")
    ctl = rt.Controller(copy, backend="onnxruntime")
    ctl.set(rt.load_manifest(copy)["trees"][0]["preferences"][0])
    (session,) = [m.session for m in ctl._models.values()]
    assert ctl.identity()["provider"] == session.get_providers()[0] == table["provider"]


def test_a_latency_table_of_another_batch_is_refused(bundle, rt, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    table = rt.profile(copy, "onnxruntime", batch=2, warmup=0, rounds=1, reps=1)
    slowest = max(v["ms"] for v in table["trees"].values())
    pref = rt.load_manifest(copy)["trees"][0]["preferences"][0]
    ctl = rt.Controller(copy, backend="onnxruntime")
    with pytest.raises(rt.BundleError, match="measured for batch 2, not 1; run '") as e:
        ctl.set(pref, latency_ms=slowest)  # batch 1, the default
    assert "profile . --backend onnxruntime --batch 1'" in str(e.value)
    assert "\n" not in str(e.value)
    assert ctl.set(pref, latency_ms=slowest, batch=2)["hash"] in table["trees"]
