"""Latency tables (dymu.compile.latency): fitting, refusal of mismatched tables, repair by
predicted latency, and `dymu profile` / `sample` / `export` with --latency-ms on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny import TINY

from dymu.cli.main import main
from dymu.compile import latency
from dymu.errors import UserError
from dymu.space.graph import build_space
from dymu.space.tree import TreeSpec

N, LAYERS = 3, 4


def _table(const: float, node_ms: np.ndarray, **info) -> latency.LatencyTable:
    reference = {"anchor_ms": 10.0, "cheapest_ms": 1.0, "cheapest_tree": "x"}
    return latency.LatencyTable(
        backend="onnxruntime",
        backend_version="onnxruntime 1.0",
        device="cpu: test (2 threads)",
        batch=8,
        input_size=(32, 32),
        precision="fp32",
        tasks=["a", "b", "c"],
        const_ms=const,
        node_ms=node_ms.tolist(),
        info={"reference": reference, **info},
    )


def _space():
    flops = [[30, 20, 10], [300, 200, 100], [3000, 2000, 1000], [4, 5, 6]]
    return build_space(["a", "b", "c"], flops, flops, [7, 8, 9], [7, 8, 9])


def test_fit_recovers_an_additive_latency_model():
    rng = np.random.default_rng(0)
    truth = rng.uniform(0.1, 2.0, size=(LAYERS - 1, N))  # [L-1, N] ms per node
    trees = [TreeSpec.no_sharing(N, LAYERS)] + [
        TreeSpec.random(N, LAYERS, rng).canonical() for _ in range(40)
    ]
    ms = [1.5 + float(latency.features(t) @ truth.ravel()) for t in trees]
    const, node = latency.fit(trees, ms)
    assert const == pytest.approx(1.5, abs=1e-6)
    table = _table(const, node)
    for t in trees:
        assert table.predict(t) == pytest.approx(1.5 + float(latency.features(t) @ truth.ravel()))


def test_features_mark_the_used_nodes_below_the_last_layer():
    tree = TreeSpec.all_sharing(N, LAYERS, trunk=1)
    assert latency.features(tree).tolist() == [0.0, 1.0, 0.0] * (LAYERS - 1)
    assert latency.features(TreeSpec.no_sharing(N, LAYERS)).sum() == N * (LAYERS - 1)


def test_a_table_round_trips_and_refuses_another_backend_device_batch_or_size(tmp_path):
    table = _table(1.0, np.ones((LAYERS - 1, N)), protocol={"warmup": 1, "rounds": 2, "reps": 3})
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(table.to_json()))
    back = latency.read_table(path)
    assert back.to_json() == table.to_json()
    ok = {"tasks": ["a", "b", "c"], "num_layers": LAYERS, "input_size": [32, 32]}
    back.check(**ok, backend="onnxruntime", device="cpu: test (2 threads)", batch=8)
    for bad, word in [
        ({"backend": "eager"}, "backend onnxruntime, not eager"),
        ({"device": "cpu: other (2 threads)"}, "device cpu: test"),
        ({"batch": 1}, "batch 8, not 1"),
        ({"input_size": [64, 64]}, "input size"),
        ({"tasks": ["a", "b", "d"]}, "tasks"),
    ]:
        with pytest.raises(UserError, match=word):
            back.check(**{**ok, **bad}, path=path)
    path.write_text(json.dumps({"schema_version": 1, "backend": "eager"}))
    with pytest.raises(UserError, match="not a dymu latency table"):
        latency.read_table(path)


@pytest.mark.parametrize("seed", range(3))
def test_latency_repair_never_exceeds_the_predicted_target(seed):
    rng = np.random.default_rng(seed)
    G = _space()
    table = _table(0.5, rng.uniform(0.0, 3.0, size=(LAYERS - 1, N)))
    table.info["reference"]["cheapest_ms"] = 0.0  # the floor is then the predicted one
    anchor_ms = table.predict(TreeSpec.no_sharing(N, LAYERS))
    fastest = latency.LatencyBudget(G, table, anchor_ms).fastest / 1e6
    for target in np.linspace(fastest, anchor_ms * 1.1, 12):
        budget = latency.LatencyBudget(G, table, float(target))
        for _ in range(10):
            alpha = rng.dirichlet([0.3] * N, size=(LAYERS - 1, N))  # [L-1, N, N]
            tree = budget.derive(alpha)
            assert table.predict(tree) <= target + 1e-6
        assert budget.flops_budget <= 1.0
    with pytest.raises(UserError, match="below the fastest tree"):
        latency.LatencyBudget(G, table, fastest * 0.9)


def test_faster_steps_down_to_the_fastest_tree():
    G = _space()
    table = _table(0.5, np.arange(1.0, 1.0 + (LAYERS - 1) * N).reshape(LAYERS - 1, N))
    table.info["reference"]["cheapest_ms"] = 0.0
    budget = latency.LatencyBudget(G, table, 100.0)
    tree, seen = TreeSpec.no_sharing(N, LAYERS), []
    while tree is not None:
        seen.append(table.predict(tree))
        tree = budget.faster(tree)
    assert seen == sorted(seen, reverse=True) and len(set(seen)) == len(seen)
    assert seen[-1] == pytest.approx(budget.fastest / 1e6)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latency")
    argv = ["search", "--run", str(tmp / "run"), *TINY, f"data.cache_dir={tmp / 'cache'}"]
    assert main(argv) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def table_file(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("table") / "latency.json"
    argv = ["profile", "--run", str(run), "--backend", "onnxruntime", "--batch", "2"]
    argv += ["--trees", "8", "--validate", "4", "--rounds", "2", "--reps", "3", "--warmup", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    return out


def test_profile_writes_a_validated_table(table_file):
    obj = json.loads(table_file.read_text())
    assert obj["backend"] == "onnxruntime" and obj["batch"] == 2
    assert obj["input_size"] == [32, 32] and obj["command"].startswith("dymu profile")
    assert obj["fit"]["trees"] == 8 + 1 + 3  # random trees, the anchor tree, 3 cheapest trees
    val = obj["validation"]
    assert val["trees"] == 4 and len(val["rows"]) == 4
    for row in val["rows"]:
        assert row["measured_ms"] > 0 and row["spread"] >= 0
        assert row["rel_err"] == pytest.approx(
            (row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"]
        )
    assert obj["reference"]["cheapest_ms"] <= obj["reference"]["anchor_ms"] * 1.5
    assert min(min(row) for row in obj["model"]["node_ms"]) >= 0


def test_sample_takes_a_latency_target(run, table_file, capsys):
    obj = json.loads(table_file.read_text())
    target = obj["reference"]["anchor_ms"] * 2  # everything fits
    argv = ["sample", "--run", str(run), "--preference", "0.5,0.3,0.2", "--json"]
    assert main([*argv, "--latency-ms", str(target), "--latency", str(table_file)]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["latency"]["predicted_ms"] <= target
    assert main([*argv, "--latency-ms", "0.000001", "--latency", str(table_file)]) == 2
    assert "below the fastest tree" in capsys.readouterr().err
    assert main([*argv, "--latency-ms", "5"]) == 2
    assert "needs --latency FILE" in capsys.readouterr().err


def test_export_refuses_a_table_measured_on_another_device(run, table_file, tmp_path, capsys):
    obj = json.loads(table_file.read_text())
    obj["device"] = "cpu: some other processor (64 threads)"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(obj))
    argv = ["export", "--run", str(run), "--latency-ms", "50", "--latency", str(other)]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "device cpu: some other processor" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_export_measures_and_records_the_latency_of_each_tree(run, table_file, tmp_path):
    obj = json.loads(table_file.read_text())
    target = obj["reference"]["anchor_ms"] * 3  # generous: this machine is shared
    argv = ["export", "--run", str(run), "--preference", "0.5,0.3,0.2", "--out"]
    argv += [str(tmp_path / "out"), "--latency-ms", str(target), "--latency", str(table_file)]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["latency"]["target_ms"] == target
    assert manifest["latency"]["table"]["backend"] == "onnxruntime"
    (tree,) = manifest["trees"]
    assert manifest["budget"] == tree["flops_fraction"]  # what its trees cost
    lat = tree["latency"]
    assert lat["measured_ms"] <= target and lat["predicted_ms"] <= target
    assert lat["repairs_after_measuring"] == 0
