"""PASCAL-Context for multi-task learning, from the ``PASCAL_MT`` release on disk.

This is the release used by ASTMT (facebookresearch/astmt) and
SimonVandenhende/Multi-Task-Learning-PyTorch; every decoding rule below follows that
repository's ``data/pascal_context.py`` (class ``PASCALContext``), ``data/custom_transforms.py``
and ``utils/config.py``, so numbers stay comparable with the literature::

    root/JPEGImages/<id>.jpg                 RGB image, about 500 x 375, sizes vary
    root/ImageSets/Context/{train,val}.txt   one id per line (4998 / 5105 images)
    root/semseg/VOC12/<id>.png               21 VOC classes (0 = background), 255 = ignore;
    root/semseg/pascal-context/<id>.png        read when no VOC12 png exists
    root/human_parts/<id>.mat                PASCAL-Part annotation (``anno`` struct)
    root/sal_distill/<id>.png                distilled saliency, 0..255
    root/normals_distill/<id>.png            distilled normals, RGB 0..255
    root/pascal-context/trainval/<id>.mat    PASCAL-Context ``LabelMap`` (459 classes)

Tasks and their decoding:

- ``semseg`` (21 classes): png values as they are; 255 -> -1 (ignore).
- ``human_parts`` (7 classes: background + 6 parts): for every ``person`` object
  (``class_ind`` 15) that has part masks, each part's pixels get the id of the
  reference's 6-part grouping (:data:`HUMAN_PART_IDS`); other pixels are background 0.
  An image with no annotated person parts is all ignore (-1), as ``AddIgnoreRegions``
  does with an all-zero target.
- ``saliency``: ``png / 255 > 0.5`` as {0, 1}.
- ``normals``: ``2 * png / 255 - 1``, kept only on pixels whose ``LabelMap`` class is
  one that NYU also labels (:data:`NORMALS_VALID_CLASSES`; the distillation is
  unreliable elsewhere), all-zero (invalid) on the rest, then scaled to unit length
  (the reference renormalises in ``FixedResize``).
- ``edges``: the ``LabelMap`` class boundaries: pixels where the 3x3 Laplacian
  (``cv2.Laplacian``, border reflect-101) of the label map is non-zero, thinned with
  ``skimage.morphology.thin`` (the Laplacian with scipy), as {0, 1}.

Splits: ``train.txt`` minus a deterministic ``data.val_fraction`` hold-out (seeded by
``data.seed``) is ``train``, the hold-out is ``val``, ``val.txt`` is ``test``.

Size: images differ in size, so every sample is resized to ``data.size`` (default
512 x 512, the reference's ``FixedResize``; the aspect ratio is not kept and nothing is
padded): the image bilinearly, all targets by nearest neighbour (the reference uses
nearest for every target but normals, which it resizes bicubically before
renormalising; nearest keeps the invalid zeros exact).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    read_mat,
    read_png,
    read_rgb,
    unit_normals,
)
from dymu.errors import UserError
from dymu.tasks.base import IGNORE_INDEX, TaskSpec

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

HUMAN_PART_CLASSES = (
    "background", "head", "torso", "upper_arm", "lower_arm", "upper_leg", "lower_leg",
)  # fmt: skip

PERSON_CLASS = 15
"""``class_ind`` of ``person`` in PASCAL-Part annotations."""

HUMAN_PART_IDS = {
    "hair": 1, "head": 1, "lear": 1, "lebrow": 1, "leye": 1, "mouth": 1, "nose": 1,
    "rear": 1, "rebrow": 1, "reye": 1,
    "neck": 2, "torso": 2,
    "luarm": 3, "ruarm": 3,
    "lhand": 4, "llarm": 4, "rhand": 4, "rlarm": 4,
    "luleg": 5, "ruleg": 5,
    "lfoot": 6, "llleg": 6, "rfoot": 6, "rlleg": 6,
}  # fmt: skip
"""PASCAL-Part person part name -> class id: ``HUMAN_PART[6]`` of the reference."""

NORMALS_VALID_CLASSES = frozenset({
    3, 4, 6, 9, 10, 11, 13, 15, 17, 18, 22, 23, 29, 30, 33, 34, 36, 37, 38, 39, 41, 43,
    46, 49, 50, 51, 53, 55, 56, 59, 61, 62, 65, 66, 68, 69, 72, 73, 78, 83, 84, 85, 87,
    88, 95, 96, 101, 104, 105, 107, 111, 113, 115, 122, 124, 135, 141, 142, 143, 146, 150,
    154, 157, 158, 159, 165, 172, 174, 181, 183, 184, 191, 193, 195, 197, 199, 202, 213,
    215, 216, 219, 220, 223, 225, 228, 230, 232, 233, 238, 239, 242, 243, 246, 250, 251,
    252, 255, 260, 261, 263, 269, 272, 273, 275, 281, 283, 284, 285, 286, 287, 288, 290,
    291, 292, 293, 295, 304, 307, 309, 310, 314, 315, 319, 323, 329, 330, 331, 336, 342,
    345, 349, 350, 351, 352, 355, 357, 368, 370, 371, 374, 379, 380, 383, 384, 397, 401,
    403, 405, 407, 408, 411, 412, 413, 414, 417, 419, 421, 423, 427, 429, 430, 432, 440,
    441, 442, 443, 444, 446, 454, 457,
})  # fmt: skip
"""PASCAL-Context ``LabelMap`` classes on which distilled normals count (170 classes).

