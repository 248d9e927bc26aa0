"""Derive a tree from the edge hypernet's parent distribution and a FLOPs budget.

At inference DYMU takes the argmax parent of every node (METHOD.md 1.4). dymu adds a FLOPs
budget ``b`` (a fraction of the anchor's FLOPs, DESIGN.md "Budget"): the argmax tree may
not fit, so :func:`repair` merges branches until ``FLOPs(tree) <= b * FLOPs(anchor)``, giving
up as little of the distribution's log-probability as it can per FLOP saved.

All FLOPs are fvcore counts (one fused multiply-add = one FLOP), taken from the space.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Any

import numpy as np

from dymu.errors import UserError
from dymu.space.graph import anchor_flops, costs, min_flops, space_shape, width_costs
from dymu.space.tree import TreeSpec

if TYPE_CHECKING:
    import networkx as nx

# Probabilities are clipped here before the log, so a zero entry is a very unlikely (not an
# impossible) parent and the ratios in :func:`repair` stay finite.
_PROB_FLOOR = 1e-30
# A move that loses at most this much log-probability counts as free.
_FREE_LOSS = 1e-12

Parents = list[list[int]]


# -- input checks ------------------------------------------------------------------------


def _as_alpha(alpha: Any, shape: tuple[int, int] | None = None) -> np.ndarray:
    """``alpha`` as a float64 numpy array ``[L-1, N, N]`` of finite, non-negative numbers.

    Accepts torch tensors (detached to the CPU) and anything numpy can read, so callers can
    pass the edge hypernet's output directly.
    """
    if hasattr(alpha, "detach"):  # a torch tensor, possibly on an accelerator
        alpha = alpha.detach().cpu().double().numpy()
    try:
        arr = np.asarray(alpha, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"alpha must be a numeric [L-1, N, N] array: {exc}") from exc
    if arr.ndim != 3 or arr.shape[0] < 1 or arr.shape[1] < 1 or arr.shape[1] != arr.shape[2]:
        raise UserError(f"alpha must have shape [L-1, N, N], got {list(arr.shape)}")
    if shape is not None and arr.shape[:2] != (shape[1] - 1, shape[0]):
        n, num_layers = shape
        raise UserError(
            f"alpha has shape {list(arr.shape)} but the space needs "
            f"[{num_layers - 1}, {n}, {n}] ({n} tasks x {num_layers} layers)"
        )
    if not np.isfinite(arr).all():
        raise UserError("alpha contains NaN or infinite values")
    if (arr < 0).any():
        raise UserError(f"alpha must be probabilities (>= 0), got a minimum of {arr.min():g}")
    return arr


def _check_budget(budget: Any) -> float:
    """``budget`` as a float in (0, 1]; bools, strings, NaN and infinities are refused."""
    ok = isinstance(budget, numbers.Real) and not isinstance(budget, bool)
    if not ok or not math.isfinite(float(budget)) or not 0.0 < float(budget) <= 1.0:
        raise UserError(f"budget must be in (0, 1], got {budget!r}")
    return float(budget)


def _min_fraction(G: nx.DiGraph) -> float:
    """The smallest float ``b`` with ``b * anchor >= min_flops``: the cheapest tree's budget.

    ``min / anchor`` may round so that multiplying back lands just below the minimum; stepping
    up by ulps makes the returned budget always accepted by :func:`repair`.
    """
    low, anchor = min_flops(G), anchor_flops(G)
    if anchor == 0:  # every cost zero: any budget fits
        return 0.0
    frac = low / anchor
    while frac * anchor < low:
        frac = math.nextafter(frac, math.inf)
    return frac


def _kind(G: nx.DiGraph) -> str:
    """What the space's cheapest member is called: a tree, or with widths a configuration."""
    return "tree" if width_costs(G) is None else "configuration (tree and widths)"


def _check_fits_space(budget: float, G: nx.DiGraph) -> float:
    """The FLOPs limit ``budget * anchor``; an error naming the minimum if no tree fits."""
    anchor, low = anchor_flops(G), min_flops(G)
    limit = budget * anchor
    if limit < low:
        frac = _min_fraction(G)
        shown = math.ceil(frac * 1e4) / 1e4  # rounded up, so the printed value is accepted
        raise UserError(
            f"budget {budget!r} is below the cheapest {_kind(G)} in this space: {shown:.4f} of the "
            f"anchor's FLOPs ({low / 1e6:.6g} MFLOPs, fvcore count)"
        )
    return limit


# -- public API --------------------------------------------------------------------------


