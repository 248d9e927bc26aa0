"""The tree space: graph shape, costs, JSON round trip, and exact FLOPs bounds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dymu.errors import UserError
from dymu.space import (
    SCHEMA_VERSION,
    TreeSpec,
    anchor_flops,
    anchor_params,
    build_space,
    costs,
    enumerate_trees,
    load_space,
    max_flops,
    min_flops,
    save_space,
    space_flops,
)

TASKS = ["semseg", "depth", "normals"]
FLOPS = [[10, 20, 30], [1, 2, 3], [100, 200, 300], [7, 8, 9]]  # [L=4][N=3]
PARAMS = [[5, 6, 7], [1, 1, 1], [2, 2, 2], [3, 4, 5]]
HEAD_FLOPS = [1000, 2000, 3000]
HEAD_PARAMS = [11, 12, 13]


def small_space():
    return build_space(TASKS, FLOPS, PARAMS, HEAD_FLOPS, HEAD_PARAMS)


def random_space(rng: np.random.Generator, n: int, num_layers: int):
    tasks = [f"t{j}" for j in range(n)]
    flops = rng.integers(0, 1000, size=(num_layers, n))
    params = rng.integers(0, 50, size=(num_layers, n))
    return build_space(tasks, flops, params, rng.integers(0, 100, n), rng.integers(0, 9, n))


def test_space_nodes_edges_and_attributes():
    G = small_space()
    n, num_layers = 3, 4
    assert G.number_of_nodes() == 1 + n * num_layers + n  # image, nodes, heads
    assert G.number_of_edges() == n + (num_layers - 1) * n * n + n
    assert G.graph == {"schema_version": SCHEMA_VERSION, "tasks": TASKS, "num_layers": 4}
    assert G.nodes[(2, 1)] == {
        "kind": "node",
        "layer": 2,
        "stream": 1,
        "task": "depth",
        "flops": 200,
        "params": 2,
    }
    assert G.nodes[("head", "normals")] == {
        "kind": "head",
        "stream": 2,
        "task": "normals",
        "flops": 3000,
        "params": 13,
    }
    assert sorted(G.successors("image")) == [(0, 0), (0, 1), (0, 2)]
    assert sorted(G.predecessors((3, 1))) == [(2, 0), (2, 1), (2, 2)]  # every candidate parent
    assert list(G.successors((3, 2))) == [("head", "normals")]
    assert G.in_degree((0, 1)) == 1


def test_costs_round_trip_and_anchor():
    G = small_space()
    assert costs(G) == (FLOPS, PARAMS, HEAD_FLOPS, HEAD_PARAMS)
    assert anchor_flops(G) == 60 + 6 + 600 + 24 + 6000
    assert anchor_params(G) == 18 + 3 + 6 + 12 + 36
    # numpy inputs become plain ints (JSON-safe)
    H = build_space(TASKS, np.array(FLOPS), np.array(PARAMS), np.array(HEAD_FLOPS), HEAD_PARAMS)
    assert type(H.nodes[(0, 0)]["flops"]) is int
    assert costs(H) == costs(G)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tasks": ["a", "a", "b"]}, "distinct"),
        ({"tasks": []}, "at least one task"),
        ({"node_flops": FLOPS[:1], "node_params": PARAMS[:1]}, "at least 2 layers"),
        ({"node_flops": [[1, 2], [3, 4], [5, 6], [7, 8]]}, r"node_flops must be \[4 layers\]"),
        ({"node_params": [[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, -3]]}, "non-negative"),
        ({"node_flops": [[1, 2, 3], [1, 2, 3], [1, 2, 3.5], [1, 2, 3]]}, "integer"),
        ({"head_flops": [1, 2]}, "one entry per task"),
        ({"head_params": [1, True, 3]}, "integer"),
    ],
)
def test_build_space_rejects_bad_input(kwargs, message):
    args = {
        "tasks": TASKS,
        "node_flops": FLOPS,
        "node_params": PARAMS,
        "head_flops": HEAD_FLOPS,
        "head_params": HEAD_PARAMS,
    }
    with pytest.raises(UserError, match=message):
        build_space(**{**args, **kwargs})


def test_save_load_round_trip(tmp_path):
    G = small_space()
    path = save_space(G, tmp_path / "run" / "space.json")
    assert path == tmp_path / "run" / "space.json"
    assert [p.name for p in path.parent.iterdir()] == ["space.json"]  # no temp files left
    H = load_space(path)
    assert H.graph == G.graph
    assert dict(H.nodes(data=True)) == dict(G.nodes(data=True))
    assert set(H.edges) == set(G.edges)
    assert all(isinstance(node, (tuple, str)) for node in H.nodes)
    assert ("head", "depth") in H and (3, 2) in H
    data = json.loads(path.read_text())
    assert "edges" in data and "links" not in data


def _rewrite(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_load_space_schema_mismatch_names_the_file(tmp_path):
    path = save_space(small_space(), tmp_path / "space.json")
    _rewrite(path, lambda d: d["graph"].update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(UserError, match=r"space\.json has schema version 2"):
        load_space(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d["edges"].pop(), "not a space"),
        (lambda d: d["nodes"][3].update(flops=-1), "malformed"),
        (lambda d: d["nodes"][3].update(layer=7), "wrong attributes"),
        (lambda d: d["graph"].pop("tasks"), "malformed"),
        (lambda d: d.pop("nodes"), "malformed"),
    ],
)
def test_load_space_rejects_edited_files(tmp_path, edit, message):
    path = save_space(small_space(), tmp_path / "space.json")
    _rewrite(path, edit)
    with pytest.raises(UserError, match=message) as info:
        load_space(path)
    assert str(path) in str(info.value)


def test_load_space_missing_or_not_json(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_space(tmp_path / "nope.json")
    bad = tmp_path / "space.json"
    bad.write_text("{ not json")
    with pytest.raises(UserError, match="not readable JSON"):
        load_space(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="no 'graph' section"):
        load_space(bad)


def test_flops_bounds_by_hand():
    G = small_space()
    heads = sum(HEAD_FLOPS)
    # cheapest: one node per layer below the last (10, 1, 100), all of the last layer (24)
    assert min_flops(G) == 10 + 1 + 100 + 24 + heads
    assert max_flops(G) == anchor_flops(G) == TreeSpec.no_sharing(3, 4).flops(G)
    assert space_flops(G) == {"anchor": anchor_flops(G), "min": min_flops(G), "max": max_flops(G)}
    assert TreeSpec.cheapest(G).flops(G) == min_flops(G)


def test_cheapest_chain_switches_streams():
    # stream 0 is cheap at layer 0, stream 1 at layer 1: the best chain crosses streams
    G = build_space(["a", "b"], [[1, 10], [10, 1], [5, 5]], [[0] * 2] * 3, [0, 0], [0, 0])
    assert min_flops(G) == 1 + 1 + 10
    tree = TreeSpec.cheapest(G)
    assert tree.parents == ((0, 0), (1, 1))  # (1, 1) reads (0, 0); both last nodes read (1, 1)
    assert tree.flops(G) == 12
    assert min(t.flops(G) for t in enumerate_trees(2, 3)) == 12
    # no single-stream trunk reaches the minimum
    assert min(TreeSpec.all_sharing(2, 3, trunk=k).flops(G) for k in range(2)) == 21


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("num_layers", [2, 3])
def test_min_and_max_flops_equal_brute_force(n, num_layers):
    rng = np.random.default_rng(100 * n + num_layers)
    for _ in range(3):
        G = random_space(rng, n, num_layers)
        all_flops = [t.flops(G) for t in enumerate_trees(n, num_layers)]
        assert min_flops(G) == min(all_flops)
        assert max_flops(G) == max(all_flops)
        assert TreeSpec.cheapest(G).flops(G) == min(all_flops)
