"""NYU-v2 for multi-task learning, read from either of its two circulating on-disk layouts.

The two layouts carry different label sets, so each has its own :class:`DatasetInfo`:

``npy`` -- the preprocessed release of MTAN / LibMTL / Auto-Lambda (13 classes)::

    root/{train,val}/image/<i>.npy    float [288, 384, 3] in [0, 1]
    root/{train,val}/label/<i>.npy    float [288, 384], classes 0..12, -1 = ignore
    root/{train,val}/depth/<i>.npy    float [288, 384, 1], 0 = no measurement
    root/{train,val}/normal/<i>.npy   float [288, 384, 3] in [-1, 1], all-zero = invalid

  (as read by ``NYUv2`` in lorenmt/mtan ``im2im_pred/create_dataset.py`` and
  median-research-group/LibMTL ``examples/nyu/create_dataset.py``). ``<i>`` are integer
  stems, sorted numerically here.

``nyud_mt`` -- the multi-task PASCAL-style release (``NYUD_MT`` of facebookresearch/astmt
  and SimonVandenhende/Multi-Task-Learning-PyTorch ``data/nyud.py``; 40 classes)::

    root/images/<id>.jpg              RGB, 480 x 640
    root/segmentation/<id>.png        0 = void, 1..40 = the NYU-40 classes
    root/depth/<id>.npy               float [H, W] (metres), 0 = no measurement
    root/normals/<id>.npy             float [H, W, 3] in [-1, 1], all-zero = invalid
    root/edge/<id>.npy                float [H, W] in {0, 1}
    root/gt_sets/{train,val}.txt      one id per line

  The reference ``_load_semseg`` maps 0 -> 255 (ignore) and v -> v - 1, so classes are
  0..39; here 0 (and an explicit 255) become the ignore value -1.

Splits (both layouts): the train set minus a deterministic ``data.val_fraction`` hold-out
(seeded by ``data.seed``) is ``train``, the hold-out is ``val``, and the release's ``val``
set (654 images, the standard evaluation protocol) is ``test``.

Two names are registered: ``nyuv2`` detects the layout from the folder and serves both
(the loaded dataset's ``.info``, and :meth:`NYUv2Builder.info_for`, describe the detected
layout; the builder's static ``.info`` describes the 13-class ``npy`` layout), and
``nyud_mt`` accepts only the 40-class layout, so that its static ``.info`` is exact for
code that builds heads before it has a folder.

Sizes: ``data.size`` null keeps the native size (288 x 384 for ``npy``, 480 x 640 for
``nyud_mt``; targets whose size differs from their image are first brought to the image's
size by nearest neighbour, as the reference does); ``[H, W]`` resizes the image bilinearly
and targets by nearest neighbour.
"""

from __future__ import annotations

import dataclasses
import functools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dymu.config import DataConfig
from dymu.data.base import (
    DATASETS,
    DatasetBuilder,
    DatasetInfo,
    FileDataset,
    check_split,
    holdout_split,
    require_file,
)
from dymu.data.imageio import (
    image_tensor,
    malformed,
    npy_shape,
    read_npy,
    read_png,
    read_rgb,
    unit_normals,
)
from dymu.errors import UserError
from dymu.tasks.base import IGNORE_INDEX, TaskSpec

NYU13_CLASSES = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa",
    "table", "tv", "wall", "window",
)  # fmt: skip
"""The 13 classes of Couprie et al. / Eigen & Fergus, in the order of the npy labels."""

NYU40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
    "pillow", "mirror", "floor mat", "clothes", "ceiling", "books", "refridgerator",
    "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
    "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)  # fmt: skip
"""The 40 classes of Gupta et al. (png value v is class v - 1)."""

NPY_SOURCE = "train|val/{image,label,depth,normal}/<i>.npy (MTAN/LibMTL preprocessed NYU-v2)"
MT_SOURCE = (
    "images/<id>.jpg, segmentation/<id>.png, {depth,normals,edge}/<id>.npy, "
    "gt_sets/{train,val}.txt (NYUD_MT)"
)

DEPTH = TaskSpec("depth", "depth")
NORMALS = TaskSpec("normals", "normals")

