"""Latency tables of a slimmable space (dymu.compile.latency.WidthModel): the width terms
price configurations as the space prices their FLOPs, a fit recovers a model of that form,
full-width trees keep the tree table's form, and `dymu profile` on a run with widths
measures and checks configurations with widths."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from test_derive_widths import WIDTHS, _space
from test_latency import _table
from tiny import TINY

from dymu.cli.main import main
from dymu.compile import latency
from dymu.space.graph import space_shape, width_costs
from dymu.space.tree import TreeSpec


def _config(rng, G) -> TreeSpec:
    n, num_layers = space_shape(G)
    tree = TreeSpec.random(n, num_layers, rng)
    at = rng.choice(np.asarray(WIDTHS), size=(num_layers, n)).tolist()  # [L][N]
    return TreeSpec(tree.parents, at).canonical()


def _truth(rng, n: int, num_layers: int) -> np.ndarray:
    """[(L-1)N + LN + N] a known model's coefficients: t below the last layer, s of every
    node, h of every head (:meth:`WidthModel.features`' order)."""
    return rng.uniform(0.1, 2.0, size=(2 * num_layers - 1) * n + n)


def test_the_width_terms_weigh_each_node_as_the_space_prices_its_flops():
    """Features x full-width FLOPs = the configuration's FLOPs, node by node and head by
    head: the fractions are the space's own width costs."""
    G = _space()
    n, num_layers = space_shape(G)
    model = latency.WidthModel.of_space(G)
    wc = width_costs(G)
    full_nodes = [cell[-1][-1] for row in wc.node_flops for cell in row]  # [L*N] layer-major
    full_heads = [cell[-1][-1] for cell in wc.head_flops]  # [N]
    rng = np.random.default_rng(0)
    for _ in range(30):
        config = _config(rng, G)
        x = model.features(config)[(num_layers - 1) * n :]  # [LN + N] the fractions
        priced = float(x[: n * num_layers] @ np.asarray(full_nodes, dtype=np.float64))
        priced += float(x[n * num_layers :] @ np.asarray(full_heads, dtype=np.float64))
        assert priced == pytest.approx(config.flops(G), rel=1e-12)


def test_fit_recovers_a_width_model_and_the_table_round_trips(tmp_path):
    G = _space()
    n, num_layers = space_shape(G)
    model = latency.WidthModel.of_space(G)
    rng = np.random.default_rng(1)
    truth = _truth(rng, n, num_layers)
    configs = [_config(rng, G) for _ in range(120)]
    ms = [0.7 + float(model.features(c) @ truth) for c in configs]
    const, node, fitted = latency.fit_widths(configs, ms, model)
    assert const == pytest.approx(0.7, abs=1e-6)
    table = dataclasses.replace(_table(const, node), widths=fitted)
    assert table.num_layers == num_layers
    path = tmp_path / "latency.json"
    path.write_text(json.dumps(table.to_json()))
    back = latency.read_table(path)
    assert back.widths is not None and back.num_layers == num_layers
    for c in [_config(rng, G) for _ in range(20)]:
        assert back.predict(c) == pytest.approx(0.7 + float(model.features(c) @ truth), rel=1e-6)


def test_full_width_trees_keep_the_tree_tables_form():
    """Latency targets derive full-width trees on the plain form (:func:`latency_space`):
    with widths, it must predict a full-width tree as the width model does."""
    G = _space()
    n, num_layers = space_shape(G)
    rng = np.random.default_rng(2)
    truth = _truth(rng, n, num_layers)
    model = latency.WidthModel.of_space(G)
    fixed, scaled = (num_layers - 1) * n, (2 * num_layers - 1) * n
    fitted = latency.WidthModel(
        model.widths,
        model.node_frac,
        model.head_frac,
        model.low_layers,
        truth[fixed:scaled].reshape(num_layers, n).tolist(),
        truth[scaled:].tolist(),
    )
    table = latency.LatencyTable(
        "onnxruntime", "1", "cpu", 8, (32, 32), "fp32", list(G.graph["tasks"]), 0.3,
        truth[:fixed].reshape(num_layers - 1, n).tolist(), {}, fitted,
    )  # fmt: skip
    const, node_ms = table.full_width_ms()
    plain = latency.LatencyTable(
        "onnxruntime", "1", "cpu", 8, (32, 32), "fp32", list(G.graph["tasks"]), const,
        node_ms, {},
    )  # fmt: skip
    lat = latency.latency_space(G, table)
    for _ in range(20):
        tree = TreeSpec.random(n, num_layers, rng).canonical()
        assert plain.predict(tree) == pytest.approx(table.predict(tree), rel=1e-12)
        assert tree.flops(lat) / 1e6 == pytest.approx(table.predict(tree), abs=1e-5)


def test_a_tree_table_refuses_to_price_widths():
    G = _space()
    n, num_layers = space_shape(G)
    table = latency.LatencyTable(
        "onnxruntime", "1", "cpu", 8, (32, 32), "fp32", list(G.graph["tasks"]), 1.0,
        np.ones((num_layers - 1, n)).tolist(), {},
    )  # fmt: skip
    with pytest.raises(latency.UserError, match="full-width trees only"):
        table.predict(_config(np.random.default_rng(3), G))


@pytest.fixture(scope="module")
def width_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("latency_widths")
    argv = ["search", "--run", str(tmp / "run"), *TINY, f"data.cache_dir={tmp / 'cache'}"]
    argv += ["model.widths=[0.5,1.0]", "slim.steps=2", "evaluate.budgets=[0.75,1.0]"]
    assert main(argv) == 0
    return tmp / "run"


def test_profile_of_a_run_with_widths_measures_configurations(width_run, tmp_path, capsys):
    out = tmp_path / "latency.json"
    argv = ["profile", "--run", str(width_run), "--backend", "onnxruntime", "--batch", "2"]
    argv += ["--trees", "8", "--validate", "4", "--rounds", "2", "--reps", "2", "--warmup", "1"]
    assert main([*argv, "--out", str(out)]) == 0
    assert "fastest configuration measured" in capsys.readouterr().out
    obj = json.loads(out.read_text())
    assert obj["model"]["widths"]["widths"] == [0.5, 1.0]
    assert obj["fit"]["by_kind"]["reference"]["trees"] == 2 * 4  # anchor, 3 trunks, narrowest
    assert obj["reference"]["narrowest_ms"] > 0
    rows = [r for kind in latency.KINDS for r in obj["validation"]["by_kind"][kind]["rows"]]
    assert len(rows) == 4
    table = latency.read_table(out)
    assert table.widths is not None
    for row in rows:  # every checked row's prediction is the table's
        assert row["predicted_ms"] > 0 and row["measured_ms"] > 0
    n, num_layers = 3, table.num_layers
    narrow = TreeSpec(TreeSpec.no_sharing(n, num_layers).parents, [[0.5] * n] * num_layers)
    assert table.predict(narrow) <= table.predict(TreeSpec.no_sharing(n, num_layers)) + 1e-9


def test_a_slimmable_space_is_profiled_on_configurations_with_widths():
    refs, calib, valid = latency.profile_trees(3, 7, 20, 10, seed=0, widths=(0.5, 1.0))
    assert sum(name.endswith("@narrowest") for name in refs) == 4
    drawn = [t for group in (calib, valid) for ts in group.values() for t in ts]
    assert len(drawn) == 30 and sum(t.widths is not None for t in drawn) >= 25
    _, plain, _ = latency.profile_trees(3, 7, 20, 10, seed=0)
    assert all(t.widths is None for ts in plain.values() for t in ts)
