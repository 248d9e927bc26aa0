"""AOTInductor packages: ``dymu export --target aoti`` compiles a checked ``model.pt2`` per
tree, the package matches PyTorch and the golden outputs, ``dymu bench`` picks it up, and
bad input (no compiler, no package, wrong device) is one line before any work.

Compiling is what costs time (about a minute on one CPU thread), so the whole file compiles
exactly once: the module fixture exports the cheapest tree of a tiny search run through the
CLI, and every CPU test reads that bundle or needs no compile at all.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny import TINY, randomise_batchnorms
from torch import nn

from dymu.cli.main import main
from dymu.compile import aoti
from dymu.compile.aoti import (
    CudaGraphRunner,
    aoti_parity,
    compile_aoti,
    find_compiler,
    load_aoti,
    package_info,
)
from dymu.compile.bench import available_backends
from dymu.compile.export import TARGETS, check_target
from dymu.compile.materialize import materialize
from dymu.errors import RuntimeFailure, UserError
from dymu.search import load_run
from dymu.space.graph import anchor_flops, load_space, min_flops
from dymu.space.tree import TreeSpec

PREFERENCE = "0.4,0.3,0.3"
TOL = 1e-4  # the export's PARITY_ATOL; DEPLOY.md-style fp32 parity is ~1e-7

needs_compiler = pytest.mark.skipif(
    find_compiler() is None, reason="AOTInductor needs a C++ compiler; none found"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny run and its cheapest tree exported with ``--target aoti`` (the one compile)."""
    if find_compiler() is None:
        pytest.skip("AOTInductor needs a C++ compiler; none found")
    tmp = tmp_path_factory.mktemp("aoti")
    run, bundle = tmp / "run", tmp / "E"
    with pytest.MonkeyPatch.context() as mp:
        # Inductor's build cache goes to a throw-away folder, not the user's temp cache.
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp / "inductor"))
        assert main(["search", "--run", str(run), *TINY, f"data.cache_dir={tmp / 'cache'}"]) == 0
        space = load_space(run / "space.json")
        # The cheapest tree (most sharing) compiles fastest; round up to stay feasible.
        budget = math.ceil(min_flops(space) / anchor_flops(space) * 1e6) / 1e6
        argv = ["export", "--run", str(run), "--budget", str(budget), "--preference", PREFERENCE]
        printed = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            code = main([*argv, "--target", "aoti", "--out", str(bundle)])
        seconds = time.perf_counter() - start
    assert code == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    return SimpleNamespace(
        run=run, bundle=bundle, manifest=manifest, printed=printed.getvalue(), seconds=seconds
    )


def _net(run, entry) -> nn.Module:
    """The tree of a manifest entry, materialized again from the run (as ``dymu bench``)."""
    trained = load_run(run)
    r = torch.tensor(entry["weights_at"], dtype=torch.float32)
    with torch.no_grad():
        offsets = trained.weights(r, entry["budget"])
        return materialize(trained.anchor, TreeSpec(entry["parents"]), offsets)


def test_export_records_a_checked_package(exported):
    manifest = exported.manifest
    assert manifest["target"] == "aoti"
    (entry,) = manifest["trees"]
    record = entry["aoti"]
    assert record["file"] == f"{entry['hash']}/model.pt2"
    assert record["device"] == "cpu" and record["device_name"].startswith("cpu")
    assert record["torch_version"] == torch.__version__
    assert record["input_shape"] == [1, 3, 32, 32]
    assert record["dynamic_batch"] is True and record["max_batch"] == aoti.MAX_BATCH
    assert record["output_names"] == manifest["tasks"]
    assert record["cpu_threads"] == torch.get_num_threads() == 1  # conftest: one thread
    assert 0 < record["compile_s"] < exported.seconds
    assert record["parity"]["batch_sizes"] == [1, 2, 3]
    assert record["parity"]["overall"] < TOL and record["parity"]["allclose"]
    package = exported.bundle / record["file"]
    digest = hashlib.sha256(package.read_bytes()).hexdigest()
    assert entry["files"][record["file"]] == record["sha256"] == digest
    assert record["size_bytes"] == package.stat().st_size
    assert "AOTInductor cpu" in exported.printed and "parity" in exported.printed
    print(f"export with one AOTInductor compile: {exported.seconds:.1f} s")


