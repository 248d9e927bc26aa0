"""The tree space: every tree the anchor can express, as one networkx DiGraph (METHOD.md 1.2).

Node ``(l, j)`` is stream ``j``'s layer ``l`` (``l = 0..L-1``). Layer-0 nodes read the image;
every node ``(l, j)`` with ``l >= 1`` picks one parent among the N nodes of layer ``l - 1``,
so the graph holds an edge ``(l-1, i) -> (l, j)`` for every ``i, j`` (the candidate
parents). Task ``j``'s head reads node ``(L-1, j)``. The graph carries each node's FLOPs and
parameter counts, given by the caller (counted elsewhere with fvcore, one fused
multiply-add = one FLOP), so this module needs no network code.

Graph node ids and attributes:

- ``"image"``: the source, ``kind="image"``, edges to every layer-0 node.
- ``(l, j)``: ``kind="node"``, ``layer``, ``stream``, ``task`` (``tasks[j]``), ``flops``,
  ``params``.
- ``("head", task)``: ``kind="head"``, ``stream``, ``task``, ``flops``, ``params``; one
  edge from ``(L-1, j)``.

Graph attributes: ``schema_version``, ``tasks`` (a list), ``num_layers``.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from dymu.errors import UserError
from dymu.io import write_json

SCHEMA_VERSION = 1
IMAGE = "image"
HEAD = "head"


def _as_count(value: Any, what: str) -> int:
    """``value`` as a non-negative Python int (numpy ints and integral floats accepted).

    Costs must be exact integers so that FLOPs of a tree are exact and JSON round trips
    are lossless; negative costs would also break the cheapest-tree formula.
    """
    if isinstance(value, bool):
        raise UserError(f"{what} must be a non-negative integer, got {value!r}")
    integral = isinstance(value, numbers.Integral)
    if integral or (isinstance(value, numbers.Real) and float(value).is_integer()):
        out = int(value)
    else:
        raise UserError(f"{what} must be a non-negative integer, got {value!r}")
    if out < 0:
        raise UserError(f"{what} must be a non-negative integer, got {value!r}")
    return out


def _table(values: Sequence[Sequence[Any]], rows: int, cols: int, what: str) -> list[list[int]]:
    """Check that ``values`` is ``rows`` x ``cols`` and convert it to ints."""
    if len(values) != rows or any(len(row) != cols for row in values):
        shape = [len(row) for row in values]
        raise UserError(f"{what} must be [{rows} layers][{cols} streams], got row lengths {shape}")
    return [
        [_as_count(v, f"{what}[{layer}][{j}]") for j, v in enumerate(row)]
        for layer, row in enumerate(values)
    ]


@dataclass(frozen=True)
class WidthCosts:
    """What every (tree, widths) configuration of a slimmable space costs (METHOD.md 1.11).

    A node's FLOPs depend on its own width and its parent's (the convolutions that read
    the parent shrink with it); a head's on the widths of the nodes it reads.

    Attributes:
        widths: the width fractions nodes may run at, sorted, ending with 1.0.
        node_flops: ``[L][N][a][b]``: node ``(l, j)`` at ``widths[b]`` read by a parent at
            ``widths[a]``; layer 0 reads the image, so ``node_flops[0][j]`` has one row.
        node_params: the same shape, parameter counts.
        head_flops: ``[N][a][c]``: task j's head reading its last node at ``widths[a]`` and
            its low-level node at ``widths[c]`` (one column when it reads none).
        head_params: the same shape, parameter counts.
        low_layers: ``[N]``: the layer each head's low-level input comes from, or None.
    """

    widths: tuple[float, ...]
    node_flops: list
    node_params: list
    head_flops: list
    head_params: list
    low_layers: tuple[int | None, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "widths": list(self.widths),
            "node_flops": self.node_flops,
            "node_params": self.node_params,
            "head_flops": self.head_flops,
            "head_params": self.head_params,
            "low_layers": list(self.low_layers),
        }


def _width_costs(wc: WidthCosts, n: int, num_layers: int) -> WidthCosts:
    """``wc`` checked against the space's shape, every count an exact int."""
    widths = wc.widths
    if (
        not widths
        or list(widths) != sorted(set(widths))
        or widths[-1] != 1.0
        or not all(0.0 < w <= 1.0 for w in widths)
    ):
        raise UserError(f"widths must be distinct, sorted, in (0, 1] and end with 1.0: {widths}")
    k = len(widths)
    low_layers = tuple(None if v is None else int(v) for v in wc.low_layers)
    if len(low_layers) != n or any(v is not None and not 0 <= v < num_layers for v in low_layers):
        raise UserError(f"low_layers must give one layer (or None) per task: {wc.low_layers}")

    def grid(values: Any, rows: int, cols: int, what: str) -> list[list[int]]:
        if len(values) != rows or any(len(r) != cols for r in values):
            raise UserError(f"{what} must be [{rows}][{cols}]")
        return [[_as_count(v, what) for v in r] for r in values]

    tables: dict[str, list] = {}
    for name in ("node_flops", "node_params"):
        values = getattr(wc, name)
        if len(values) != num_layers or any(len(row) != n for row in values):
            raise UserError(f"{name} must be [{num_layers} layers][{n} streams][..][..]")
        tables[name] = [
            [
                grid(cell, 1 if layer == 0 else k, k, f"{name}[{layer}][{j}]")
                for j, cell in enumerate(row)
            ]
            for layer, row in enumerate(values)
        ]
    for name in ("head_flops", "head_params"):
        values = getattr(wc, name)
        if len(values) != n:
            raise UserError(f"{name} needs one table per task ({n})")
        tables[name] = [
            grid(cell, k, 1 if low_layers[j] is None else k, f"{name}[{j}]")
            for j, cell in enumerate(values)
        ]
    for name, cells in (
        ("node_flops", [c for row in tables["node_flops"] for c in row]),
        ("head_flops", tables["head_flops"]),
    ):
        for cell in cells:  # what makes min_flops exact: narrower never costs more
            for r in range(len(cell)):
                for c in range(len(cell[r])):
                    if (r and cell[r - 1][c] > cell[r][c]) or (c and cell[r][c - 1] > cell[r][c]):
                        raise UserError(f"{name} must not decrease as a width grows")
    return WidthCosts(tuple(float(w) for w in widths), low_layers=low_layers, **tables)


