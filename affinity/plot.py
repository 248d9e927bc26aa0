"""``affinity.png``: the affinity matrix as a heatmap a person can read at a glance.

matplotlib is imported inside the function, so ``import dymu.affinity`` stays light.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from dymu.affinity.result import AffinityResult
from dymu.io import picture_path, save_figure

__all__ = ["affinity_png"]

_SMALL_PER_ROW = 6
"""Per-layer heatmaps per row of small panels; more layers wrap onto further rows."""

_TITLES = {
    "rsa": (
        "Task affinity by RSA",
        "row i = reference task: A[i, j] = 1 - ||S_i - S_j|| / max_k ||S_i - S_k||\n"
        "1 = same as task i, 0 = farthest from task i (rows normalised: not symmetric)",
    ),
    "grad_cosine": (
        "Task affinity by gradient cosine",
        "cos(g_i, g_j) of the task gradients on the shared parameters (symmetric)\n"
        "> 0: a step for one task also descends the other's loss",
    ),
    "lookahead": (
        "Task affinity by lookahead (TAG)",
        "Z[i, j] = (1 - L_j(after a step on task i's gradient) / L_j(before)) / lr\n"
        "> 0: row i's step helps column j; < 0: it hurts (not symmetric)",
    ),
}


def _scale(result: AffinityResult) -> tuple[float, float, str]:
    """One colour scale for all panels: (vmin, vmax, colormap)."""
    values = [v for row in result.mean for v in row]
    values += [v for m in result.per_layer for row in m for v in row]
    if result.method == "rsa":
        return 0.0, 1.0, "viridis"
    if result.method == "grad_cosine":
        return -1.0, 1.0, "RdBu_r"
    top = max(abs(v) for v in values) or 1.0  # lookahead: unbounded, centred on 0
    return -top, top, "RdBu_r"


def _fmt(v: float, method: str) -> str:
    if method == "lookahead" and (abs(v) >= 100 or (0 < abs(v) < 0.01)):
        return f"{v:.1e}"
    return f"{v:.2f}"


def affinity_png(result: AffinityResult, path: str | os.PathLike) -> Path:
    """Draw ``result`` into ``path`` (PNG, written atomically) and return the path.

    The mean matrix is drawn large, with task names on both axes and the value in every
    cell; the per-layer matrices follow as small heatmaps (same task order, one colour
    scale shared with the mean, so colours compare across panels). The title says the
    method and how to read rows and columns.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    path = picture_path(path)
    n = result.num_tasks
    layers = len(result.per_layer)
    vmin, vmax, cmap_name = _scale(result)
    cmap = matplotlib.colormaps[cmap_name]
    norm = matplotlib.colors.Normalize(vmin=vmin, vmax=vmax)

    cols = max(min(layers, _SMALL_PER_ROW), 1)
    small_rows = math.ceil(layers / cols) if layers else 0
    main_size = max(3.2, 0.85 * n + 1.6)  # inches for the large matrix
    width = max(main_size + 3.2, 1.7 * cols + 1.2)
    height = main_size + 1.6 + 1.9 * small_rows
    fig = plt.figure(figsize=(width, height), layout="constrained")
    gs = fig.add_gridspec(
        1 + small_rows,
        cols,
        height_ratios=[main_size] + [1.7] * small_rows,
    )

    # The large mean matrix.
    mean = np.asarray(result.mean)  # [N, N]
    ax = fig.add_subplot(gs[0, :])
    image = ax.imshow(mean, cmap=cmap, norm=norm)
    ax.set_xticks(range(n), result.tasks, rotation=30, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), result.tasks)
    if result.method == "lookahead":
        ax.set_xlabel("column j: task whose loss is measured")
        ax.set_ylabel("row i: task whose gradient takes the step")
    else:
        ax.set_xlabel("column j: task compared")
        ax.set_ylabel("row i: reference task")
    ax.tick_params(length=0)
    size = 11 if n <= 5 else 9 if n <= 8 else 7
    for i in range(n):
        for j in range(n):
            r, g, b, _ = cmap(norm(mean[i, j]))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(
                j,
                i,
                _fmt(mean[i, j], result.method),
                ha="center",
                va="center",
                fontsize=size,
                color="white" if dark else "black",
            )
    title, subtitle = _TITLES[result.method]
    ax.set_title(subtitle, fontsize=8.5)
    if layers > 1:
        title += f" (mean over {layers} layers)"
    meta = ", ".join(f"{k}={v}" for k, v in result.meta.items() if not isinstance(v, (dict, list)))
    fig.suptitle(title + (f"\n{meta}" if meta else ""), fontsize=11)

    # The small per-layer matrices, same order and scale.
    small_axes = []
    for li, m in enumerate(result.per_layer):
        sax = fig.add_subplot(gs[1 + li // cols, li % cols])
        sax.imshow(np.asarray(m), cmap=cmap, norm=norm)  # [N, N]
        sax.set_title(f"layer {li}", fontsize=8)
        sax.set_xticks(range(n), [str(k) for k in range(n)], fontsize=6)
        sax.set_yticks(range(n), [str(k) for k in range(n)], fontsize=6)
        sax.tick_params(length=0, pad=1)
        small_axes.append(sax)
    if small_axes:
        names = ", ".join(f"{k} = {t}" for k, t in enumerate(result.tasks))
        small_axes[0].set_ylabel("task", fontsize=7)
        fig.supxlabel(f"per layer, same order and colours: {names}", fontsize=7.5)

    bar = fig.colorbar(image, ax=[ax, *small_axes], shrink=0.8, pad=0.02)
    bar.set_label({"rsa": "A", "grad_cosine": "cosine", "lookahead": "Z"}[result.method])

    save_figure(fig, path)
    plt.close(fig)
    return path