NYUV2_INFO = DatasetInfo(
    name="nyuv2",
    description="NYU-v2 indoor scenes: 13-class segmentation, depth, surface normals",
    tasks=(TaskSpec("semseg", "semseg", 13, NYU13_CLASSES), DEPTH, NORMALS),
    default_tasks=("semseg", "depth", "normals"),
    default_size=(288, 384),
    source=f"{NPY_SOURCE}; or {MT_SOURCE}",
    needs_root=True,
    hflip=True,
)

NYUD_MT_INFO = DatasetInfo(
    name="nyud_mt",
    description="NYU-v2 multi-task release: 40-class segmentation, depth, normals, edges",
    tasks=(
        TaskSpec("semseg", "semseg", 40, NYU40_CLASSES),
        DEPTH,
        NORMALS,
        TaskSpec("edges", "edges"),
    ),
    default_tasks=("semseg", "depth", "normals", "edges"),
    default_size=(480, 640),
    source=MT_SOURCE,
    needs_root=True,
    hflip=True,
)


# --------------------------------------------------------------------------- decoding


def _plane(array: np.ndarray, path: Path, dataset: str) -> np.ndarray:
    """[H, W] or [H, W, 1] -> [H, W]; anything else is malformed."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]  # [H, W, 1] -> [H, W]
    if array.ndim != 2:
        raise malformed(path, dataset, f"expected shape [H, W] or [H, W, 1], got {array.shape}")
    return array


def _check_hw(array: np.ndarray, hw: tuple[int, ...] | None, path: Path, dataset: str) -> None:
    if hw is not None and tuple(array.shape[:2]) != tuple(hw):
        raise malformed(
            path, dataset, f"size {tuple(array.shape[:2])} differs from its image's {tuple(hw)}"
        )


def _depth(array: np.ndarray, path: Path, dataset: str) -> torch.Tensor:
    """Depth [H, W] (or [H, W, 1]) -> float32 [1, H, W]; NaN/inf become 0 (no measurement)."""
    d = _plane(array, path, dataset).astype(np.float32)
    d[~np.isfinite(d)] = 0.0
    if d.size and d.min() < 0:
        raise malformed(path, dataset, f"negative depth ({float(d.min()):g})")
    return torch.from_numpy(d).unsqueeze(0)  # [H, W] -> [1, H, W]


def _normals(array: np.ndarray, path: Path, dataset: str) -> torch.Tensor:
    """Normals [H, W, 3] -> unit float32 [3, H, W], all-zero where invalid."""
    if array.ndim != 3 or array.shape[2] != 3:
        raise malformed(path, dataset, f"expected shape [H, W, 3], got {array.shape}")
    n = array.astype(np.float32)
    if not np.isfinite(n).all():
        raise malformed(path, dataset, "contains NaN or infinite normals")
    return torch.from_numpy(unit_normals(n)).permute(2, 0, 1)  # [H, W, 3] -> [3, H, W]


def _edges(array: np.ndarray, path: Path, dataset: str) -> torch.Tensor:
    """Edge map [H, W] (or [H, W, 1]) in [0, 1] -> float32 [1, H, W]."""
    e = _plane(array, path, dataset).astype(np.float32)
    if e.size and not (np.isfinite(e).all() and e.min() >= 0.0 and e.max() <= 1.0):
        raise malformed(path, dataset, "edge values must lie in [0, 1]")
    return torch.from_numpy(e).unsqueeze(0)  # [H, W] -> [1, H, W]


def _class_ids(values: np.ndarray, path: Path, dataset: str) -> np.ndarray:
    """Float or int label values -> int64, rejecting non-integers."""
    if np.issubdtype(values.dtype, np.floating) and not (
        np.isfinite(values).all() and np.array_equal(values, np.rint(values))
    ):
        raise malformed(path, dataset, "class ids must be integers")
    return values.astype(np.int64)


# --------------------------------------------------------------------------- layouts


class _Layout(ABC):
    """One on-disk layout: which samples a source split lists and how to read one."""

    key: str
    info: DatasetInfo

    def __init__(self, root: Path, dataset: str) -> None:
        self.root = root
        self.dataset = dataset

    def folder(self, path: Path) -> Path:
        if not path.is_dir():
            raise UserError(f"dataset {self.dataset}: folder {path} does not exist")
        return path

    @abstractmethod
    def ids(self, source: str, tasks: Sequence[TaskSpec]) -> list[str]:
        """Ids of source split ``train``/``val``, after checking their files exist."""

    @abstractmethod
    def files(self, source: str, sid: str, tasks: Sequence[TaskSpec]) -> dict[str, Path]:
        """``{"image": path, task: path}`` of one sample."""

    @abstractmethod
    def read(self, source: str, sid: str, tasks: Sequence[TaskSpec]) -> dict[str, torch.Tensor]:
        """One sample in the conventions of :mod:`dymu.tasks.base`, at its native size."""

    @abstractmethod
    def check_headers(self, source: str, sid: str, tasks: Sequence[TaskSpec]) -> None:
        """Cheap shape checks of one sample's files (headers only) for ``prepare``."""


