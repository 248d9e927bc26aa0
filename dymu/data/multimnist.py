"""MultiMNIST, MultiFashion and Multi-(Fashion+MNIST): two overlapping items, two tasks.

The two-task benchmark of multi-objective MTL (Sener & Koltun, NeurIPS 2018; Lin et al.,
"Pareto Multi-Task Learning", NeurIPS 2019; Navon et al., Pareto HyperNetworks, ICLR 2021):
each image shows a "left" item in the top-left corner and a "right" item towards the
bottom-right, overlapping in the middle; task ``left`` classifies the first, ``right`` the
second. Because the items overlap, features useful for one task are noise for the other,
which is what makes the two tasks conflict.

Construction (one sample per image of the source split; :func:`compose`), following the
public generator of Sener & Koltun (isl-org/MultiObjectiveOptimization,
``multi_task/loaders/multi_mnist_loader.py``): the left 28x28 item at offset (0, 0) and the
right one at (6, 6) of a 36x36 canvas, the pixel-wise max where they overlap, and the
canvas resized back to 28x28 with nearest-neighbour sampling (PIL's NEAREST, pixel
centres). Differences from that generator, deliberately:

* the right partner of image i is ``perm[i]`` for a permutation drawn from
  ``DataConfig.seed`` (as in mit-gfx/ContinuousParetoMTL), not an independent unseeded draw
  per image, so the dataset is reproducible and every image is used once on each side;
* ``scipy.misc.imresize``'s rescaling of the canvas range to 0..255 is not applied (it is
  the identity whenever an item reaches 255, as nearly all MNIST/Fashion items do).

Lin et al. distribute their pickles (36x36 canvases, 120k/20k samples) without the code
that made them; this module generates the data itself from the original idx files.

Images are stored grayscale (uint8 [N, 28, 28], one channel) and returned with the channel
repeated three times, the image convention of :mod:`dymu.tasks.base`.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dymu.config import DataConfig
from dymu.data.base import (
    DATASETS,
    ArrayDataset,
    DatasetBuilder,
    DatasetInfo,
    cache_root,
    check_split,
    holdout_split,
)
from dymu.data.idx import read_idx_images, read_idx_labels
from dymu.data.imageio import resize_images
from dymu.errors import UserError
from dymu.io import atomic_dir, write_json
from dymu.tasks.base import TaskSpec

VERSION = 1
"""Bump when the construction changes, so that old caches are not reused."""

ITEM = 28
"""Side of one source item and of the output image."""
CANVAS = 36
"""Side of the canvas the two items are placed on."""
RIGHT_OFFSET = 6
"""Row and column offset of the right item on the canvas (the left one is at 0)."""

SOURCE_SPLITS = {"train": "train", "test": "t10k"}
"""Split -> file prefix of the original idx files (val is held out of train)."""

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class Source:
    """One of the original idx datasets: where it is looked for and what its classes are."""

    key: str
    folders: tuple[str, ...]
    """Subfolder names of ``data.root`` that may hold its four files (first = canonical)."""
    classes: tuple[str, ...]


MNIST = Source("mnist", ("mnist", "MNIST"), MNIST_CLASSES)
FASHION = Source("fashion", ("fashion-mnist", "fashion_mnist", "FashionMNIST"), FASHION_CLASSES)


def idx_name(split: str, kind: str) -> str:
    """Name (without ``.gz``) of the idx file of ``kind`` (images/labels) for ``split``."""
    return f"{SOURCE_SPLITS[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"


# --------------------------------------------------------------------------- construction


def compose(left: np.ndarray, right: np.ndarray, offset: int = RIGHT_OFFSET) -> np.ndarray:
    """Overlay ``left`` (top-left) and ``right`` (shifted by ``offset``) and resize to 28x28.

    Vectorised over the batch: one canvas array, one max, one interpolate call.

    Args:
        left: uint8 [N, 28, 28] items placed at (0, 0).
        right: uint8 [N, 28, 28] items placed at (offset, offset).
        offset: shift of the right item, at most ``CANVAS - ITEM``.

    Returns:
        uint8 [N, 28, 28]: the 36x36 canvas (pixel-wise max of the two items) sampled at
        the nearest source pixel centre, ``src = floor((dst + 0.5) * 36 / 28)``, which is
        PIL's ``Image.NEAREST`` as used by the reference generator.
    """
    if left.shape != right.shape or left.shape[1:] != (ITEM, ITEM):
        raise ValueError(f"compose needs two [N, 28, 28] arrays, got {left.shape}, {right.shape}")
    n = len(left)
    canvas = np.zeros((n, CANVAS, CANVAS), dtype=np.uint8)
    canvas[:, :ITEM, :ITEM] = left
    window = canvas[:, offset : offset + ITEM, offset : offset + ITEM]
    np.maximum(window, right, out=window)
    x = torch.from_numpy(canvas).unsqueeze(1)  # [N, 36, 36] -> [N, 1, 36, 36]
    y = F.interpolate(x, size=(ITEM, ITEM), mode="nearest-exact")
    return y.squeeze(1).numpy()  # [N, 1, 28, 28] -> [N, 28, 28]


def partners(seed: int, split: str, n_left: int, n_right: int) -> np.ndarray:
    """Index of the right item of each left item: a seeded permutation of the right source.

    Seeded by (seed, split) so that train and test pair differently. When the right source
    is shorter or longer than the left one (never for the original files), the permutation
    is cycled or cut to length.
    """
    rng = np.random.default_rng([seed, list(SOURCE_SPLITS).index(split)])
    return np.resize(rng.permutation(n_right), n_left)


# --------------------------------------------------------------------------- dataset


class MultiMnistBuilder(DatasetBuilder):
    """Builds one of the three variants from the idx files and caches it per seed."""

    def __init__(self, name: str, left: Source, right: Source, description: str) -> None:
        self.left = left
        self.right = right
        if left == right:
            layout = (
                f"ROOT/{left.folders[0]}/ holding the four original *-idx?-ubyte.gz files "
                "(ROOT may also be that folder itself)"
            )
        else:
            layout = (
                f"ROOT/{left.folders[0]}/ and ROOT/{right.folders[0]}/, each holding the four "
                "original *-idx?-ubyte.gz files"
            )
        tasks = (
            TaskSpec("left", "classification", 10, left.classes),
            TaskSpec("right", "classification", 10, right.classes),
        )
        self.info = DatasetInfo(
            name=name,
            description=description,
            tasks=tasks,
            default_tasks=("left", "right"),
            default_size=(ITEM, ITEM),
            source=layout,
            needs_root=True,
            hflip=False,
        )

    # ----------------------------------------------------------------- source files

    def source_dir(self, root: Path, source: Source) -> Path:
        """The folder holding ``source``'s idx files: a known subfolder of root, or root.

        Root itself is accepted only by the single-source variants, where it cannot be
        confused with the other source.
        """
        marker = idx_name("train", "images")
        candidates = [root / f for f in source.folders]
        if self.left == self.right:
            candidates.append(root)
        for folder in candidates:
            if (folder / f"{marker}.gz").is_file() or (folder / marker).is_file():
                return folder
        return root / source.folders[0]

    def source_file(self, folder: Path, split: str, kind: str) -> Path:
        """``folder/<name>.gz`` or ``folder/<name>``; an error naming the ``.gz`` if neither."""
        name = idx_name(split, kind)
        for candidate in (folder / f"{name}.gz", folder / name):
            if candidate.is_file():
                return candidate
        raise UserError(
            f"dataset {self.info.name}: missing file {folder / name}.gz "
            f"(expected layout: {self.info.source})"
        )

    def source_files(self, cfg: DataConfig) -> dict[str, dict[str, tuple[Path, Path]]]:
        """``{"left"|"right": {split: (images, labels)}}`` for both splits, all checked."""
        root = self.root(cfg)
        out: dict[str, dict[str, tuple[Path, Path]]] = {}
        for role, source in (("left", self.left), ("right", self.right)):
            folder = self.source_dir(root, source)
            out[role] = {
                split: (
                    self.source_file(folder, split, "images"),
                    self.source_file(folder, split, "labels"),
                )
                for split in SOURCE_SPLITS
            }
        return out

    def read_source(self, images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
        """uint8 items [N, 28, 28] and labels [N] of one source split, cross-checked."""
        x = read_idx_images(images)
        y = read_idx_labels(labels)
        if x.shape[1:] != (ITEM, ITEM):
            raise UserError(f"{images}: items are {x.shape[1]}x{x.shape[2]}, expected 28x28")
        if len(x) != len(y):
            raise UserError(
                f"dataset {self.info.name}: {images} holds {len(x)} images but {labels} holds "
                f"{len(y)} labels"
            )
        if len(y) and y.max() > 9:
            raise UserError(f"{labels}: labels must be 0..9, found {int(y.max())}")
        if len(x) == 0:
            raise UserError(f"{images}: the file holds no images")
        return x, y

    # ----------------------------------------------------------------- cache

    def cache_dir(self, cfg: DataConfig, files: dict[str, dict[str, tuple[Path, Path]]]) -> Path:
        """``cache_root/<name>-<hash>``; the hash covers what the content depends on."""
        identity = {
            "name": self.info.name,
            "version": VERSION,
            "seed": cfg.seed,
            "offset": RIGHT_OFFSET,
            "files": {
                role: {
                    split: [[p.name, p.stat().st_size] for p in paths]
                    for split, paths in per_split.items()
                }
                for role, per_split in files.items()
            },
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return cache_root(cfg) / f"{self.info.name}-{digest[:12]}"

    def generate(self, cfg: DataConfig, dest: Path, files: dict[str, Any]) -> None:
        """Compose both splits and write them into ``dest`` atomically."""
        with atomic_dir(dest) as tmp:
            summary: dict[str, int] = {}
            for split in SOURCE_SPLITS:
                left_x, left_y = self.read_source(*files["left"][split])
                if self.left == self.right:
                    right_x, right_y = left_x, left_y
                else:
                    right_x, right_y = self.read_source(*files["right"][split])
                pick = partners(cfg.seed, split, len(left_x), len(right_x))
                np.savez_compressed(
                    tmp / f"{split}.npz",
                    image=compose(left_x, right_x[pick]),
                    left=left_y,
                    right=right_y[pick],
                    partner=pick.astype(np.int64),
                )
                summary[split] = len(left_x)
            write_json(
                tmp / "meta.json",
                {
                    "dataset": self.info.name,
                    "version": VERSION,
                    "seed": cfg.seed,
                    "sizes": summary,
                    "sources": {
                        role: {s: [str(p) for p in paths] for s, paths in per.items()}
                        for role, per in files.items()
                    },
                },
            )

    def ensure_cache(self, cfg: DataConfig) -> Path:
        """The cache folder for ``cfg``, generated first when absent."""
        files = self.source_files(cfg)
        dest = self.cache_dir(cfg, files)
        wanted = [dest / f"{split}.npz" for split in SOURCE_SPLITS]
        if all(p.is_file() for p in wanted):
            return dest
        if dest.exists():
            raise UserError(
                f"dataset {self.info.name}: cache folder {dest} is incomplete; delete it to "
                "regenerate"
            )
        self.generate(cfg, dest, files)
        return dest

    def read_cache(
        self, path: Path, keys: Sequence[str] = ("image", "left", "right")
    ) -> dict[str, np.ndarray]:
        """``keys`` of one cached split: ``image`` [N, 28, 28], ``left`` / ``right`` [N]."""
        try:
            with np.load(path) as npz:  # members are decompressed only when read
                arrays = {k: npz[k] for k in keys}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise UserError(
                f"dataset {self.info.name}: cache file {path} is unreadable ({exc}); delete "
                f"{path.parent} to regenerate"
            ) from None
        return arrays

    # ----------------------------------------------------------------- contract

    def split_rows(self, cfg: DataConfig, split: str, n: int) -> np.ndarray | None:
        """Rows of the cached source split that form ``split`` (None = all of them)."""
        if split == "test":
            return None
        train, val = holdout_split(n, cfg.val_fraction, cfg.seed)
        return train if split == "train" else val

    def load(self, cfg: DataConfig, split: str) -> ArrayDataset:
        split = check_split(split)
        tasks = self.info.select(cfg.tasks)
        cached = self.read_cache(
            self.ensure_cache(cfg) / f"{'test' if split == 'test' else 'train'}.npz"
        )
        rows = self.split_rows(cfg, split, len(cached["image"]))
        if rows is not None:
            cached = {k: v[rows] for k, v in cached.items()}
        image = cached["image"][..., None]  # [N, 28, 28] -> [N, 28, 28, 1]
        size: Sequence[int] = cfg.size or self.info.default_size
        arrays = {
            "image": resize_images(image, size),
            "left": cached["left"],
            "right": cached["right"],
        }
        return ArrayDataset(self.info, split, tasks, arrays)

    def prepare(self, cfg: DataConfig, progress: bool = False) -> dict[str, Any]:
        """Generate the cache (when absent) and report the split sizes."""
        self.info.select(cfg.tasks)
        cache = self.ensure_cache(cfg)
        n_train = len(self.read_cache(cache / "train.npz", ["left"])["left"])
        n_test = len(self.read_cache(cache / "test.npz", ["left"])["left"])
        _, val = holdout_split(n_train, cfg.val_fraction, cfg.seed)
        return {
            "dataset": self.info.name,
            "root": str(self.root(cfg)),
            "cache": str(cache),
            "splits": {"train": n_train - len(val), "val": len(val), "test": n_test},
        }


DATASETS.register("multimnist")(
    MultiMnistBuilder("multimnist", MNIST, MNIST, "MultiMNIST: two overlapping MNIST digits")
)
DATASETS.register("multifashion")(
    MultiMnistBuilder(
        "multifashion", FASHION, FASHION, "MultiFashion: two overlapping Fashion-MNIST items"
    )
)
DATASETS.register("multifashion_mnist")(
    MultiMnistBuilder(
        "multifashion_mnist",
        MNIST,
        FASHION,
        "Multi-(Fashion+MNIST): an MNIST digit (left) over a Fashion-MNIST item (right)",
    )
)