def build_space(
    tasks: Sequence[str],
    node_flops: Sequence[Sequence[int]],
    node_params: Sequence[Sequence[int]],
    head_flops: Sequence[int],
    head_params: Sequence[int],
    width_costs: WidthCosts | None = None,
) -> nx.DiGraph:
    """Build the space of all trees over N streams of L layers.

    Args:
        tasks: task names, one per stream, in stream order (names must be distinct).
        node_flops: ``node_flops[l][j]`` = FLOPs of node ``(l, j)`` (fvcore count).
        node_params: ``node_params[l][j]`` = parameter count of node ``(l, j)``.
        head_flops: FLOPs of task ``j``'s head (heads are fixed, outside the search).
        head_params: parameter count of task ``j``'s head.
        width_costs: the costs at every width (a slimmable space, METHOD.md 1.11); their
            full-width entries must equal the tables above. None: every node runs at its
            full width only.

    Returns:
        The DiGraph described in the module docstring.

    Raises:
        UserError: shapes that do not match, negative or non-integer costs, duplicate task
            names, or fewer than 2 layers (with one layer there is no parent to choose).
    """
    tasks = [str(t) for t in tasks]
    n = len(tasks)
    if n == 0:
        raise UserError("a space needs at least one task")
    if len(set(tasks)) != n:
        raise UserError(f"task names must be distinct, got {tasks}")
    num_layers = len(node_flops)
    if num_layers < 2:
        raise UserError(
            f"a space needs at least 2 layers per stream (got {num_layers}): "
            "with one layer there is no parent to choose"
        )
    flops = _table(node_flops, num_layers, n, "node_flops")
    params = _table(node_params, num_layers, n, "node_params")
    if len(head_flops) != n or len(head_params) != n:
        raise UserError(
            f"head_flops and head_params need one entry per task ({n}), "
            f"got {len(head_flops)} and {len(head_params)}"
        )
    hflops = [_as_count(v, f"head_flops[{j}]") for j, v in enumerate(head_flops)]
    hparams = [_as_count(v, f"head_params[{j}]") for j, v in enumerate(head_params)]

    G = nx.DiGraph(schema_version=SCHEMA_VERSION, tasks=list(tasks), num_layers=num_layers)
    if width_costs is not None:
        wc = _width_costs(width_costs, n, num_layers)
        full = (
            [[cell[-1][-1] for cell in row] for row in wc.node_flops],
            [[cell[-1][-1] for cell in row] for row in wc.node_params],
            [cell[-1][-1] for cell in wc.head_flops],
            [cell[-1][-1] for cell in wc.head_params],
        )
        if full != (flops, params, hflops, hparams):
            raise UserError("width_costs at full width must equal the space's own cost tables")
        G.graph["width_costs"] = wc.to_json()
    G.add_node(IMAGE, kind="image")
    for layer in range(num_layers):
        for j, task in enumerate(tasks):
            G.add_node(
                (layer, j),
                kind="node",
                layer=layer,
                stream=j,
                task=task,
                flops=flops[layer][j],
                params=params[layer][j],
            )
    for j in range(n):
        G.add_edge(IMAGE, (0, j))
    for layer in range(1, num_layers):
        for i in range(n):
            for j in range(n):
                G.add_edge((layer - 1, i), (layer, j))
    for j, task in enumerate(tasks):
        G.add_node(
            (HEAD, task), kind="head", stream=j, task=task, flops=hflops[j], params=hparams[j]
        )
        G.add_edge((num_layers - 1, j), (HEAD, task))
    return G


