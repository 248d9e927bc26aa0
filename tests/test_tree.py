"""TreeSpec: pruning, canonical form and hash, JSON, paths, FLOPs, and rendering."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from dymu.errors import UserError
from dymu.space import TreeSpec, build_space, enumerate_trees, tree_png, tree_text

TASKS = ["semseg", "depth", "normals", "edges"]
# layer 0: all four tasks share stream 0's node; layer 1: semseg+depth on stream 0,
# normals+edges on stream 2; layer 2: every task its own node.
BRANCHY = TreeSpec(((0, 0, 0, 0), (0, 0, 2, 2)))


def space(n: int = 4, num_layers: int = 3):
    flops = [[10 ** (layer + 1) * (j + 1) for j in range(n)] for layer in range(num_layers)]
    params = [[layer + j for j in range(n)] for layer in range(num_layers)]
    return build_space(TASKS[:n], flops, params, [1] * n, [2] * n)


def test_construction_normalises_and_validates():
    tree = TreeSpec([[0, 1], np.array([1, 1])])
    assert tree.parents == ((0, 1), (1, 1))
    assert all(type(p) is int for row in tree.parents for p in row)
    assert (tree.num_tasks, tree.num_layers) == (2, 3)
    assert TreeSpec(np.zeros((2, 3), dtype=np.int64)).parents == ((0, 0, 0), (0, 0, 0))
    for bad, message in [
        ((), "non-empty"),
        (((0, 1), (0,)), "one entry per task"),
        (((0, 2),), r"stream 2, not in 0\.\.1"),
        (((0, -1),), "not in"),
        (((0, 1.0),), "integer"),
        (((True, 0),), "integer"),
        (("ab",), "must be a list"),
    ]:
        with pytest.raises(UserError, match=message):
            TreeSpec(bad)


def test_used_on_hand_built_trees():
    assert BRANCHY.used() == [
        [True, False, False, False],
        [True, False, True, False],
        [True, True, True, True],
    ]
    assert BRANCHY.used_nodes() == [(0, 0), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert TreeSpec.no_sharing(3, 4).used() == [[True] * 3] * 4
    assert TreeSpec.all_sharing(3, 4, trunk=1).used() == [[False, True, False]] * 3 + [[True] * 3]
    # an unused node's parent does not make its parent used
    assert TreeSpec(((1, 0), (0, 0))).used() == [[False, True], [True, False], [True, True]]


def test_canonical_and_hash():
    a = TreeSpec(((0, 0, 0, 0), (0, 0, 2, 2)))
    b = TreeSpec(((0, 3, 0, 1), (0, 0, 2, 2)))  # differs only in unused nodes (1, 1), (1, 3)
    assert a != b
    assert a.canonical() == b.canonical() == TreeSpec(((0, 1, 0, 3), (0, 0, 2, 2)))
    assert a.hash() == b.hash()
    assert a.canonical().canonical() == a.canonical()
    c = TreeSpec(((0, 0, 1, 0), (0, 0, 2, 2)))  # (1, 2) now reads stream 1: another network
    assert c.hash() != a.hash()
    hashes = {t.hash() for t in enumerate_trees(2, 3)}
    assert len(hashes) == len(list(enumerate_trees(2, 3, unique=True)))
    # golden values: the hash must never change across runs, platforms or Python versions
    assert BRANCHY.hash() == "4e18272e4f6d"
    assert TreeSpec.no_sharing(3, 3).hash() == "76c570efa860"
    assert len(BRANCHY.hash()) == 12 and int(BRANCHY.hash(), 16) >= 0


def test_json_round_trip():
    tree = TreeSpec(((0, 3, 0, 1), (0, 0, 2, 2)))
    d = json.loads(json.dumps(tree.to_json()))
    assert d == {
        "schema_version": 1,
        "num_tasks": 4,
        "num_layers": 3,
        "parents": [[0, 3, 0, 1], [0, 0, 2, 2]],
        "hash": "4e18272e4f6d",
    }
    assert TreeSpec.from_json(d) == tree  # raw parents kept, not canonicalised
    assert TreeSpec.from_json({"parents": [[1, 0]]}) == TreeSpec(((1, 0),))


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ([[0, 1]], "JSON object"),
        ({}, "needs 'parents'"),
        ({"parents": [[0, 1]], "extra": 1}, "unknown tree keys"),
        ({"parents": [[0, 1]], "num_tasks": 3}, "num_tasks=3"),
        ({"parents": [[0, 1]], "num_layers": 3}, "num_layers=3"),
        ({"parents": [[0, 1]], "hash": "000000000000"}, "does not match"),
        ({"parents": [[0, 1]], "schema_version": 99}, "schema version 99"),
        ({"parents": [[0, 5]]}, "not in"),
        ({"parents": [[0, 1], [0]]}, "one entry per task"),
        ({"parents": "01"}, r"\[layers-1\]\[tasks\] list"),
    ],
)
def test_from_json_rejects_bad_input(d, message):
    with pytest.raises(UserError, match=message):
        TreeSpec.from_json(d)


def test_paths_and_shared_prefix():
    assert [BRANCHY.path(t) for t in range(4)] == [[0, 0, 0], [0, 0, 1], [0, 2, 2], [0, 2, 3]]
    assert BRANCHY.shared_prefix(0, 1) == 2
    assert BRANCHY.shared_prefix(0, 2) == 1
    assert BRANCHY.shared_prefix(2, 3) == 2
    assert BRANCHY.shared_prefix(3, 3) == 3
    assert TreeSpec.no_sharing(3, 4).shared_prefix(0, 2) == 0
    assert TreeSpec.all_sharing(3, 4).shared_prefix(1, 2) == 3
    with pytest.raises(UserError, match="task index 4"):
        BRANCHY.path(4)


def test_flops_and_params():
    G = space()  # node (l, j) costs 10 ** (l + 1) * (j + 1); heads 1 FLOP, 2 params each
    assert TreeSpec.no_sharing(4, 3).flops(G) == (10 + 100 + 1000) * (1 + 2 + 3 + 4) + 4
    # all sharing on trunk 2: nodes (0, 2), (1, 2), and all of layer 2
    assert TreeSpec.all_sharing(4, 3, trunk=2).flops(G) == 30 + 300 + 10000 + 4
    assert BRANCHY.flops(G) == 10 + (100 + 300) + 10000 + 4
    # params of node (l, j) = l + j: used nodes (0,0) (1,0) (1,2) (2,0..3), heads 2 each
    assert BRANCHY.params(G) == 0 + 1 + 3 + (2 + 3 + 4 + 5) + 8
    with pytest.raises(UserError, match="tree has 4 tasks x 3 layers but the space has 3 x 3"):
        BRANCHY.flops(space(n=3))


def test_constructors():
    assert TreeSpec.no_sharing(2, 3).parents == ((0, 1), (0, 1))
    assert TreeSpec.all_sharing(3, 2, trunk=2).parents == ((2, 2, 2),)
    a = TreeSpec.random(3, 4, np.random.default_rng(0))
    assert a == TreeSpec.random(3, 4, np.random.default_rng(0))
    assert (a.num_tasks, a.num_layers) == (3, 4)
    with pytest.raises(UserError, match="trunk stream 3"):
        TreeSpec.all_sharing(3, 2, trunk=3)
    with pytest.raises(UserError, match="at least 2 layers"):
        TreeSpec.no_sharing(3, 1)


def test_enumerate_trees_counts():
    assert len(list(enumerate_trees(2, 3))) == 2 ** (2 * 2)
    assert len(list(enumerate_trees(3, 2))) == 3**3
    assert len(list(enumerate_trees(3, 2, unique=True))) == 27  # every layer-1 node is used
    # N=2, L=3: layer-2 nodes pick their parents (4 ways); each used layer-1 node picks (2)
    assert len(list(enumerate_trees(2, 3, unique=True))) == 2 * 2 * 2 + 2 * 2


def test_tree_text_exact():
    assert tree_text(BRANCHY, TASKS) == (
        "tree 4e18272e4f6d: 4 tasks, 3 layers, 7 of 12 nodes used\n"
        "layer 0: [semseg depth normals edges]@semseg\n"
        "layer 1: [semseg depth]@semseg [normals edges]@normals\n"
        "layer 2: [semseg]@semseg [depth]@depth [normals]@normals [edges]@edges\n"
        "paths:\n"
        "  semseg:  semseg > semseg > semseg\n"
        "  depth:   semseg > semseg > depth\n"
        "  normals: semseg > normals > normals\n"
        "  edges:   semseg > normals > edges"
    )
    with pytest.raises(UserError, match="4 tasks but 2 names"):
        tree_text(BRANCHY, TASKS[:2])


def test_tree_png_writes_a_png(tmp_path):
    out = tree_png(BRANCHY, TASKS, tmp_path / "figs" / "tree.png", G=space(), title="branchy")
    assert out == tmp_path / "figs" / "tree.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["tree.png"]
    plain = tree_png(TreeSpec.all_sharing(4, 3), TASKS, tmp_path / "plain.png")
    assert plain.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="use one of"):
        tree_png(BRANCHY, TASKS, tmp_path / "tree.txt")


def test_import_stays_light():
    code = "import sys, dymu.space; print('matplotlib' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr


def test_private_nodes_are_own_stream_paths_for_one_task():
    n, num_layers = 3, 4
    assert all(all(row) for row in TreeSpec.no_sharing(n, num_layers).private())
    shared = TreeSpec.all_sharing(n, num_layers, trunk=1).private()
    # trunk nodes (layers 0..2 of stream 1) serve every task; the last layer's nodes are fed
    # by the trunk: nothing is private
    assert not any(any(row) for row in shared)
    # every task on stream 0's trunk for layers 0-1, then on its own stream: tasks 1 and 2
    # run their own nodes from layer 2, but fed by the shared trunk: not private either
    tree = TreeSpec(((0, 0, 0), (0, 0, 0), (0, 1, 2)))
    assert tree.path(0) == [0, 0, 0, 0] and tree.path(1) == [0, 0, 1, 1]
    assert tree.private() == [
        [False, False, False],
        [False, False, False],
        [False, False, False],
        [False, False, False],
    ]
    tree = TreeSpec(((0, 1, 1), (0, 1, 1), (0, 1, 2)))  # task 0 alone on stream 0
    assert [row[0] for row in tree.private()] == [True] * 4
    assert not any(row[1] or row[2] for row in tree.private())


def test_branching_tree_leaves_the_trunk_at_each_tasks_split_layer():
    n, num_layers = 3, 5
    tree = TreeSpec.branching(n, num_layers, trunk=1, split=[2, 3, 4])
    assert tree.path(0) == [1, 1, 0, 0, 0]  # trunk for layers 0-1, then its own stream
    assert tree.path(1) == [1] * 5  # the trunk's own task never leaves it
    assert tree.path(2) == [1, 1, 1, 1, 2]  # split L-1: shares all but the last layer
    assert TreeSpec.branching(n, num_layers, 1, [0, 0, 0]) == TreeSpec.no_sharing(n, num_layers)
    full = TreeSpec.branching(n, num_layers, 1, [num_layers - 1] * n)
    assert full == TreeSpec.all_sharing(n, num_layers, 1).canonical()
    with pytest.raises(UserError, match="split layer 5"):
        TreeSpec.branching(n, num_layers, 1, [5, 0, 0])