def test_package_matches_pytorch_and_the_golden_outputs(exported):
    (entry,) = exported.manifest["trees"]
    package = exported.bundle / entry["aoti"]["file"]
    net = _net(exported.run, entry)
    parity = aoti_parity(net, package, batch_sizes=(1, 3))
    assert parity["batch_sizes"] == [1, 3]
    assert set(parity["per_task"]) == set(exported.manifest["tasks"])
    assert parity["overall"] < TOL
    # Independently of aoti_parity: the package on the bundle's golden input (batch 4).
    model = load_aoti(package, "cpu")
    golden = np.load(exported.bundle / "golden_input.npy")
    want = np.load(exported.bundle / entry["hash"] / "golden_outputs.npz")
    with torch.no_grad():
        got = model(torch.from_numpy(golden))
    for task in exported.manifest["tasks"]:
        np.testing.assert_allclose(got[task].numpy(), want[task], atol=TOL, rtol=0)
    assert package_info(model) == {
        "input_shape": (1, 3, 32, 32),
        "dynamic_batch": True,
        "max_batch": aoti.MAX_BATCH,
        "output_names": exported.manifest["tasks"],
    }


def test_package_refuses_batches_and_devices_it_was_not_built_for(exported, tmp_path):
    (entry,) = exported.manifest["trees"]
    package = exported.bundle / entry["aoti"]["file"]
    net = _net(exported.run, entry)
    with pytest.raises(UserError, match=r"outside the package's 1\.\.64"):
        aoti_parity(net, package, batch_sizes=(1, 65))
    with pytest.raises(UserError, match="no AOTInductor package"):
        load_aoti(tmp_path / "model.pt2")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeFailure, match="needs a CUDA device"):
            load_aoti(package, "cuda")