def check_budget(budget: Any, G: nx.DiGraph) -> float:
    """``budget`` as a float a tree of ``G`` can meet: in (0, 1] and at least the cheapest
    tree's share of the anchor's FLOPs.

    Raises:
        UserError: otherwise; below the minimum, the message names the minimum.
    """
    budget = _check_budget(budget)
    _check_fits_space(budget, G)
    return budget


def argmax_tree(alpha: Any) -> TreeSpec:
    """The tree of most likely parents: node ``(l, j)`` takes ``argmax_i alpha[l-1, j, i]``.

    This is DYMU's inference rule (METHOD.md 1.4). Ties go to the lowest stream so the
    result does not depend on the platform.

    Args:
        alpha: tensor or array ``[L-1, N, N]``; ``alpha[l-1, j, i]`` is the probability that
            node ``(l, j)`` picks parent ``(l-1, i)``.

    Returns:
        The raw argmax tree, not canonicalised, so it shows every node's choice; call
        ``.canonical()`` to name the network (:func:`derive_tree` does).

    Raises:
        UserError: wrong shape, NaN/inf or negative entries.
    """
    arr = _as_alpha(alpha)
    return TreeSpec(np.argmax(arr, axis=2))  # np.argmax returns the first maximum


def relative_budget(c: Any, G: nx.DiGraph) -> float:
    """DYMU's relative knob ``c`` as a FLOPs fraction: ``b = 1 - c * (1 - min_fraction)``.

    The paper's ``c`` only orders architectures from no sharing (``c = 0``, the anchor) to
    most sharing (``c = 1``, the cheapest tree); mapping it linearly onto the FLOPs range of
    the space lets the paper's protocol run through the same budgeted derivation.

    Raises:
        UserError: ``c`` not a finite number in [0, 1].
    """
    ok = isinstance(c, numbers.Real) and not isinstance(c, bool)
    if not ok or not math.isfinite(float(c)) or not 0.0 <= float(c) <= 1.0:
        raise UserError(f"relative budget c must be in [0, 1], got {c!r}")
    c = float(c)
    if c == 0.0:
        return 1.0
    # max(): the formula never goes below the cheapest tree, even after rounding; the
    # smallest positive float covers a space whose cheapest tree costs nothing.
    return max(1.0 - c * (1.0 - _min_fraction(G)), _min_fraction(G), math.ulp(0.0))


def derive_tree(
    alpha: Any, G: nx.DiGraph, budget: float | None, preference: Any = None
) -> TreeSpec:
    """The argmax tree of ``alpha``, repaired to fit ``budget`` (canonical); with a
    ``preference``, its shared nodes then run the preferred task's stream
    (:func:`preferred_trunks`).

    Args:
        alpha: parent distribution ``[L-1, N, N]`` (see :func:`argmax_tree`).
        G: the space (gives node FLOPs).
        budget: FLOPs fraction of the anchor in (0, 1], or ``None`` for the plain argmax
            tree (the paper's rule).
        preference: ``[N]`` task weights for ``stage1.trunk: preference``, else None.

    Raises:
        UserError: bad alpha, a budget outside (0, 1], or one below the cheapest tree.
    """
    n, num_layers = space_shape(G)
    arr = _as_alpha(alpha, (n, num_layers))
    tree = argmax_tree(arr)
    tree = tree.canonical() if budget is None else repair(tree, G, budget, arr)
    if preference is None:
        return tree
    return preferred_trunks(tree, preference, G, budget)


def preferred_trunks(
    tree: TreeSpec, preference: Any, G: nx.DiGraph, budget: float | None = None
) -> TreeSpec:
    """``tree`` with every shared node moved to the stream of the task ``preference`` weighs
    most among the tasks that node serves (METHOD.md 1.10, lever (a)): the same branching,
    the preferred task's own features in the shared layers. Ties keep the node's stream,
    else go to the lowest task index. A node serving task set S at layer l can move to any
    stream of S: those streams' own nodes at layer l are unused (each task runs one node
    per layer). A moved node keeps its width. Returns ``tree`` itself where the moved tree
    would cost more than ``budget`` (streams of unequal cost).
    """
    r = np.asarray(preference.detach().cpu() if hasattr(preference, "detach") else preference)
    n, num_layers = tree.num_tasks, tree.num_layers
    paths = [tree.path(t) for t in range(n)]  # [N][L] stream of task t's node per layer
    moved = [list(p) for p in paths]
    for layer in range(num_layers):
        for stream in {p[layer] for p in paths}:
            served = [t for t in range(n) if paths[t][layer] == stream]
            best = max(r[t] for t in served)
            if r[stream] == best and stream in served:
                continue
            to = min(t for t in served if r[t] == best)
            for t in served:
                moved[t][layer] = to
    rows = [list(range(n)) for _ in range(num_layers - 1)]  # [L-1][N] parents
    for t in range(n):
        for layer in range(1, num_layers):
            rows[layer - 1][moved[t][layer]] = moved[t][layer - 1]
    widths = None
    if tree.widths is not None:  # [L][N]: each node's width goes where the node goes
        widths = [[1.0] * n for _ in range(num_layers)]
        for t in range(n):
            for layer in range(num_layers):
                widths[layer][moved[t][layer]] = tree.width(layer, paths[t][layer])
    out = TreeSpec(tuple(tuple(r) for r in rows), widths).canonical()
    if budget is not None and out.flops(G) > budget * anchor_flops(G):
        return tree
    return out


