"""Derive a (tree, widths) configuration from parent and width distributions and a budget.

In a slimmable space (METHOD.md 1.11) the edge hypernet predicts, beside each node's parent
distribution ``alpha``, a distribution ``omega`` over the widths the node may run at. The
derived configuration starts from the argmax of both and, while it costs more than the
budget, applies the move that gives up the least log-probability per FLOP saved, on
either axis:

- *narrow* a used node by one width step (its own cost falls, and so does every child's
  and head's that reads it);
- *merge* branches, the tree moves of :func:`dymu.space.derive.repair` (a node takes
  another parent; or all children of a node move to another node of its layer), each
  node keeping its width.

The log-probability lost sums, over the nodes the new configuration runs, the old choice's
log-probability (zero for a node not run before) minus the new one's, parents and widths
alike. Moves that lose nothing rank first, by FLOPs saved; ties go to the first move in a
fixed order (narrowing first, then tree moves in (layer, stream, parent) order), so the
result is deterministic.

A configuration within the budget may leave part of it unspent (the argmax was cheaper,
or a merge saved more than needed). :func:`spend_budget` then widens used nodes, one step
at a time, where ``omega`` minds it least per FLOP, until no step fits: a user who grants
FLOPs gets them spent on the nodes the hypernetwork ranks next.

The repair always ends within the budget when the budget is at least :func:`min_flops`: every move
strictly lowers an integer cost; while some used node is wider than the narrowest width a
narrowing move exists; once all are narrowest, the node costs are those of the narrowest
table and the tree moves reach the cheapest tree as in :func:`~dymu.space.derive.repair`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dymu.errors import UserError
from dymu.space.derive import (
    _FREE_LOSS,
    _PROB_FLOOR,
    _as_alpha,
    _branch_moves,
    _check_budget,
    _check_fits_space,
    _single_edits,
    _used,
    preferred_trunks,
)
from dymu.space.graph import WidthCosts, space_shape, width_costs
from dymu.space.tree import TreeSpec

Levels = list[list[int]]  # [L][N] index into the space's widths


def _as_omega(omega: Any, n: int, num_layers: int, k: int) -> np.ndarray:
    """``omega`` as a float64 array ``[L, N, K]`` of finite, non-negative numbers."""
    if hasattr(omega, "detach"):
        omega = omega.detach().cpu().double().numpy()
    try:
        arr = np.asarray(omega, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise UserError(f"omega must be a numeric [L, N, K] array: {exc}") from exc
    if arr.shape != (num_layers, n, k):
        raise UserError(
            f"omega has shape {list(arr.shape)} but the space needs [{num_layers}, {n}, {k}] "
            f"({num_layers} layers x {n} tasks x {k} widths)"
        )
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise UserError("omega must hold finite probabilities (>= 0)")
    return arr


class _Pricer:
    """The exact cost of a configuration on plain lists (the search prices thousands)."""

    def __init__(self, wc: WidthCosts, n: int, num_layers: int) -> None:
        self.node, self.head, self.low = wc.node_flops, wc.head_flops, wc.low_layers
        self.n, self.num_layers = n, num_layers

    def __call__(self, parents: list[list[int]], level: Levels, used: list[list[bool]]) -> int:
        total = 0
        for layer in range(self.num_layers):
            for j in range(self.n):
                if used[layer][j]:
                    a = 0 if layer == 0 else level[layer - 1][parents[layer - 1][j]]
                    total += self.node[layer][j][a][level[layer][j]]
        last = self.num_layers - 1
        for j, low in enumerate(self.low):
            c = 0
            if low is not None:
                s = j
                for layer in range(last, low, -1):  # walk task j's path down to layer low
                    s = parents[layer - 1][s]
                c = level[low][s]
            total += self.head[j][level[last][j]][c]
        return total


def derive_configuration(
    alpha: Any,
    omega: Any,
    G,
    budget: float | None,
    spend: bool = True,
    preference: Any = None,
) -> TreeSpec:
    """The argmax parents and widths, repaired to ``budget`` on both axes (canonical); with
    ``spend``, then widened where ``omega`` minds it least while the budget allows
    (:func:`spend_budget`); with a ``preference``, shared nodes then run the preferred
    task's stream, each at its width (:func:`~dymu.space.derive.preferred_trunks`, as
    ``stage1.trunk: preference`` does for trees).

    Args:
        alpha: parent distribution ``[L-1, N, N]`` (see :func:`~dymu.space.derive.argmax_tree`).
        omega: width distribution ``[L, N, K]``; ``omega[l, j, k]`` is the probability that
            node ``(l, j)`` runs at the space's ``k``-th width (ascending).
        G: a slimmable space (:func:`~dymu.space.graph.width_costs` is not None).
        budget: FLOPs fraction of the anchor in (0, 1], or None for the plain argmax.
        spend: widen nodes into a budget the argmax leaves unspent.
        preference: ``[N]`` task weights, or None to keep the streams the argmax gives.

    Raises:
        UserError: a space without widths, bad shapes or values, a budget outside (0, 1]
            or below the cheapest configuration.
    """
    wc = width_costs(G)
    if wc is None:
        raise UserError("this space has no widths: derive a tree with derive_tree")
    n, num_layers = space_shape(G)
    k = len(wc.widths)
    a = _as_alpha(alpha, (n, num_layers))
    w = _as_omega(omega, n, num_layers, k)
    parents = np.argmax(a, axis=2).tolist()  # [L-1][N]
    level = np.argmax(w, axis=2).tolist()  # [L][N]
    if budget is not None:
        parents, level = repair_configuration(parents, level, G, budget, a, w)
        if spend:
            level = spend_budget(parents, level, G, budget, w)
    widths = [[wc.widths[i] for i in row] for row in level]
    config = TreeSpec(parents, widths).canonical()
    if preference is None:
        return config
    return preferred_trunks(config, preference, G, budget)


def repair_configuration(
    parents: list[list[int]],
    level: Levels,
    G,
    budget: float,
    alpha: np.ndarray | None = None,
    omega: np.ndarray | None = None,
) -> tuple[list[list[int]], Levels]:
    """``(parents, width levels)`` moved within ``budget`` (see the module docstring)."""
    budget = _check_budget(budget)
    wc = width_costs(G)
    if wc is None:
        raise UserError("this space has no widths: repair a tree with repair")
    n, num_layers = space_shape(G)
    limit = _check_fits_space(budget, G)
    logp = None if alpha is None else np.log(np.maximum(alpha, _PROB_FLOOR)).tolist()
    logw = None if omega is None else np.log(np.maximum(omega, _PROB_FLOOR)).tolist()
    price = _Pricer(wc, n, num_layers)
    parents = [list(row) for row in parents]
    level = [list(row) for row in level]
    used = _used(parents, n, num_layers)
    cost = price(parents, level, used)
    while cost > limit:
        best = None
        for group in (_narrowings, _single_moves, _branch_group):  # branches: last resort
            candidates = group(parents, level, used, n, num_layers)
            if group is _branch_group and best is not None:
                break
            for new_parents, new_level in candidates:
                new_used = _used(new_parents, n, num_layers)
                saved = cost - price(new_parents, new_level, new_used)
                if saved <= 0:
                    continue
                if logp is None and logw is None:
                    key = (1, float(saved))
                else:
                    old, new = (parents, level, used), (new_parents, new_level, new_used)
                    lost = _lost(old, new, logp, logw)
                    key = (1, float(saved)) if lost <= _FREE_LOSS else (0, saved / lost)
                if best is None or key > best[0]:
                    best = (key, new_parents, new_level, new_used, saved)
        if best is None:  # pragma: no cover - impossible, see the module docstring
            raise AssertionError(f"repair is stuck at {cost} FLOPs")
        _, parents, level, used, saved = best
        cost -= saved
    return parents, level


def spend_budget(
    parents: list[list[int]], level: Levels, G, budget: float, omega: np.ndarray | None = None
) -> Levels:
    """``level`` widened one node and one step at a time while the configuration stays
    within ``budget``: each time the widening that loses the least log-probability under
    ``omega`` per FLOP it adds (the most FLOPs without ``omega``; ties to the first node in
    (layer, stream) order). Ends when no used node can widen within the budget, so a
    fitting configuration leaves no width step unspent. The tree is not changed.
    """
    wc = width_costs(G)
    if wc is None:
        raise UserError("this space has no widths: there is nothing to widen")
    n, num_layers = space_shape(G)
    limit = _check_fits_space(_check_budget(budget), G)
    logw = None if omega is None else np.log(np.maximum(omega, _PROB_FLOOR)).tolist()
    price = _Pricer(wc, n, num_layers)
    used = _used(parents, n, num_layers)
    level = [list(row) for row in level]
    cost = price(parents, level, used)
    top = len(wc.widths) - 1
    while True:
        best = None
        for layer in range(num_layers):
            for j in range(n):
                if not used[layer][j] or level[layer][j] >= top:
                    continue
                level[layer][j] += 1
                added = price(parents, level, used) - cost
                level[layer][j] -= 1
                if added <= 0 or cost + added > limit:
                    continue
                if logw is None:
                    key = float(added)
                else:
                    here = logw[layer][j]
                    lost = here[level[layer][j]] - here[level[layer][j] + 1]
                    key = -lost / added
                if best is None or key > best[0]:
                    best = (key, layer, j, added)
        if best is None:
            return level
        _, layer, j, added = best
        level[layer][j] += 1
        cost += added


def widened_from_narrowest(
    tree: TreeSpec, G, budget: float, omega: np.ndarray | None = None
) -> TreeSpec | None:
    """``tree``'s parents with every node at the narrowest width, then widened by
    :func:`spend_budget` under ``omega`` while within ``budget`` (canonical); None when
    the tree does not fit even at the narrowest widths."""
    wc = width_costs(G)
    if wc is None:
        raise UserError("this space has no widths: there is nothing to widen")
    n, num_layers = tree.num_tasks, tree.num_layers
    narrowest = TreeSpec(tree.parents, [[wc.widths[0]] * n for _ in range(num_layers)])
    if narrowest.flops(G) > _check_fits_space(_check_budget(budget), G):
        return None
    parents = [list(row) for row in tree.parents]
    zero = [[0] * n for _ in range(num_layers)]  # [L][N] levels: the narrowest
    level = spend_budget(parents, zero, G, budget, omega)
    return TreeSpec(parents, [[wc.widths[i] for i in row] for row in level]).canonical()


def _narrowings(parents, level, used, n: int, num_layers: int):
    """Every used node one width step narrower."""
    for layer in range(num_layers):
        for j in range(n):
            if used[layer][j] and level[layer][j] > 0:
                new_level = [row[:] for row in level]
                new_level[layer][j] -= 1
                yield parents, new_level


def _applied(parents, changes) -> list[list[int]]:
    """A copy of ``parents`` with every ``(layer, node, new parent)`` change made."""
    new = [row[:] for row in parents]
    for layer, j, p in changes:
        new[layer - 1][j] = p
    return new


def _apply(parents, level, moves):
    for changes in moves:
        yield _applied(parents, changes), level


def _single_moves(parents, level, used, n: int, num_layers: int):
    """A used node takes another parent, keeping its width."""
    return _apply(parents, level, _single_edits(parents, used, n, num_layers))


def _branch_group(parents, level, used, n: int, num_layers: int):
    """All children of a used node ``(l, a)`` move to ``(l, b)`` (only when no narrowing and
    no single edit saves anything, as in :func:`~dymu.space.derive.repair`); an unused
    ``(l, b)`` replaces ``a``: it takes ``a``'s parent and ``a``'s width, so the move never
    brings in a wider node than the one it removes."""
    for changes in _branch_moves(parents, used, n, num_layers):
        new = _applied(parents, changes)
        new_level = level
        child_layer, kid, b = changes[0]  # a child's move to its new parent (l, b)
        layer = child_layer - 1
        if not used[layer][b]:
            a = parents[layer][kid]  # the children's old parent (l, a)
            new_level = [row[:] for row in level]
            new_level[layer][b] = level[layer][a]
        yield new, new_level


def _lost(old, new, logp, logw) -> float:
    """Log-probability lost on the nodes the new configuration runs (module docstring)."""
    (old_parents, old_level, old_used), (new_parents, new_level, new_used) = old, new
    lost = 0.0
    for layer, row in enumerate(new_used):
        for j, runs in enumerate(row):
            if not runs:
                continue
            was = old_used[layer][j]
            if logw is not None:
                before = logw[layer][j][old_level[layer][j]] if was else 0.0
                lost += before - logw[layer][j][new_level[layer][j]]
            if logp is not None and layer >= 1:
                lp = logp[layer - 1][j]
                before = lp[old_parents[layer - 1][j]] if was else 0.0
                lost += before - lp[new_parents[layer - 1][j]]
    return lost


def preference_omega(tree: TreeSpec, preference: Any, k: int, strength: float) -> np.ndarray:
    """A width distribution ``[L, N, K]`` that follows a preference (ECMT's rule in a tree):
    node (l, j) serves the tasks whose paths run through it, and each width step wider is
    worth ``strength`` times their summed weight in log-probability,

        omega[l, j, :] = softmax(strength * served(l, j) * [0, 1, ..., K-1]),

    so :func:`derive_configuration` narrows first the nodes that serve the tasks the
    preference weighs least (per FLOP saved) and spends a spare budget on the ones it
    weighs most. An unused node counts its own stream's task.
    """
    r = np.asarray(preference.detach().cpu() if hasattr(preference, "detach") else preference)
    r = r.astype(np.float64)
    n, num_layers = tree.num_tasks, tree.num_layers
    if r.shape != (n,):
        raise UserError(f"preference must have {n} entries, got shape {list(r.shape)}")
    served = np.tile(r, (num_layers, 1))  # [L, N]: unused nodes, their own task
    used = tree.used()
    paths = [tree.path(t) for t in range(n)]
    for layer in range(num_layers):
        for j in range(n):
            if used[layer][j]:
                served[layer, j] = sum(r[t] for t in range(n) if paths[t][layer] == j)
    logits = strength * served[..., None] * np.arange(k)  # [L, N, K]
    logits -= logits.max(-1, keepdims=True)
    omega = np.exp(logits)
    return omega / omega.sum(-1, keepdims=True)