def space_shape(G: nx.DiGraph) -> tuple[int, int]:
    """``(num_tasks, num_layers)`` of a space."""
    return len(G.graph["tasks"]), int(G.graph["num_layers"])


def costs(G: nx.DiGraph) -> tuple[list[list[int]], list[list[int]], list[int], list[int]]:
    """The cost tables a space was built from.

    Returns:
        ``(flops[L][N], params[L][N], head_flops[N], head_params[N])`` as lists of ints, so
        ``build_space(G.graph["tasks"], *costs(G))`` rebuilds ``G``.
    """
    n, num_layers = space_shape(G)
    tasks = G.graph["tasks"]
    flops = [[int(G.nodes[(layer, j)]["flops"]) for j in range(n)] for layer in range(num_layers)]
    params = [[int(G.nodes[(layer, j)]["params"]) for j in range(n)] for layer in range(num_layers)]
    hflops = [int(G.nodes[(HEAD, t)]["flops"]) for t in tasks]
    hparams = [int(G.nodes[(HEAD, t)]["params"]) for t in tasks]
    return flops, params, hflops, hparams


def width_costs(G: nx.DiGraph) -> WidthCosts | None:
    """The costs at every width of a slimmable space, or None (full width only)."""
    data = G.graph.get("width_costs")
    if data is None:
        return None
    return WidthCosts(
        widths=tuple(data["widths"]),
        node_flops=data["node_flops"],
        node_params=data["node_params"],
        head_flops=data["head_flops"],
        head_params=data["head_params"],
        low_layers=tuple(data["low_layers"]),
    )


def space_widths(G: nx.DiGraph) -> tuple[float, ...]:
    """The widths nodes of ``G`` may run at: ``(1.0,)`` for a space without width costs."""
    wc = width_costs(G)
    return (1.0,) if wc is None else wc.widths


def anchor_flops(G: nx.DiGraph) -> int:
    """FLOPs of the anchor: all N streams and heads (= the no-sharing tree).

    The budget ``b`` is a fraction of this number (DESIGN.md, "Budget").
    """
    flops, _, hflops, _ = costs(G)
    return sum(map(sum, flops)) + sum(hflops)


def anchor_params(G: nx.DiGraph) -> int:
    """Parameter count of the anchor: all N streams and heads."""
    _, params, _, hparams = costs(G)
    return sum(map(sum, params)) + sum(hparams)


def max_flops(G: nx.DiGraph) -> int:
    """FLOPs of the most expensive tree: every node used, i.e. the anchor.

    With non-negative costs, using more nodes never costs less, and no sharing uses all of
    them, so the maximum over trees equals :func:`anchor_flops`.
    """
    return anchor_flops(G)


def min_flops(G: nx.DiGraph) -> int:
    """FLOPs of the cheapest tree in the space (exact).

    A tree uses all N nodes of layer L-1 (every head reads one). Going down, the set of
    used nodes of layer ``l`` is the set of parents chosen by the used nodes of layer
    ``l + 1``: any non-empty set no larger than that one, because every node may pick any
    node of the layer below. So a single node per layer ``l < L-1`` is always reachable,
    and layers are independent of each other (the edges are complete, so the chain may
    switch streams between layers at no cost). The dynamic programme over layers therefore
    reduces to: all of layer L-1, plus the cheapest node of each lower layer, plus all
    heads. Tests check this against brute-force enumeration.

    In a slimmable space (:func:`width_costs`) the same holds with every node and head at
    the narrowest width, which costs the least in every table (checked when it is built).
    """
    flops = _narrowest(G)
    wc = width_costs(G)
    hflops = costs(G)[2] if wc is None else [cell[0][0] for cell in wc.head_flops]
    return sum(flops[-1]) + sum(min(row) for row in flops[:-1]) + sum(hflops)