def repair(tree: TreeSpec, G: nx.DiGraph, budget: float, alpha: Any = None) -> TreeSpec:
    """Merge branches of ``tree`` until ``FLOPs(tree) <= budget * FLOPs(anchor)``.

    Each step applies the best of the candidate moves that strictly reduce FLOPs:

    1. *Single edits*: a used node ``(l, j)`` takes another parent ``p``.
    2. Only when no single edit helps (every used node feeds two or more children, so moving
       one child prunes nothing): *branch moves*. For a used node ``(l, a)`` below the last
       layer, all its used children move to ``(l, b)``; if ``(l, b)`` was unused it inherits
       ``(l, a)``'s parent, so it replaces ``a`` (a cheaper stream, same chain below).

    "Best" is the most FLOPs saved per unit of log-probability lost under ``alpha``, where
    the loss sums, over the nodes the new tree still runs, ``log alpha`` of the old parent
    (zero for a node that was pruned before) minus ``log alpha`` of the new one. Moves that
    lose nothing rank first (by FLOPs saved); without ``alpha`` the largest saving wins. Ties
    go to the first move in (layer, stream, parent) order, so the result is deterministic.

    Why it terminates and fits: FLOPs are integers and every move strictly lowers them, so
    the loop ends. It cannot stop above the minimum: while FLOPs exceed ``min_flops(G)`` some
    layer ``l < L-1`` runs more than its cheapest node's FLOPs. If it runs two or more nodes,
    one of them costs more than zero, and moving its children onto another used node saves
    at least that cost (the target's chain is already used). If it runs one node, moving its
    children to the layer's cheapest stream (which inherits the parent) saves the difference.
    Both are branch moves, so one always exists, and a limit ``>= min_flops`` is reached.

    Args:
        tree: the tree to repair (any raw parents).
        G: the space.
        budget: FLOPs fraction of the anchor in (0, 1].
        alpha: optional parent distribution ``[L-1, N, N]`` to rank moves by.

    Returns:
        The canonical repaired tree; ``tree.canonical()`` when it already fits.

    Raises:
        UserError: a budget outside (0, 1] or below the cheapest tree, a tree or alpha whose
            shape does not match the space.
    """
    budget = _check_budget(budget)
    n, num_layers = space_shape(G)
    if not isinstance(tree, TreeSpec):
        raise UserError(f"repair needs a TreeSpec, got {type(tree).__name__}")
    if (tree.num_tasks, tree.num_layers) != (n, num_layers):
        raise UserError(
            f"tree has {tree.num_tasks} tasks x {tree.num_layers} layers but the space has "
            f"{n} x {num_layers}"
        )
    limit = _check_fits_space(budget, G)
    logp = None
    if alpha is not None:
        arr = _as_alpha(alpha, (n, num_layers))
        logp = np.log(np.maximum(arr, _PROB_FLOOR)).tolist()  # [L-1][N][N] floats

    flops_table, _, hflops, _ = costs(G)
    heads = sum(hflops)
    parents = _canonical([list(row) for row in tree.parents], n, num_layers)
    used = _used(parents, n, num_layers)
    cost = _cost(used, flops_table) + heads
    while cost > limit:
        search = _Search(parents, used, cost - heads, flops_table, logp, n, num_layers)
        best = search.best(_single_edits(parents, used, n, num_layers))
        if best is None:
            best = search.best(_branch_moves(parents, used, n, num_layers))
        if best is None:  # pragma: no cover - impossible, see the docstring
            raise AssertionError(f"repair is stuck at {cost} FLOPs above {min_flops(G)}")
        parents, used, saved = best
        cost -= saved
    return TreeSpec(parents)