class _NpyLayout(_Layout):
    """``root/{train,val}/{image,label,depth,normal}/<i>.npy`` (13 classes, -1 ignore)."""

    key = "npy"
    info = NYUV2_INFO
    FOLDERS: ClassVar[dict[str, str]] = {"semseg": "label", "depth": "depth", "normals": "normal"}

    def _stems(self, folder: Path) -> set[str]:
        stems = set()
        for path in self.folder(folder).glob("*.npy"):
            if not (path.stem.isascii() and path.stem.isdigit()):
                raise UserError(
                    f"dataset {self.dataset}: unexpected file {path} (expected <integer>.npy)"
                )
            stems.add(path.stem)
        return stems

    def ids(self, source: str, tasks: Sequence[TaskSpec]) -> list[str]:
        base = self.folder(self.root / source)
        image = self._stems(base / "image")
        if not image:
            raise UserError(f"dataset {self.dataset}: no .npy files in {base / 'image'}")
        for spec in tasks:
            sub = self.FOLDERS[spec.name]
            found = self._stems(base / sub)
            missing = sorted(image - found, key=int)
            if missing:
                raise UserError(
                    f"dataset {self.dataset}: missing file {base / sub / (missing[0] + '.npy')}"
                )
            extra = sorted(found - image, key=int)
            if extra:
                raise UserError(
                    f"dataset {self.dataset}: missing file {base / 'image' / (extra[0] + '.npy')}"
                )
        return sorted(image, key=int)

    def files(self, source: str, sid: str, tasks: Sequence[TaskSpec]) -> dict[str, Path]:
        base = self.root / source
        out = {"image": base / "image" / f"{sid}.npy"}
        for spec in tasks:
            out[spec.name] = base / self.FOLDERS[spec.name] / f"{sid}.npy"
        return out

    def read(self, source: str, sid: str, tasks: Sequence[TaskSpec]) -> dict[str, torch.Tensor]:
        files = self.files(source, sid, tasks)
        name = self.dataset
        path = files["image"]
        image = read_npy(path, name)
        if image.ndim != 3 or image.shape[2] != 3:
            raise malformed(path, name, f"expected shape [H, W, 3], got {image.shape}")
        if image.dtype != np.uint8:
            image = image.astype(np.float32)
            if image.size and not (
                np.isfinite(image).all() and image.min() >= -1e-3 and image.max() <= 1 + 1e-3
            ):
                raise malformed(path, name, "image values must lie in [0, 1]")
        hw = image.shape[:2]
        out = {"image": image_tensor(image)}
        for spec in tasks:
            path = files[spec.name]
            array = read_npy(path, name)
            if spec.name == "semseg":
                label = _class_ids(_plane(array, path, name), path, name)
                _check_hw(label, hw, path, name)
                if label.size and (label.min() < IGNORE_INDEX or label.max() >= spec.num_classes):
                    raise malformed(
                        path, name, f"class ids must be -1 (ignore) or 0..{spec.num_classes - 1}"
                    )
                out["semseg"] = torch.from_numpy(label)
            elif spec.name == "depth":
                out["depth"] = _depth(array, path, name)
                _check_hw(array, hw, path, name)
            else:
                out["normals"] = _normals(array, path, name)
                _check_hw(array, hw, path, name)
        return out

    def check_headers(self, source: str, sid: str, tasks: Sequence[TaskSpec]) -> None:
        files = self.files(source, sid, tasks)
        shape = npy_shape(files["image"], self.dataset)
        if len(shape) != 3 or shape[2] != 3:
            raise malformed(files["image"], self.dataset, f"expected [H, W, 3], got {shape}")
        expected = {
            "semseg": ((*shape[:2],), (*shape[:2], 1)),
            "depth": ((*shape[:2],), (*shape[:2], 1)),
            "normals": ((*shape[:2], 3),),
        }
        for spec in tasks:
            got = npy_shape(files[spec.name], self.dataset)
            if got not in expected[spec.name]:
                want = " or ".join(str(list(s)) for s in expected[spec.name])
                raise malformed(files[spec.name], self.dataset, f"expected {want}, got {got}")


