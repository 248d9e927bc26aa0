"""A tree: one parent choice per node of the space (METHOD.md 1.2).

``TreeSpec.parents[l - 1][j]`` is the parent stream of node ``(l, j)`` for
``l = 1..L-1``; layer-0 nodes read the image. Only nodes that some head reaches are *used*;
the parents of the other nodes do not change the network, so :meth:`TreeSpec.canonical`
resets them and :meth:`TreeSpec.hash` names the network, not the raw choice. That hash keys
``trees/<hash>.json``, exported engines and the controller's cache.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dymu.errors import UserError
from dymu.space.graph import SCHEMA_VERSION, cheapest_streams, costs, space_shape, width_costs

if TYPE_CHECKING:
    import networkx as nx


def _check_int(value: Any, what: str) -> int:
    """A Python int from an int-like value (never a bool or a float)."""
    if isinstance(value, (bool, float)) or not isinstance(value, (int, np.integer)):
        raise UserError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _check_shape(num_tasks: Any, num_layers: Any) -> tuple[int, int]:
    n = _check_int(num_tasks, "num_tasks")
    num_layers = _check_int(num_layers, "num_layers")
    if n < 1:
        raise UserError(f"a tree needs at least one task, got num_tasks={n}")
    if num_layers < 2:
        raise UserError(f"a tree needs at least 2 layers, got num_layers={num_layers}")
    return n, num_layers


def _check_widths(widths: Any, num_layers: int, n: int) -> tuple[tuple[float, ...], ...] | None:
    """``widths`` as an ``[L][N]`` tuple of floats in (0, 1], or None when every one is 1."""
    if widths is None:
        return None
    if isinstance(widths, np.ndarray):
        widths = widths.tolist()
    if (
        isinstance(widths, (str, bytes))
        or not isinstance(widths, Sequence)
        or len(widths) != num_layers
        or any(not isinstance(r, Sequence) or isinstance(r, str) or len(r) != n for r in widths)
    ):
        raise UserError(f"tree widths must be a [{num_layers} layers][{n} tasks] table")
    rows = []
    for layer, row in enumerate(widths):
        out = []
        for j, w in enumerate(row):
            if isinstance(w, bool) or not isinstance(w, (int, float, np.integer, np.floating)):
                raise UserError(f"width of node ({layer}, {j}) must be a number, got {w!r}")
            if not 0.0 < float(w) <= 1.0:
                raise UserError(f"width of node ({layer}, {j}) must be in (0, 1], got {w!r}")
            out.append(float(w))
        rows.append(tuple(out))
    return None if all(w == 1.0 for row in rows for w in row) else tuple(rows)


@dataclass(frozen=True)
class TreeSpec:
    """One parent choice per node of layers 1..L-1: a tree-structured multi-task network.

    Attributes:
        parents: ``[L-1][N]`` tuple of tuples; ``parents[l - 1][j]`` is the stream ``i`` of
            the parent ``(l - 1, i)`` of node ``(l, j)``. Lists and numpy arrays are
            accepted and stored as tuples of ints, so a TreeSpec is hashable.

        widths: ``[L][N]`` width fractions in (0, 1] (METHOD.md 1.11): node ``(l, j)`` runs
            the first ``widths[l][j]`` of its channels. None, and a table of all 1.0 (which
            is stored as None), run every node at full width.

    Equality and ``hash()`` (the builtin) compare raw parents and widths; compare
    ``canonical()`` forms or :meth:`hash` strings to ask whether two trees are the same
    network.
    """

    parents: tuple[tuple[int, ...], ...]
    widths: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        rows = self.parents
        if isinstance(rows, np.ndarray):
            rows = rows.tolist()
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence) or len(rows) == 0:
            raise UserError(
                f"tree parents must be a non-empty [layers-1][tasks] list, got {rows!r}"
            )
        norm = []
        for layer, row in enumerate(rows, start=1):
            if isinstance(row, np.ndarray):
                row = row.tolist()
            if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
                raise UserError(f"tree parents of layer {layer} must be a list, got {row!r}")
            norm.append(
                tuple(_check_int(p, f"parent of node ({layer}, {j})") for j, p in enumerate(row))
            )
        n = len(norm[0])
        if n == 0 or any(len(row) != n for row in norm):
            raise UserError(
                f"tree parents must have one entry per task in every layer, "
                f"got row lengths {[len(row) for row in norm]}"
            )
        for layer, row in enumerate(norm, start=1):
            for j, p in enumerate(row):
                if not 0 <= p < n:
                    raise UserError(
                        f"parent of node ({layer}, {j}) is stream {p}, not in 0..{n - 1}"
                    )
        object.__setattr__(self, "parents", tuple(norm))
        object.__setattr__(self, "widths", _check_widths(self.widths, len(norm) + 1, n))

    # -- shape ---------------------------------------------------------------------------

    @property
    def num_tasks(self) -> int:
        """N: tasks = streams = nodes per layer."""
        return len(self.parents[0])

    @property
    def num_layers(self) -> int:
        """L: layers per stream (one more than the rows of ``parents``)."""
        return len(self.parents) + 1

    # -- structure -----------------------------------------------------------------------

    def used(self) -> list[list[bool]]:
        """``[L][N]``: whether node ``(l, j)`` feeds some head (unused nodes are pruned).

        Every node of layer L-1 is used; going down, a node is used when a used node of the
        next layer picks it as parent.
        """
        n, num_layers = self.num_tasks, self.num_layers
        used = [[False] * n for _ in range(num_layers)]
        used[-1] = [True] * n
        for layer in range(num_layers - 1, 0, -1):
            for j in range(n):
                if used[layer][j]:
                    used[layer - 1][self.parents[layer - 1][j]] = True
        return used

    def used_nodes(self) -> list[tuple[int, int]]:
        """The used nodes ``(l, j)`` in layer-major order."""
        return [
            (layer, j)
            for layer, row in enumerate(self.used())
            for j, flag in enumerate(row)
            if flag
        ]

    def canonical(self) -> TreeSpec:
        """The same network with every unused node's parent set to its own stream.

        Trees that differ only in the parents of unused nodes run the same computation;
        their canonical forms are equal.
        """
        used = self.used()
        rows = tuple(
            tuple(p if used[layer][j] else j for j, p in enumerate(row))
            for layer, row in enumerate(self.parents, start=1)
        )
        widths = None
        if self.widths is not None:
            widths = [
                [w if used[layer][j] else 1.0 for j, w in enumerate(row)]
                for layer, row in enumerate(self.widths)
            ]
        return TreeSpec(rows, widths)

    def width(self, layer: int, stream: int) -> float:
        """The width node ``(layer, stream)`` runs at (1.0 without widths)."""
        return 1.0 if self.widths is None else self.widths[layer][stream]

    def narrowed(self) -> list[list[bool]]:
        """``narrowed[l][j]``: node (l, j) or a node before it on its path runs narrower
        than full width, so what it reads is not what the full-width streams show it (all
        False without widths)."""
        n, num_layers = self.num_tasks, self.num_layers
        out = [[self.width(0, j) < 1.0 for j in range(n)]]
        for layer in range(1, num_layers):
            row = self.parents[layer - 1]
            out.append([self.width(layer, j) < 1.0 or out[-1][row[j]] for j in range(n)])
        return out

    def hash(self) -> str:
        """12 hex characters naming the network (sha256 of the canonical parents as JSON).

        Only ints, the widths' shortest float reprs and fixed separators go into the digest,
        so it is the same on every run, platform and Python version.
        """
        tree = self.canonical()
        data: Any = [list(row) for row in tree.parents]
        if tree.widths is not None:  # full-width trees keep the names they always had
            data = {"parents": data, "widths": [list(row) for row in tree.widths]}
        text = json.dumps(data, separators=(",", ":"))
        return hashlib.sha256(text.encode("ascii")).hexdigest()[:12]

    def path(self, task_index: int) -> list[int]:
        """Stream of the node task ``task_index`` runs at each layer ``0..L-1``.

        The last entry is the task's own stream (its head reads ``(L-1, task_index)``).
        """
        j = self._task(task_index)
        out = [j]
        for layer in range(self.num_layers - 1, 0, -1):
            j = self.parents[layer - 1][j]
            out.append(j)
        return out[::-1]

    def private(self) -> list[list[bool]]:
        """``private[l][j]``: node (l, j) and every node before it on task j's path belong to
        stream j, run for task j alone and at full width, so the node sees exactly what
        stream j alone would show it (the anchor tree's nodes are all private; a shared
        trunk's are not, nor a narrowed node's).
        """
        n, num_layers = self.num_tasks, self.num_layers
        paths = [self.path(j) for j in range(n)]
        out = [[False] * n for _ in range(num_layers)]
        for j in range(n):
            for layer in range(num_layers):
                mine = paths[j][layer] == j and self.width(layer, j) == 1.0
                if not mine or any(paths[k][layer] == j for k in range(n) if k != j):
                    break
                out[layer][j] = True
        return out

    def shared_prefix(self, i: int, j: int) -> int:
        """Number of leading layers where tasks ``i`` and ``j`` run the same node.

        Paths that meet at a node coincide below it (a node has one parent), so the shared
        layers always form a prefix; ``shared_prefix(i, i) == L``.
        """
        pi, pj = self.path(i), self.path(j)
        count = 0
        for a, b in zip(pi, pj, strict=True):
            if a != b:
                break
            count += 1
        return count

    def _task(self, index: int) -> int:
        index = _check_int(index, "task index")
        if not 0 <= index < self.num_tasks:
            raise UserError(f"task index {index} is not in 0..{self.num_tasks - 1}")
        return index

    # -- cost ----------------------------------------------------------------------------

    def _check_space(self, G: nx.DiGraph) -> None:
        n, num_layers = space_shape(G)
        if (n, num_layers) != (self.num_tasks, self.num_layers):
            raise UserError(
                f"tree has {self.num_tasks} tasks x {self.num_layers} layers but the space has "
                f"{n} x {num_layers}"
            )

    def flops(self, G: nx.DiGraph) -> int:
        """Exact FLOPs of this tree in space ``G``: used nodes plus all heads (fvcore), each
        at its width where the tree has widths."""
        return self._cost(G, params=False)

    def params(self, G: nx.DiGraph) -> int:
        """Exact parameter count of this tree in space ``G``: used nodes plus all heads."""
        return self._cost(G, params=True)

    def _cost(self, G: nx.DiGraph, params: bool) -> int:
        self._check_space(G)
        if self.widths is None:
            node_flops, node_params, head_flops, head_params = costs(G)
            node, head = (node_params, head_params) if params else (node_flops, head_flops)
            return sum(node[layer][j] for layer, j in self.used_nodes()) + sum(head)
        wc = width_costs(G)
        if wc is None:
            raise UserError("this tree has widths, but the space prices full widths only")
        index = {w: i for i, w in enumerate(wc.widths)}

        def at(layer: int, j: int) -> int:
            w = self.widths[layer][j]  # type: ignore[index]
            if w not in index:
                raise UserError(
                    f"node ({layer}, {j}) runs at width {w}, "
                    f"not one of the space's {list(wc.widths)}"
                )
            return index[w]

        node_t = wc.node_params if params else wc.node_flops  # [L][N][a][b]
        head_t = wc.head_params if params else wc.head_flops  # [N][a][c]
        total = 0
        for layer, j in self.used_nodes():
            a = 0 if layer == 0 else at(layer - 1, self.parents[layer - 1][j])
            total += node_t[layer][j][a][at(layer, j)]
        for j, low in enumerate(wc.low_layers):
            c = 0 if low is None else at(low, self.path(j)[low])
            total += head_t[j][at(self.num_layers - 1, j)][c]
        return total

    # -- JSON ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (``trees/<hash>.json``); :meth:`from_json` reads it back exactly."""
        return {
            "schema_version": SCHEMA_VERSION,
            "num_tasks": self.num_tasks,
            "num_layers": self.num_layers,
            "parents": [list(row) for row in self.parents],
            **({} if self.widths is None else {"widths": [list(r) for r in self.widths]}),
            "hash": self.hash(),
        }

    @classmethod
    def from_json(cls, d: Any) -> TreeSpec:
        """Read :meth:`to_json` output; shapes, ranges, version and hash are checked.

        ``parents`` is required; ``num_tasks``, ``num_layers``, ``schema_version`` and
        ``hash`` are checked when present, so a file edited by hand cannot silently name
        another tree.

        Raises:
            UserError: with one line saying what is wrong.
        """
        if not isinstance(d, dict):
            raise UserError(f"a tree must be a JSON object, got {type(d).__name__}")
        known = {"schema_version", "num_tasks", "num_layers", "parents", "widths", "hash"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown tree keys {unknown}; valid keys: {sorted(known)}")
        if "parents" not in d:
            raise UserError("a tree needs 'parents'")
        version = d.get("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise UserError(
                f"tree has schema version {version!r}, this dymu reads {SCHEMA_VERSION}"
            )
        tree = cls(d["parents"], d.get("widths"))
        for key in ("num_tasks", "num_layers"):
            if key in d and d[key] != getattr(tree, key):
                raise UserError(
                    f"tree says {key}={d[key]!r} but its parents give {getattr(tree, key)}"
                )
        if "hash" in d and d["hash"] != tree.hash():
            raise UserError(f"tree hash {d['hash']!r} does not match its parents ({tree.hash()})")
        return tree

    # -- constructors --------------------------------------------------------------------

    @classmethod
    def no_sharing(cls, num_tasks: int, num_layers: int) -> TreeSpec:
        """Every node picks its own stream: the anchor, N separate streams."""
        n, num_layers = _check_shape(num_tasks, num_layers)
        return cls(tuple(tuple(range(n)) for _ in range(num_layers - 1)))

    @classmethod
    def all_sharing(cls, num_tasks: int, num_layers: int, trunk: int = 0) -> TreeSpec:
        """Every node picks stream ``trunk``: layers 0..L-2 run only the trunk's nodes.

        Only the last layer (one node per task) and the heads are task-specific, so this
        costs about one stream.
        """
        n, num_layers = _check_shape(num_tasks, num_layers)
        trunk = _check_int(trunk, "trunk")
        if not 0 <= trunk < n:
            raise UserError(f"trunk stream {trunk} is not in 0..{n - 1}")
        return cls(tuple((trunk,) * n for _ in range(num_layers - 1)))

    @classmethod
    def random(cls, num_tasks: int, num_layers: int, rng: np.random.Generator) -> TreeSpec:
        """Every parent drawn uniformly from the N streams (raw, not canonicalised)."""
        n, num_layers = _check_shape(num_tasks, num_layers)
        return cls(rng.integers(0, n, size=(num_layers - 1, n)))

    @classmethod
    def branching(cls, num_tasks: int, num_layers: int, trunk: int, split: list[int]) -> TreeSpec:
        """Every task on stream ``trunk`` for its first ``split[j]`` layers, then on its own
        stream: ``split[j] = 0`` is task j's own stream (its single-task network),
        ``split[j] = L - 1`` shares all but the last layer (as :meth:`all_sharing`). The
        trunk's own task always stays on the trunk (canonical)."""
        n, num_layers = _check_shape(num_tasks, num_layers)
        rows = [list(range(n)) for _ in range(num_layers - 1)]  # [L-1][N] parents
        for j, k in enumerate(split):
            if not 0 <= k <= num_layers - 1:
                raise UserError(f"split layer {k} is not in 0..{num_layers - 1}")
            if j != trunk and k > 0:
                rows[k - 1][j] = trunk  # node (k, j) reads the trunk's node (k-1, trunk)
        return cls(tuple(tuple(r) for r in rows)).canonical()

    @classmethod
    def cheapest(cls, G: nx.DiGraph) -> TreeSpec:
        """A tree of minimum FLOPs in ``G`` (canonical; equals ``min_flops(G)``).

        All of layer L-1 feeds from the cheapest node of layer L-2, which feeds from the
        cheapest node of layer L-3, and so on (see :func:`dymu.space.graph.min_flops`).
        """
        n, num_layers = space_shape(G)
        chain = cheapest_streams(G)  # [L-1]: stream of the used node at layers 0..L-2
        rows = [list(range(n)) for _ in range(num_layers - 1)]
        for layer in range(1, num_layers):
            if layer == num_layers - 1:
                rows[layer - 1] = [chain[layer - 1]] * n
            else:
                rows[layer - 1][chain[layer]] = chain[layer - 1]
        return cls(rows).canonical()


def enumerate_trees(num_tasks: int, num_layers: int, unique: bool = False) -> Iterator[TreeSpec]:
    """Every tree of the space: N ** (N * (L-1)) parent choices (small sizes only).

    Args:
        num_tasks: N.
        num_layers: L.
        unique: yield each distinct network once (canonical forms, first seen order).
    """
    n, num_layers = _check_shape(num_tasks, num_layers)
    seen: set[TreeSpec] = set()
    for flat in itertools.product(range(n), repeat=n * (num_layers - 1)):
        tree = TreeSpec(tuple(flat[k * n : (k + 1) * n] for k in range(num_layers - 1)))
        if unique:
            tree = tree.canonical()
            if tree in seen:
                continue
            seen.add(tree)
        yield tree