# -- repair internals --------------------------------------------------------------------


def _used(parents: Parents, n: int, num_layers: int) -> list[list[bool]]:
    """Same rule as :meth:`TreeSpec.used`, on plain lists (repair calls it per candidate)."""
    used = [[False] * n for _ in range(num_layers)]
    used[-1] = [True] * n
    for layer in range(num_layers - 1, 0, -1):
        row, below, here = parents[layer - 1], used[layer - 1], used[layer]
        for j in range(n):
            if here[j]:
                below[row[j]] = True
    return used


def _canonical(parents: Parents, n: int, num_layers: int) -> Parents:
    """Unused nodes point at their own stream (as :meth:`TreeSpec.canonical`)."""
    used = _used(parents, n, num_layers)
    return [
        [p if used[layer][j] else j for j, p in enumerate(row)]
        for layer, row in enumerate(parents, start=1)
    ]


def _cost(used: list[list[bool]], flops: list[list[int]]) -> int:
    """FLOPs of the used nodes (heads excluded: every tree runs all of them)."""
    total = 0
    for u_row, f_row in zip(used, flops, strict=True):
        for u, f in zip(u_row, f_row, strict=True):
            if u:
                total += f
    return total


def _single_edits(parents: Parents, used: list[list[bool]], n: int, num_layers: int):
    """Every "used node (l, j) takes parent p" edit, as lists of ``(layer, j, p)`` changes."""
    for layer in range(1, num_layers):
        for j in range(n):
            if not used[layer][j]:
                continue  # an unused node's parent changes nothing
            for p in range(n):
                if p != parents[layer - 1][j]:
                    yield [(layer, j, p)]


def _branch_moves(parents: Parents, used: list[list[bool]], n: int, num_layers: int):
    """Every "children of used (l, a) move to (l, b)" move, as lists of changes.

    When ``(l, b)`` is unused it also takes ``(l, a)``'s parent, so it replaces ``a``
    without pulling in a new chain below.
    """
    for layer in range(num_layers - 1):
        children_row = parents[layer]  # parents of layer + 1
        for a in range(n):
            if not used[layer][a]:
                continue
            kids = [k for k in range(n) if used[layer + 1][k] and children_row[k] == a]
            for b in range(n):
                if b == a:
                    continue
                changes = [(layer + 1, k, b) for k in kids]
                if not used[layer][b] and layer >= 1:
                    changes.append((layer, b, parents[layer - 1][a]))
                yield changes


class _Search:
    """Scores candidate moves against one current tree and keeps the best."""

    def __init__(
        self,
        parents: Parents,
        used: list[list[bool]],
        cost: int,
        flops: list[list[int]],
        logp: list[list[list[float]]] | None,
        n: int,
        num_layers: int,
    ) -> None:
        self.parents, self.used, self.cost, self.flops = parents, used, cost, flops
        self.logp, self.n, self.num_layers = logp, n, num_layers

    def _loss(self, new: Parents, new_used: list[list[bool]]) -> float:
        """Log-probability lost on the nodes ``new`` runs (see :func:`repair`)."""
        logp, old, old_used = self.logp, self.parents, self.used
        loss = 0.0
        for layer in range(1, self.num_layers):
            lp, new_row, old_row = logp[layer - 1], new[layer - 1], old[layer - 1]
            for j in range(self.n):
                if not new_used[layer][j]:
                    continue
                before = lp[j][old_row[j]] if old_used[layer][j] else 0.0
                loss += before - lp[j][new_row[j]]
        return loss

    def best(self, moves) -> tuple[Parents, list[list[bool]], int] | None:
        """The best strictly FLOPs-reducing move: ``(canonical parents, used, saved)``."""
        best_key: tuple[int, float] | None = None
        best = None
        for changes in moves:
            new = [row[:] for row in self.parents]
            for layer, j, p in changes:
                new[layer - 1][j] = p
            new_used = _used(new, self.n, self.num_layers)
            saved = self.cost - _cost(new_used, self.flops)
            if saved <= 0:
                continue
            if self.logp is None:
                key = (1, float(saved))
            else:
                loss = self._loss(new, new_used)
                key = (1, float(saved)) if loss <= _FREE_LOSS else (0, saved / loss)
            if best_key is None or key > best_key:
                best_key, best = key, (new, new_used, saved)
        if best is None:
            return None
        new, new_used, saved = best
        canon = [
            [p if new_used[layer][j] else j for j, p in enumerate(row)]
            for layer, row in enumerate(new, start=1)
        ]
        return canon, new_used, saved