The reference computes them at run time as the PASCAL-Context ids (``db_info/
context_classes.json``) of every class name that NYU also has (``db_info/
nyu_classes.json``) except ``unknown``, plus ``tvmonitor`` (427); this is that set.
"""

SOURCE = (
    "PASCAL_MT folder: JPEGImages/, ImageSets/Context/{train,val}.txt, "
    "semseg/{VOC12,pascal-context}/, human_parts/, sal_distill/, normals_distill/, "
    "pascal-context/trainval/"
)

PASCAL_CONTEXT_INFO = DatasetInfo(
    name="pascal_context",
    description=(
        "PASCAL-Context multi-task (PASCAL_MT): 21-class segmentation, human parts, "
        "saliency, surface normals, edges"
    ),
    tasks=(
        TaskSpec("semseg", "semseg", 21, VOC_CLASSES),
        TaskSpec("human_parts", "parts", 7, HUMAN_PART_CLASSES),
        TaskSpec("saliency", "saliency"),
        TaskSpec("normals", "normals"),
        TaskSpec("edges", "edges"),
    ),
    default_tasks=("semseg", "human_parts", "saliency", "normals", "edges"),
    default_size=(512, 512),
    source=SOURCE,
    needs_root=True,
    hflip=True,
)


# --------------------------------------------------------------------------- edges


_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64)


def label_edges(label_map: np.ndarray) -> np.ndarray:
    """Class boundaries of a label map [H, W] as float32 {0, 1}, as the reference computes.

    ``thin(|cv2.Laplacian(LabelMap, CV_64F)| > 0)``: the default 1-aperture Laplacian
    is the 4-neighbour kernel with reflect-101 borders (scipy's ``mirror``).
    """
    from scipy import ndimage
    from skimage.morphology import thin

    lap = ndimage.correlate(label_map.astype(np.float64), _LAPLACIAN, mode="mirror")
    return thin(np.abs(lap) > 0).astype(np.float32)


# --------------------------------------------------------------------------- reading


class _Folder:
    """Paths of the PASCAL_MT release under ``root`` and the decoding of each task."""

    key = "pascal_mt"

    def __init__(self, root: Path, dataset: str) -> None:
        self.root = root
        self.dataset = dataset

    def image(self, sid: str) -> Path:
        return self.root / "JPEGImages" / f"{sid}.jpg"

    def semseg(self, sid: str) -> Path:
        """The VOC12 png when it exists, else the pascal-context one (reference order)."""
        voc = self.root / "semseg" / "VOC12" / f"{sid}.png"
        return voc if voc.is_file() else self.root / "semseg" / "pascal-context" / f"{sid}.png"

    def label_map(self, sid: str) -> Path:
        return self.root / "pascal-context" / "trainval" / f"{sid}.mat"

    def parts(self, sid: str) -> Path:
        return self.root / "human_parts" / f"{sid}.mat"

    def saliency(self, sid: str) -> Path:
        return self.root / "sal_distill" / f"{sid}.png"

    def normals(self, sid: str) -> Path:
        return self.root / "normals_distill" / f"{sid}.png"

    def files(self, sid: str, tasks: Sequence[TaskSpec]) -> list[Path]:
        """Every file sample ``sid`` needs for ``tasks``."""
        out = [self.image(sid)]
        for spec in tasks:
            if spec.name == "semseg":
                out.append(self.semseg(sid))
            elif spec.name == "human_parts":
                out.append(self.parts(sid))
            elif spec.name == "saliency":
                out.append(self.saliency(sid))
            elif spec.name == "normals":
                out += [self.normals(sid), self.label_map(sid)]
            else:
                out.append(self.label_map(sid))
        return out

    def ids(self, source: str, tasks: Sequence[TaskSpec], progress: bool = False) -> list[str]:
        """Ids listed in ``ImageSets/Context/<source>.txt``, after checking their files."""
        from tqdm.auto import tqdm

        listing = require_file(self.root / "ImageSets" / "Context" / f"{source}.txt", self.dataset)
        ids = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if not ids:
            raise UserError(f"dataset {self.dataset}: split file {listing} lists no images")
        context_pngs = self.root / "semseg" / "pascal-context"
        desc = f"{self.dataset} {source}"
        for sid in tqdm(
            ids, desc=desc, unit="img", disable=None if progress else True, leave=False
        ):
            for path in self.files(sid, tasks):
                if not path.is_file():
                    voc = self.root / "semseg" / "VOC12" / path.name
                    alt = f" (or {voc})" if path.parent == context_pngs else ""
                    raise UserError(f"dataset {self.dataset}: missing file {path}{alt}")
        return ids

    def read(self, sid: str, tasks: Sequence[TaskSpec]) -> dict[str, torch.Tensor]:
        """Sample ``sid`` at its native size in the conventions of :mod:`dymu.tasks.base`."""
        image = read_rgb(self.image(sid), self.dataset)
        hw = image.shape[:2]
        out = {"image": image_tensor(image)}
        labels: np.ndarray | None = None
        for spec in tasks:
            if spec.name in ("normals", "edges") and labels is None:
                labels = self._label_map(sid)
            if spec.name == "semseg":
                out["semseg"] = self._semseg(self.semseg(sid), spec.num_classes)
            elif spec.name == "human_parts":
                out["human_parts"] = self._human_parts(sid, hw)
            elif spec.name == "saliency":
                out["saliency"] = self._saliency(self.saliency(sid))
            elif spec.name == "normals":
                out["normals"] = self._normals(sid, labels)
            else:
                out["edges"] = torch.from_numpy(label_edges(labels)).unsqueeze(0)  # [1, H, W]
        return out

    def _label_map(self, sid: str) -> np.ndarray:
        path = self.label_map(sid)
        labels = np.asarray(read_mat(path, self.dataset, "LabelMap"))
        if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.number):
            raise malformed(path, self.dataset, "LabelMap must be a 2-D numeric array")
        return labels.astype(np.int64)

    def _semseg(self, path: Path, num_classes: int) -> torch.Tensor:
        png = read_png(path, self.dataset)
        if png.ndim != 2:
            raise malformed(
                path, self.dataset, f"expected a one-channel label PNG, got {png.shape}"
            )
        label = png.astype(np.int64)
        bad = (label >= num_classes) & (label != 255)
        if bad.any():
            raise malformed(
                path,
                self.dataset,
                f"label {int(label[bad][0])} outside 0..{num_classes - 1} and 255",
            )
        label[label == 255] = IGNORE_INDEX
        return torch.from_numpy(label)

    def _saliency(self, path: Path) -> torch.Tensor:
        png = read_png(path, self.dataset)
        if png.ndim != 2:
            raise malformed(path, self.dataset, f"expected a one-channel PNG, got {png.shape}")
        sal = (png.astype(np.float32) / 255.0 > 0.5).astype(np.float32)
        return torch.from_numpy(sal).unsqueeze(0)  # [H, W] -> [1, H, W]

    def _normals(self, sid: str, labels: np.ndarray) -> torch.Tensor:
        path = self.normals(sid)
        png = read_png(path, self.dataset)
        if png.ndim != 3 or png.shape[2] != 3:
            raise malformed(path, self.dataset, f"expected an RGB PNG, got shape {png.shape}")
        if png.shape[:2] != labels.shape:
            raise malformed(
                path,
                self.dataset,
                f"size {png.shape[:2]} differs from its LabelMap's {labels.shape}",
            )
        normals = 2.0 * png.astype(np.float32) / 255.0 - 1.0
        lut = np.zeros(max(int(labels.max()) + 1, 460), dtype=bool)
        lut[list(NORMALS_VALID_CLASSES)] = True
        normals[~lut[np.clip(labels, 0, None)]] = 0.0
        return torch.from_numpy(unit_normals(normals)).permute(2, 0, 1)  # [H,W,3] -> [3,H,W]

    def _human_parts(self, sid: str, hw: tuple[int, ...]) -> torch.Tensor:
        """Part ids of every person with parts; all -1 when the image has none."""
        path = self.parts(sid)
        anno = read_mat(path, self.dataset, "anno")
        try:
            objects = anno["objects"][0, 0].ravel()
            people = [obj for obj in objects if int(np.ravel(obj["class_ind"])[0]) == PERSON_CLASS]
            target: np.ndarray | None = None
            for obj in people:
                parts = obj["parts"]
                if parts.size == 0:
                    continue
                if target is None:
                    target = np.zeros(np.shape(obj["mask"]), dtype=np.int64)
                for part in parts.ravel():
                    name = str(np.ravel(part["part_name"])[0])
                    if name not in HUMAN_PART_IDS:
                        raise malformed(path, self.dataset, f"unknown person part {name!r}")
                    mask = np.asarray(part["mask"]).astype(bool)
                    target[mask] = HUMAN_PART_IDS[name]
        except (KeyError, IndexError, ValueError, TypeError) as exc:
            raise malformed(
                path, self.dataset, f"not a PASCAL-Part 'anno' struct (objects/parts): {exc}"
            ) from None
        if target is None or not target.any():
            target = np.full(hw, IGNORE_INDEX, dtype=np.int64)
        return torch.from_numpy(target)


# --------------------------------------------------------------------------- dataset


# --------------------------------------------------------------------------- builder


class PascalContextBuilder(DatasetBuilder):
    """PASCAL-Context multi-task from a local copy of the PASCAL_MT release."""

    info = PASCAL_CONTEXT_INFO

    def _folder(self, cfg: DataConfig) -> _Folder:
        root = self.root(cfg)
        for sub in ("JPEGImages", "ImageSets"):
            if not (root / sub).is_dir():
                raise UserError(
                    f"dataset {self.info.name}: folder {root / sub} does not exist "
                    f"(expected layout: {SOURCE})"
                )
        return _Folder(root, self.info.name)

    def _split(
        self, cfg: DataConfig, folder: _Folder, split: str, tasks: Sequence[TaskSpec]
    ) -> list[str]:
        if split == "test":
            return folder.ids("val", tasks)
        ids = folder.ids("train", tasks)
        train, val = holdout_split(len(ids), cfg.val_fraction, cfg.seed)
        return [ids[i] for i in (train if split == "train" else val)]

    def prepare(self, cfg: DataConfig, progress: bool = False) -> dict[str, Any]:
        """Check every listed image has its files for the selected tasks, read the first
        sample of each split file fully, and return the split sizes.

        ``progress`` shows a bar over the file checks.
        """
        folder = self._folder(cfg)
        tasks = self.info.select(cfg.tasks)
        counts = {}
        for source in ("train", "val"):
            ids = folder.ids(source, tasks, progress)
            folder.read(ids[0], tasks)
            counts[source] = len(ids)
        train, val = holdout_split(counts["train"], cfg.val_fraction, cfg.seed)
        return {
            "dataset": self.info.name,
            "root": str(folder.root),
            "layout": folder.key,
            "tasks": [t.name for t in tasks],
            "splits": {"train": len(train), "val": len(val), "test": counts["val"]},
        }

    def load(self, cfg: DataConfig, split: str) -> FileDataset:
        check_split(split)
        folder = self._folder(cfg)
        tasks = self.info.select(cfg.tasks)
        ids = self._split(cfg, folder, split, tasks)
        size = self.info.default_size if cfg.size is None else cfg.size
        return FileDataset(self.info, split, tasks, ids, folder.read, (int(size[0]), int(size[1])))


PASCAL_CONTEXT = DATASETS.register("pascal_context")(PascalContextBuilder())
