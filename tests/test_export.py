"""dymu export on a tiny search run: the bundle, its manifest and checks, and bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from tiny import TINY

from dymu.cli.main import main
from dymu.compile.export import simplex_grid


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    argv = ["search", "--run", str(tmp / "run"), *TINY, f"data.cache_dir={tmp / 'cache'}"]
    assert main(argv) == 0
    return tmp / "run"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_simplex_grid():
    grid = simplex_grid(3, 2)
    assert grid.shape == (6, 3)  # C(4, 2)
    np.testing.assert_allclose(grid.sum(1), 1.0)
    assert {tuple(r) for r in simplex_grid(3, 1)} == {(1, 0, 0), (0, 1, 0), (0, 0, 1)}


def test_export_writes_a_checked_bundle(run, tmp_path, capsys):
    out = tmp_path / "E"
    assert (
        main(["export", "--run", str(run), "--budget", "1", "--grid", "2", "--out", str(out)]) == 0
    )
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"] == ["semseg", "depth", "normals"]
    served = [p for t in manifest["trees"] for p in t["preferences"]]
    assert len(served) == 6  # every grid preference is served by exactly one tree
    for tree in manifest["trees"]:
        assert tree["flops_counted"] == tree["flops"] <= manifest["anchor_flops"]
        assert tree["parity"]["overall"] < 1e-4
        assert set(tree["metrics"]) == set(manifest["tasks"])
        for name, digest in tree["files"].items():
            assert _sha(out / name) == digest
        golden = np.load(out / tree["hash"] / "golden_outputs.npz")
        assert sorted(golden.files) == sorted(manifest["tasks"])
    assert _sha(out / "golden_input.npy") == manifest["golden_input"]["sha256"]


def test_every_model_runs_what_the_search_evaluated_for_its_preference(run, tmp_path):
    """ONNX Runtime on each model equals TreeNet with the weight hypernet's adaptation for
    that model's preference (what the report evaluates), and two preferences of one tree
    give two different models."""
    import onnxruntime as ort
    import torch

    from dymu.search import load_run
    from dymu.space.tree import TreeSpec
    from dymu.space.treenet import TreeNet

    out = tmp_path / "E"
    argv = ["export", "--run", str(run), "--budget", "0.75", "--grid", "2", "--out", str(out)]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    trained = load_run(run)
    image = np.load(out / "golden_input.npy")  # [G, 3, H, W]
    outputs, by_tree = {}, {}
    for model in manifest["trees"]:
        r = torch.tensor(model["preferences"][0], dtype=torch.float32)
        tree = TreeSpec(model["parents"])
        assert tree.hash() == model["tree"]
        with torch.no_grad():
            offsets = trained.weights(r, model["budget"], tree)
            want = TreeNet(trained.streams, tree).eval()(torch.from_numpy(image), offsets)
        session = ort.InferenceSession(str(out / model["hash"] / "model.onnx"))
        ran = session.run(manifest["tasks"], {"image": image})
        got = dict(zip(manifest["tasks"], ran, strict=True))
        for task in manifest["tasks"]:
            np.testing.assert_allclose(got[task], want[task].numpy(), atol=1e-4, rtol=0)
        outputs[model["hash"]] = got
        by_tree.setdefault(model["tree"], []).append(model["hash"])
    assert len(manifest["trees"]) == 6  # one model per preference of the grid
    first, second = max(by_tree.values(), key=len)[:2]  # 6 preferences on fewer trees
    assert any(not np.array_equal(outputs[first][t], outputs[second][t]) for t in manifest["tasks"])


def test_a_tight_budget_keeps_every_tree_within_it(run, tmp_path):
    out = tmp_path / "E"
    code = main(["export", "--run", str(run), "--budget", "0.9", "--grid", "1", "--out", str(out)])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    for tree in manifest["trees"]:
        assert tree["flops_counted"] <= 0.9 * manifest["anchor_flops"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--budget", "0"], "--budget must be in (0, 1]"),
        (["--budget", "1.5"], "--budget must be in (0, 1]"),
        (["--budget", "0.01"], "below the cheapest tree"),
        (["--budget", "1", "--target", "tflite"], "unknown --target"),
        (["--budget", "1", "--target", "trt"], "TensorRT is not installed"),
        (["--budget", "1", "--preference", "0.5,0.5"], "needs 3 weights"),
    ],
)
def test_bad_input_fails_with_one_line_and_writes_nothing(run, tmp_path, capsys, extra, message):
    out = tmp_path / "E"
    code = main(["export", "--run", str(run), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_an_unwritable_or_used_out_is_refused(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, message in ((blocker / "E", "cannot write"), (blocker, "already exists")):
        code = main(["export", "--run", str(run), "--budget", "1", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and message in err, err
    assert blocker.read_text() == "x"