def test_bench_picks_the_aoti_backend_for_an_aoti_bundle(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the measuring child: one thread, as tests
    manifest = exported.manifest
    found = available_backends(False, manifest)
    assert found[0] == "onnxruntime" and found[-1] == "aoti"
    assert "aoti" not in available_backends(True, {**manifest, "target": "onnx"})
    out = tmp_path / "bench.json"
    argv = ["bench", "--bundle", str(exported.bundle), "--out", str(out), "--iters", "4"]
    argv += ["--backend", "aoti"]  # eager needs no package; onnxruntime is tested elsewhere
    assert main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["backend"] == "aoti" and row["device"] == "cpu"
    assert row["tree"] == manifest["trees"][0]["hash"]
    assert 0 < row["latency_ms_p50"] <= row["latency_ms_p90"] and row["throughput_img_s"] > 0


@needs_compiler
def test_check_target_accepts_aoti_and_still_refuses_unknown_targets():
    assert "aoti" in TARGETS
    check_target("aoti")  # a C++ compiler is present: nothing to refuse
    with pytest.raises(UserError, match=r"'tflite'; choose one of onnx, trt, aoti"):
        check_target("tflite")


def test_export_aoti_without_a_compiler_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", ("no-such-c++-dymu",))
    assert find_compiler() is None
    out = tmp_path / "E"
    argv = ["export", "--run", str(tmp_path / "run"), "--budget", "1", "--target", "aoti"]
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--target aoti" in err and "no-such-c++-dymu" in err and "install g++" in err
    assert not out.exists()


def _fake_bundle(folder, *, target: str, device: str | None, with_file: bool):
    """A manifest with one tree and, optionally, an (empty) package file: nothing compiled."""
    entry = {"hash": "0123456789ab", "flops_counted": 1, "flops_fraction": 1.0, "budget": 1.0}
    if device is not None:
        entry["aoti"] = {"file": "0123456789ab/model.pt2", "device": device}
    folder.mkdir()
    if with_file:
        (folder / "0123456789ab").mkdir()
        (folder / "0123456789ab" / "model.pt2").write_bytes(b"")
    manifest = {"target": target, "input": {"shape": [1, 3, 32, 32]}, "trees": [entry]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    ("target", "device", "with_file", "backend", "message"),
    [
        ("onnx", None, False, "aoti", "has no AOTInductor package for tree 0123456789ab"),
        ("aoti", "cpu", False, "aoti", "has no AOTInductor package for tree 0123456789ab"),
        ("aoti", "cpu", True, "aoti_cudagraph", "needs packages compiled for cuda"),
    ],
)
def test_bench_refuses_a_bundle_it_cannot_run(
    tmp_path, capsys, target, device, with_file, backend, message
):
    bundle = _fake_bundle(tmp_path / "B", target=target, device=device, with_file=with_file)
    out = tmp_path / "bench.json"
    argv = ["bench", "--bundle", str(bundle), "--backend", backend, "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_bench_refuses_a_cuda_package_without_a_gpu(tmp_path, capsys):
    bundle = _fake_bundle(tmp_path / "B", target="aoti", device="cuda", with_file=True)
    assert available_backends(False, json.loads((bundle / "manifest.json").read_text())) == [
        "onnxruntime"
    ]
    argv = ["bench", "--bundle", str(bundle), "--backend", "aoti"]
    assert main([*argv, "--out", str(tmp_path / "b.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, image):
        return {"a": self.bn(self.conv(image))}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"device": "tpu"}, UserError, "unknown AOTInductor device 'tpu'"),
        ({"input_shape": (3, 32, 32)}, UserError, "input_shape must be 4 positive ints"),
        ({"path": "model.onnx"}, UserError, "must be a .pt2 file"),
        ({"train": True}, UserError, "needs an eval-mode module"),
    ],
)
def test_compile_aoti_refuses_bad_input_before_compiling(tmp_path, kwargs, error, message):
    net = _Tiny().train(kwargs.pop("train", False))
    args = {"input_shape": (1, 3, 8, 8), "device": "cpu", **kwargs}
    path = tmp_path / args.pop("path", "model.pt2")
    with pytest.raises(error, match=message):
        compile_aoti(net, path, **args)
    assert not any(tmp_path.iterdir())


@pytest.mark.gpu
def test_cuda_package_matches_pytorch_and_replays_from_cuda_graphs(tmp_path, monkeypatch):
    """The same checks on a CUDA GPU: parity on batch 1 and 3, then CUDA-graph replay."""
    from dymu.config import ModelConfig
    from dymu.models.anchor import build_anchor
    from dymu.tasks import TaskSpec

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    specs = [TaskSpec("semseg", "semseg", 5), TaskSpec("depth", "depth")]
    anchor = build_anchor(ModelConfig(width=4), specs, seed=0)
    randomise_batchnorms(anchor, seed=0)
    net = materialize(anchor.eval(), TreeSpec.all_sharing(2, anchor.num_layers, trunk=1))
    result = compile_aoti(net, tmp_path / "model.pt2", input_shape=(1, 3, 32, 32), device="cuda")
    assert result.device == "cuda" and result.device_name == torch.cuda.get_device_name()
    assert result.cpu_threads is None
    parity = aoti_parity(net, result.path, batch_sizes=(1, 3), device="cuda")
    assert parity["batch_sizes"] == [1, 3] and parity["overall"] < TOL

    plain = load_aoti(result.path, "cuda")
    graphed = CudaGraphRunner(load_aoti(result.path, "cuda", single_threaded=True))
    with torch.no_grad():
        for b in (1, 3, 1):  # the second batch-1 call replays the first graph
            x = torch.rand(b, 3, 32, 32, device="cuda")
            want = {k: v.clone() for k, v in plain(x).items()}
            got = graphed(x)
            for task in want:
                torch.testing.assert_close(got[task], want[task], atol=1e-6, rtol=0)
    assert len(graphed._graphs) == 2