class _MultiTaskLayout(_Layout):
    """``images/``, ``segmentation/``, ``depth/``, ``normals/``, ``edge/``, ``gt_sets/``."""

    key = "nyud_mt"
    info = NYUD_MT_INFO
    FILES: ClassVar[dict[str, tuple[str, str]]] = {
        "semseg": ("segmentation", ".png"),
        "depth": ("depth", ".npy"),
        "normals": ("normals", ".npy"),
        "edges": ("edge", ".npy"),
    }

    def ids(self, source: str, tasks: Sequence[TaskSpec]) -> list[str]:
        self.folder(self.root / "gt_sets")
        listing = require_file(self.root / "gt_sets" / f"{source}.txt", self.dataset)
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not ids:
            raise UserError(f"dataset {self.dataset}: split file {listing} lists no images")
        for sid in ids:
            for path in self.files(source, sid, tasks).values():
                require_file(path, self.dataset)
        return ids

    def files(self, source: str, sid: str, tasks: Sequence[TaskSpec]) -> dict[str, Path]:
        out = {"image": self.root / "images" / f"{sid}.jpg"}
        for spec in tasks:
            folder, ext = self.FILES[spec.name]
            out[spec.name] = self.root / folder / f"{sid}{ext}"
        return out

    def read(self, source: str, sid: str, tasks: Sequence[TaskSpec]) -> dict[str, torch.Tensor]:
        files = self.files(source, sid, tasks)
        name = self.dataset
        out = {"image": image_tensor(read_rgb(files["image"], name))}
        for spec in tasks:
            path = files[spec.name]
            if spec.name == "semseg":
                out["semseg"] = self._semseg(path, spec.num_classes)
            elif spec.name == "depth":
                out["depth"] = _depth(read_npy(path, name), path, name)
            elif spec.name == "normals":
                out["normals"] = _normals(read_npy(path, name), path, name)
            else:
                out["edges"] = _edges(read_npy(path, name), path, name)
        return out

    def _semseg(self, path: Path, num_classes: int) -> torch.Tensor:
        """png 0 = void, 1..40 -> 0..39, 255 -> ignore (reference: 0 -> 255, v -> v - 1)."""
        png = read_png(path, self.dataset)
        if png.ndim != 2:
            raise malformed(
                path, self.dataset, f"expected a one-channel label PNG, got {png.shape}"
            )
        raw = png.astype(np.int64)
        bad = (raw > num_classes) & (raw != 255)
        if bad.any():
            raise malformed(
                path, self.dataset, f"label {int(raw[bad][0])} outside 0..{num_classes} and 255"
            )
        label = raw - 1
        label[(raw == 0) | (raw == 255)] = IGNORE_INDEX
        return torch.from_numpy(label)

    def check_headers(self, source: str, sid: str, tasks: Sequence[TaskSpec]) -> None:
        files = self.files(source, sid, tasks)
        for spec in tasks:
            if spec.name == "semseg":
                continue
            shape = npy_shape(files[spec.name], self.dataset)
            ok = (
                len(shape) == 3 and shape[2] == 3
                if spec.name == "normals"
                else (len(shape) == 2 or (len(shape) == 3 and shape[2] == 1))
            )
            if not ok:
                raise malformed(files[spec.name], self.dataset, f"unexpected shape {shape}")


_LAYOUTS: dict[str, type[_Layout]] = {"npy": _NpyLayout, "nyud_mt": _MultiTaskLayout}