def _narrowest(G: nx.DiGraph) -> list[list[int]]:
    """``[L][N]`` FLOPs of every node at the narrowest width read by the narrowest parent
    (the full-width costs in a space without widths)."""
    wc = width_costs(G)
    if wc is None:
        return costs(G)[0]
    return [[cell[0][0] for cell in row] for row in wc.node_flops]


def cheapest_streams(G: nx.DiGraph) -> list[int]:
    """For each layer below L-1, the stream of its cheapest node (lowest index on ties;
    at the narrowest width in a slimmable space).

    The chain through these nodes is the cheapest tree (see :func:`min_flops`).
    """
    flops = _narrowest(G)
    return [min(range(len(row)), key=lambda j, row=row: (row[j], j)) for row in flops[:-1]]


def space_flops(G: nx.DiGraph) -> dict[str, int]:
    """The FLOPs range of the space: ``{"anchor", "min", "max"}`` (fvcore counts)."""
    return {"anchor": anchor_flops(G), "min": min_flops(G), "max": max_flops(G)}


def _jsonable_id(node: Any) -> Any:
    """Tuple node ids become lists in JSON; ``_restore_id`` turns them back."""
    return list(node) if isinstance(node, tuple) else node


def _restore_id(node: Any) -> Any:
    """Lists become tuples again: no node id is a list, so this is exact."""
    return tuple(_restore_id(x) for x in node) if isinstance(node, list) else node


def _node_link_data(G: nx.DiGraph) -> dict[str, Any]:
    try:  # networkx >= 3.4 names the edge list with ``edges=``
        return nx.node_link_data(G, edges="edges")
    except TypeError:  # pragma: no cover - older networkx
        return nx.node_link_data(G, link="edges")


def _node_link_graph(data: dict[str, Any]) -> nx.DiGraph:
    try:
        return nx.node_link_graph(data, directed=True, multigraph=False, edges="edges")
    except TypeError as exc:  # pragma: no cover - older networkx
        if "edges" not in str(exc):
            raise
        return nx.node_link_graph(data, directed=True, multigraph=False, link="edges")


def save_space(G: nx.DiGraph, path: str | os.PathLike) -> Path:
    """Write the space as node-link JSON to ``path`` (``space.json`` in a run dir), atomically.

    Tuple node ids are written as JSON lists; :func:`load_space` restores them exactly.
    """
    data = _node_link_data(G)
    data = dict(data)
    data["graph"] = dict(data["graph"])
    data["nodes"] = [{**d, "id": _jsonable_id(d["id"])} for d in data["nodes"]]
    data["edges"] = [
        {**d, "source": _jsonable_id(d["source"]), "target": _jsonable_id(d["target"])}
        for d in data["edges"]
    ]
    return write_json(path, data)


def load_space(path: str | os.PathLike) -> nx.DiGraph:
    """Read a space written by :func:`save_space`.

    The graph is checked against the schema version and rebuilt from its cost tables, so a
    hand-edited or truncated file fails here with one line instead of deep inside a later
    stage.

    Raises:
        UserError: missing, unreadable or malformed file, or another schema version.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"space file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"space file {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("graph"), dict):
        raise UserError(f"space file {path} is malformed: no 'graph' section")
    version = data["graph"].get("schema_version")
    if version != SCHEMA_VERSION:
        raise UserError(
            f"space file {path} has schema version {version!r}, this dymu reads "
            f"{SCHEMA_VERSION}: rebuild the space"
        )
    try:
        data["nodes"] = [{**d, "id": _restore_id(d["id"])} for d in data["nodes"]]
        data["edges"] = [
            {**d, "source": _restore_id(d["source"]), "target": _restore_id(d["target"])}
            for d in data["edges"]
        ]
        G = _node_link_graph(data)
        expected = build_space(G.graph["tasks"], *costs(G), width_costs=width_costs(G))
    except (KeyError, TypeError, ValueError, nx.NetworkXError) as exc:
        raise UserError(f"space file {path} is malformed: {type(exc).__name__}: {exc}") from exc
    if set(G.nodes) != set(expected.nodes) or set(G.edges) != set(expected.edges):
        raise UserError(f"space file {path} is malformed: its nodes or edges are not a space")
    if G.graph.get("width_costs") != expected.graph.get("width_costs"):
        raise UserError(f"space file {path} is malformed: its width costs are not exact")
    for node, attrs in expected.nodes(data=True):
        if G.nodes[node] != attrs:
            raise UserError(f"space file {path} is malformed: node {node} has wrong attributes")
    return G
