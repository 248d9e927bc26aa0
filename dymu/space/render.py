"""Show a tree: where tasks share nodes and where they branch, as text or a picture.

matplotlib is imported inside :func:`tree_png`, so ``import dymu.space`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dymu.errors import UserError
from dymu.io import picture_path, save_figure
from dymu.space.graph import anchor_flops
from dymu.space.tree import TreeSpec

if TYPE_CHECKING:
    import networkx as nx

FLOPS_NOTE = "GFLOPs (fvcore, 1 multiply-add = 1 FLOP)"


def _check_tasks(tree: TreeSpec, tasks: Sequence[str]) -> list[str]:
    tasks = [str(t) for t in tasks]
    if len(tasks) != tree.num_tasks:
        raise UserError(f"tree has {tree.num_tasks} tasks but {len(tasks)} names were given")
    return tasks


def layer_groups(tree: TreeSpec) -> list[list[tuple[int, list[int]]]]:
    """Per layer, the used nodes as ``(stream, tasks whose path runs it)``.

    Groups are ordered by their first task, tasks inside a group by index, so the text
    reads in task order.
    """
    paths = [tree.path(t) for t in range(tree.num_tasks)]
    out = []
    for layer in range(tree.num_layers):
        groups: dict[int, list[int]] = {}
        for t, path in enumerate(paths):
            groups.setdefault(path[layer], []).append(t)
        out.append(sorted(groups.items(), key=lambda item: item[1][0]))
    return out


def tree_text(tree: TreeSpec, tasks: Sequence[str]) -> str:
    """A terminal rendering of ``tree``.

    One line per layer lists the used nodes as ``[tasks sharing it]@stream`` (the stream
    whose weights the node runs, named by its task), followed by ``x0.5`` for a node that
    runs half its channels (a tree with widths), then each task's path from layer 0 to its
    head. Example for 3 tasks where ``b`` and ``c`` share layer 1::

        tree bb9833130b54: 3 tasks, 3 layers, 6 of 9 nodes used
        layer 0: [a b c]@a
        layer 1: [a]@a [b c]@b
        layer 2: [a]@a [b]@b [c]@c
        paths:
          a: a > a > a
          b: a > b > b
          c: a > b > c
    """
    tasks = _check_tasks(tree, tasks)
    used = sum(map(sum, tree.used()))
    total = tree.num_tasks * tree.num_layers
    lines = [
        f"tree {tree.hash()}: {tree.num_tasks} tasks, {tree.num_layers} layers, "
        f"{used} of {total} nodes used"
    ]
    for layer, groups in enumerate(layer_groups(tree)):
        cells = [
            "["
            + " ".join(tasks[t] for t in members)
            + f"]@{tasks[stream]}"
            + ("" if tree.width(layer, stream) == 1.0 else f" x{tree.width(layer, stream):g}")
            for stream, members in groups
        ]
        lines.append(f"layer {layer}: " + " ".join(cells))
    lines.append("paths:")
    width = max(len(t) for t in tasks)
    for t, name in enumerate(tasks):
        path = " > ".join(tasks[s] for s in tree.path(t))
        lines.append(f"  {name + ':':<{width + 1}} {path}")
    return "\n".join(lines)


def tree_png(
    tree: TreeSpec,
    tasks: Sequence[str],
    path: str | os.PathLike,
    G: nx.DiGraph | None = None,
    title: str | None = None,
) -> Path:
    """Draw ``tree`` into ``path`` (atomically) and return the path.

    Layers run left to right (image, layer 0..L-1, heads), streams top to bottom. Used
    nodes are filled in their stream's colour, unused nodes are grey rings; each used
    node has an edge from its parent, drawn in the parent's colour when it crosses
    streams. Task names label the heads; a narrowed node is drawn smaller, labelled with
    its width. With ``G`` the title gives the tree's FLOPs and
    its share of the anchor's.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    tasks = _check_tasks(tree, tasks)
    out = picture_path(path)
    n, num_layers = tree.num_tasks, tree.num_layers
    used = tree.used()
    colours = colormaps["tab10"].colors

    def colour(stream: int):
        return colours[stream % len(colours)]

    def y(stream: int) -> float:
        return float(n - 1 - stream)

    head_x = num_layers + 1.0
    fig, ax = plt.subplots(figsize=(1.3 * (num_layers + 2) + 1.5, 0.6 * n + 1.6))
    # image -> layer 0 (only the used layer-0 nodes read it)
    for j in range(n):
        if used[0][j]:
            ax.plot([0, 1], [(n - 1) / 2, y(j)], color="0.35", lw=1.2, zorder=1)
    # parent edges of used nodes
    for layer in range(1, num_layers):
        for j in range(n):
            if not used[layer][j]:
                continue
            i = tree.parents[layer - 1][j]
            cross = i != j
            ax.plot(
                [layer, layer + 1],
                [y(i), y(j)],
                color=colour(i) if cross else "0.35",
                lw=1.8 if cross else 1.2,
                zorder=1,
            )
    # nodes
    for layer in range(num_layers):
        for j in range(n):
            if used[layer][j]:
                w = tree.width(layer, j)  # a narrowed node is drawn smaller, its width beside
                ax.scatter(
                    layer + 1, y(j), s=160 * w, color=colour(j), edgecolors="black", zorder=3
                )
                if w < 1.0:
                    ax.annotate(
                        f"x{w:g}",
                        (layer + 1, y(j)),
                        xytext=(0, 9),
                        textcoords="offset points",
                        ha="center",
                        fontsize=7,
                    )
            else:
                ax.scatter(layer + 1, y(j), s=160, facecolors="white", edgecolors="0.75", zorder=2)
    # image and heads
    ax.scatter(0, (n - 1) / 2, s=260, marker="s", color="0.2", zorder=3)
    for j, name in enumerate(tasks):
        ax.plot([num_layers, head_x], [y(j), y(j)], color="0.35", lw=1.2, zorder=1)
        ax.scatter(head_x, y(j), s=200, marker="D", color=colour(j), edgecolors="black", zorder=3)
        ax.annotate(name, (head_x, y(j)), xytext=(12, 0), textcoords="offset points", va="center")
    ax.set_xticks(range(num_layers + 2))
    ax.set_xticklabels(["image", *[f"layer {layer}" for layer in range(num_layers)], "heads"])
    ax.set_yticks([y(j) for j in range(n)])
    ax.set_yticklabels([f"stream {j}" for j in range(n)], fontsize=8)
    ax.set_xlim(-0.5, head_x + 1.3)
    ax.set_ylim(-0.7, n - 0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    heading = title if title is not None else f"tree {tree.hash()}"
    if G is not None:
        flops = tree.flops(G)
        share = flops / max(anchor_flops(G), 1)
        heading += f"\n{flops / 1e9:.4g} {FLOPS_NOTE}, {share:.0%} of the anchor"
    ax.set_title(heading, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out