def detect_layout(root: Path, dataset: str = "nyuv2") -> str:
    """``"npy"`` or ``"nyud_mt"``, from which of the two layouts' folders ``root`` holds."""
    npy = (root / "train").is_dir() or (root / "val").is_dir()
    mt = (root / "gt_sets").is_dir() or (root / "images").is_dir()
    if npy and mt:
        raise UserError(
            f"dataset {dataset}: {root} mixes both NYU-v2 layouts (train/ or val/ next to "
            "gt_sets/ or images/); point data.root at one of them"
        )
    if npy:
        return "npy"
    if mt:
        return "nyud_mt"
    raise UserError(
        f"dataset {dataset}: {root} is in no known NYU-v2 layout; expected {NPY_SOURCE} "
        f"or {MT_SOURCE}"
    )


# --------------------------------------------------------------------------- dataset


# --------------------------------------------------------------------------- builder


class NYUv2Builder(DatasetBuilder):
    """NYU-v2 from a local folder in one of ``layouts`` (detected from the folder)."""

    def __init__(self, info: DatasetInfo, layouts: Sequence[str]) -> None:
        self.info = info
        self.layouts = tuple(layouts)

    def layout(self, cfg: DataConfig) -> _Layout:
        """The layout of ``data.root``, or a one-line error saying why it is not usable."""
        root = self.root(cfg)
        key = detect_layout(root, self.info.name)
        if key not in self.layouts:
            raise UserError(
                f"dataset {self.info.name}: {root} has the {key!r} NYU-v2 layout, which this "
                "dataset does not read; use data.name=nyuv2"
            )
        return _LAYOUTS[key](root, self.info.name)

    def info_for(self, cfg: DataConfig) -> DatasetInfo:
        """The info of the layout found under ``data.root`` (tasks and class counts differ)."""
        return self._info(self.layout(cfg))

    def _info(self, layout: _Layout) -> DatasetInfo:
        return dataclasses.replace(layout.info, name=self.info.name)

    def _split(
        self, cfg: DataConfig, layout: _Layout, split: str, tasks: Sequence[TaskSpec]
    ) -> tuple[str, list[str]]:
        """(source split, ids) of ``split``: train/val share the release's train set."""
        if split == "test":
            return "val", layout.ids("val", tasks)
        ids = layout.ids("train", tasks)
        train, val = holdout_split(len(ids), cfg.val_fraction, cfg.seed)
        return "train", [ids[i] for i in (train if split == "train" else val)]

    def prepare(self, cfg: DataConfig, progress: bool = False) -> dict[str, Any]:
        """Check every file of both source splits exists (and its .npy header), read the
        first sample of each fully, and return the split sizes.

        ``progress`` shows a bar over the header checks (a few seconds on the full set).
        """
        from tqdm.auto import tqdm

        layout = self.layout(cfg)
        info = self._info(layout)
        tasks = info.select(cfg.tasks)
        counts = {}
        for source in ("train", "val"):
            ids = layout.ids(source, tasks)
            desc = f"{self.info.name} {source}"
            for sid in tqdm(
                ids, desc=desc, unit="img", disable=None if progress else True, leave=False
            ):
                layout.check_headers(source, sid, tasks)
            layout.read(source, ids[0], tasks)
            counts[source] = len(ids)
        train, val = holdout_split(counts["train"], cfg.val_fraction, cfg.seed)
        sizes = {"train": len(train), "val": len(val), "test": counts["val"]}
        return {
            "dataset": self.info.name,
            "root": str(layout.root),
            "layout": layout.key,
            "tasks": [t.name for t in tasks],
            "splits": sizes,
        }

    def load(self, cfg: DataConfig, split: str) -> FileDataset:
        check_split(split)
        layout = self.layout(cfg)
        info = self._info(layout)
        tasks = info.select(cfg.tasks)
        source, ids = self._split(cfg, layout, split, tasks)
        size = None if cfg.size is None else (int(cfg.size[0]), int(cfg.size[1]))
        return FileDataset(info, split, tasks, ids, functools.partial(layout.read, source), size)


NYUV2 = DATASETS.register("nyuv2")(NYUv2Builder(NYUV2_INFO, layouts=("npy", "nyud_mt")))
NYUD_MT = DATASETS.register("nyud_mt")(NYUv2Builder(NYUD_MT_INFO, layouts=("nyud_mt",)))
