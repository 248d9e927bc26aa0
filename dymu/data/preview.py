"""Sample grids: each image next to every task's target, to see that labels match images.

matplotlib is imported here, inside the function, so ``import dymu`` stays light.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from dymu.data.base import MultiTaskDataset
from dymu.io import picture_path, save_figure
from dymu.tasks.base import IGNORE_INDEX, TaskSpec


def _palette(n: int) -> np.ndarray:
    """n distinct RGB colours in [0, 1] (tab20, then a deterministic random extension)."""
    from matplotlib import colormaps

    base = np.asarray(colormaps["tab20"].colors)[[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5, 7]]
    if n <= len(base):
        return base[:n]
    extra = np.random.default_rng(0).uniform(0.15, 1.0, (n - len(base), 3))
    return np.concatenate([base, extra])


def render_target(spec: TaskSpec, target: torch.Tensor) -> np.ndarray:
    """An RGB picture [H, W, 3] in [0, 1] of one dense target; invalid pixels are black."""
    from matplotlib import colormaps

    t = target.detach().cpu()
    if spec.kind in ("semseg", "parts"):
        labels = t.numpy().astype(np.int64)  # [H, W]
        colours = _palette(spec.num_classes or int(labels.max()) + 1)
        rgb = colours[np.clip(labels, 0, len(colours) - 1)]
        rgb[labels == IGNORE_INDEX] = 0.0
        return rgb
    if spec.kind == "depth":
        d = t[0].numpy()
        valid = d > 0
        lo, hi = (d[valid].min(), d[valid].max()) if valid.any() else (0.0, 1.0)
        rgb = colormaps["magma_r"]((d - lo) / max(hi - lo, 1e-6))[..., :3]
        rgb[~valid] = 0.0
        return rgb
    if spec.kind == "normals":
        n = t.permute(1, 2, 0).numpy()  # [3, H, W] -> [H, W, 3]
        return np.clip((n + 1.0) / 2.0, 0.0, 1.0) * (np.abs(n).sum(-1, keepdims=True) > 0)
    if spec.kind in ("edges", "saliency"):
        v = t[0].numpy()
        rgb = np.repeat(np.clip(v, 0.0, 1.0)[..., None], 3, -1)
        rgb[v == IGNORE_INDEX] = (0.6, 0.0, 0.0)  # ignored pixels in dark red
        return rgb
    raise ValueError(f"no picture for task kind {spec.kind}")


def _legend(ax, spec: TaskSpec) -> None:
    """Class names under a segmentation column (skipped for long class lists)."""
    from matplotlib.patches import Patch

    if spec.kind not in ("semseg", "parts") or not spec.class_names:
        return
    if len(spec.class_names) > 14:
        return
    colours = _palette(len(spec.class_names))
    handles = [Patch(color=c, label=n) for c, n in zip(colours, spec.class_names, strict=True)]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.03),
        ncol=2,
        fontsize=6,
        frameon=False,
        handlelength=1.0,
        columnspacing=0.8,
    )


def _caption(specs: Sequence[TaskSpec], sample: dict[str, torch.Tensor]) -> str:
    """Classification labels of a sample as text (only tasks that label this sample)."""
    parts = []
    for spec in specs:
        label = int(sample[spec.name])
        if label == IGNORE_INDEX:
            continue
        name = spec.class_names[label] if spec.class_names else str(label)
        parts.append(f"{spec.name}: {name}")
    return "\n".join(parts[:4]) + ("\n..." if len(parts) > 4 else "")


def draw_samples(ds: MultiTaskDataset, indices: Sequence[int], out: str | os.PathLike) -> Path:
    """Draw ``indices`` of ``ds`` as a grid (one row per sample) into ``out`` (atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out = picture_path(out)
    dense = [s for s in ds.tasks if s.kind != "classification"]
    labels = [s for s in ds.tasks if s.kind == "classification"]
    if dense:  # one row per sample: the image, then each dense target
        rows, cols = len(indices), 1 + len(dense)
        cells = [(r, 0) for r in range(rows)]
    else:  # image-level labels only: a grid of captioned images
        cols = min(len(indices), 6)
        rows = -(-len(indices) // cols)
        cells = [divmod(i, cols) for i in range(len(indices))]
    height = 2.1 + (0.25 * min(len(labels), 5) if labels else 0.0)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols, height * rows + 0.5), squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for (r, c0), index in zip(cells, indices, strict=True):
        sample = ds[int(index)]
        image = sample["image"].permute(1, 2, 0).numpy()  # [C, H, W] -> [H, W, C]
        ax = axes[r, c0]
        ax.set_frame_on(True)
        ax.imshow(image, interpolation="nearest")
        ax.set_title(f"#{index}" if not labels else _caption(labels, sample), fontsize=7)
        for c, spec in enumerate(dense, start=1):
            axes[r, c].set_frame_on(True)
            axes[r, c].imshow(render_target(spec, sample[spec.name]), interpolation="nearest")
            if r == 0:
                axes[r, c].set_title(spec.name, fontsize=9)
    for c, spec in enumerate(dense, start=1):
        _legend(axes[rows - 1, c], spec)
    what = "image and every task's target" if dense else "images and their labels"
    fig.suptitle(f"{ds.info.name} ({ds.split}): {what}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out)
    plt.close(fig)
    return out
