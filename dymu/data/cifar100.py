"""CIFAR-100 as 20 five-way classification tasks, one per superclass.

This is the multi-task form of CIFAR-100 used by routing networks (Rosenbaum et al., ICLR
2018) and by DYMU: each of the 20 coarse labels (superclasses) is a task whose 5 classes
are its fine labels. An image carries a label (0..4) only for its own superclass's task and
-1 (no label) for the 19 others, so every task sees 1/20 of the data.

The files are the "python version" from the CIFAR site: ``cifar-100-python/{train,test,
meta}``, Python-2 pickles of dicts with bytes keys. A pickle can run arbitrary code while
loading, so they are read with a restricted unpickler that can only rebuild numpy arrays:
loading a dataset never executes code from it (DESIGN.md, "Errors and bad input").
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dymu.config import DataConfig
from dymu.data.base import (
    DATASETS,
    ArrayDataset,
    DatasetBuilder,
    DatasetInfo,
    check_split,
    holdout_split,
    require_file,
)
from dymu.data.imageio import resize_images
from dymu.errors import UserError
from dymu.tasks.base import IGNORE_INDEX, TaskSpec

NAME = "cifar100"
FOLDER = "cifar-100-python"
FILES = ("meta", "train", "test")

SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
"""The CIFAR-100 superclasses (coarse labels) and their fine classes, as the dataset's
``meta`` names them. Both levels are numbered alphabetically in the files, which is why
sorted names are the label ids and each task's classes are listed in fine-id order."""

COARSE_LABEL_NAMES: tuple[str, ...] = tuple(sorted(SUPERCLASSES))
"""Coarse label id -> name (the order of ``meta[b"coarse_label_names"]``)."""
FINE_LABEL_NAMES: tuple[str, ...] = tuple(sorted(n for f in SUPERCLASSES.values() for n in f))
"""Fine label id -> name (the order of ``meta[b"fine_label_names"]``)."""

_FINE_ID = {name: i for i, name in enumerate(FINE_LABEL_NAMES)}
COARSE_OF_FINE = np.empty(100, dtype=np.int64)
"""Fine label id -> coarse label id."""
POSITION_OF_FINE = np.empty(100, dtype=np.int64)
"""Fine label id -> its class id (0..4) within its superclass's task."""
for _coarse, _name in enumerate(COARSE_LABEL_NAMES):
    for _pos, _fine in enumerate(sorted(SUPERCLASSES[_name], key=_FINE_ID.__getitem__)):
        COARSE_OF_FINE[_FINE_ID[_fine]] = _coarse
        POSITION_OF_FINE[_FINE_ID[_fine]] = _pos

IMAGE_SIZE = 32
_PIXELS = 3 * IMAGE_SIZE * IMAGE_SIZE


# --------------------------------------------------------------------------- safe pickle


class _Refused(Exception):
    """A pickle asked for something a CIFAR-100 file never contains."""


def _numpy_reconstruct() -> Any:
    try:  # numpy >= 2 keeps it in numpy._core; numpy.core is a deprecated alias there
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_encode(text: Any, encoding: Any = "latin1", errors: Any = "strict") -> bytes:
    """``_codecs.encode`` limited to what pickle protocol 2 uses for bytes under Python 3.

    Python 3 writes a ``bytes`` object at protocol < 3 as ``_codecs.encode(str, "latin1")``,
    so re-saved copies of the files need this call; nothing else about codecs is allowed.
    """
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise _Refused("a call to _codecs.encode other than str -> latin1 bytes")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
"""Every global a CIFAR-100 pickle may name: what rebuilding a numpy array needs."""


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`_ALLOWED_GLOBALS`, so it can build numpy
    arrays, lists, dicts, ints and bytes but never call anything that runs code."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _Refused(
                f"it refers to {module}.{name}; a CIFAR-100 file holds only numpy arrays, "
                "lists and bytes, and loading it never runs code"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it uses persistent ids")


def safe_load_pickle(path: Path) -> Any:
    """Load a (Python-2) pickle with bytes keys, refusing everything but numpy arrays.

    Raises:
        UserError: naming the file, when it is unreadable, not a pickle, or refers to any
            global outside :data:`_ALLOWED_GLOBALS` (nothing from it is executed).
    """
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh, encoding="bytes").load()
    except _Refused as exc:
        raise UserError(f"dataset {NAME}: refusing to load {path}: {exc}") from None
    except OSError as exc:
        raise UserError(f"dataset {NAME}: cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # any parse failure of a damaged file: one line, no traceback
        raise UserError(f"dataset {NAME}: {path} is not a valid pickle file ({exc})") from None


# --------------------------------------------------------------------------- file parsing


def _field(obj: dict[Any, Any], key: str, path: Path) -> Any:
    """``obj[key]`` whether the file uses bytes keys (the original) or str keys (re-saved)."""
    for k in (key.encode(), key):
        if k in obj:
            return obj[k]
    raise UserError(f"dataset {NAME}: {path} lacks the entry {key!r}; is it a CIFAR-100 file?")


def _labels(obj: dict[Any, Any], key: str, n: int, high: int, path: Path) -> np.ndarray:
    values = _field(obj, key, path)
    try:
        arr = np.asarray(values)
    except (TypeError, ValueError):
        arr = np.asarray([], dtype=object)
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"dataset {NAME}: {path}: {key!r} must be {n} integer labels")
    if n and (arr.min() < 0 or arr.max() >= high):
        raise UserError(f"dataset {NAME}: {path}: {key!r} has values outside 0..{high - 1}")
    return arr.astype(np.int64)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and fine labels of a ``train``/``test`` file, validated.

    Returns:
        ``(images, fine)``: uint8 [N, 32, 32, 3] and int64 [N] fine label ids.
    """
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise UserError(
            f"dataset {NAME}: {path} holds a {type(obj).__name__}, not the dict of a "
            "CIFAR-100 batch"
        )
    data = _field(obj, "data", path)
    if not (
        isinstance(data, np.ndarray)
        and data.dtype == np.uint8
        and data.ndim == 2
        and data.shape[1] == _PIXELS
    ):
        shape = getattr(data, "shape", None)
        raise UserError(
            f"dataset {NAME}: {path}: 'data' must be a uint8 array [N, {_PIXELS}], got "
            f"{type(data).__name__} {shape}"
        )
    n = len(data)
    fine = _labels(obj, "fine_labels", n, 100, path)
    coarse = _labels(obj, "coarse_labels", n, 20, path)
    bad = np.flatnonzero(COARSE_OF_FINE[fine] != coarse)
    if bad.size:
        i = int(bad[0])
        raise UserError(
            f"dataset {NAME}: {path}: image {i} has fine label {FINE_LABEL_NAMES[fine[i]]} "
            f"but coarse label {COARSE_LABEL_NAMES[coarse[i]]}; the labels are inconsistent"
        )
    # [N, 3072] -> [N, 3, 32, 32] (R, G, B planes, row-major) -> [N, 32, 32, 3]
    images = data.reshape(n, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), fine


def check_meta(path: Path) -> None:
    """Check that ``meta`` names the CIFAR-100 classes in the order this module assumes."""
    obj = safe_load_pickle(path)
    if not isinstance(obj, dict):
        raise UserError(f"dataset {NAME}: {path} holds a {type(obj).__name__}, not a dict")
    for key, expected in (
        ("fine_label_names", FINE_LABEL_NAMES),
        ("coarse_label_names", COARSE_LABEL_NAMES),
    ):
        names = _field(obj, key, path)
        if not isinstance(names, list | tuple):
            raise UserError(f"dataset {NAME}: {path}: {key!r} must be a list of names")
        got = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names)
        if got != expected:
            raise UserError(
                f"dataset {NAME}: {path}: {key!r} lists {len(got)} names that are not the "
                f"CIFAR-100 ones in order (expected {len(expected)}: {', '.join(expected[:3])}"
                ", ...)"
            )


# --------------------------------------------------------------------------- resizing


# --------------------------------------------------------------------------- builder


def _info() -> DatasetInfo:
    tasks = tuple(
        TaskSpec(
            name=coarse,
            kind="classification",
            num_classes=5,
            class_names=tuple(sorted(SUPERCLASSES[coarse], key=_FINE_ID.__getitem__)),
        )
        for coarse in COARSE_LABEL_NAMES
    )
    return DatasetInfo(
        name=NAME,
        description="CIFAR-100 as 20 five-way tasks, one per superclass (Rosenbaum et al. 2018)",
        tasks=tasks,
        default_tasks=COARSE_LABEL_NAMES,
        default_size=(IMAGE_SIZE, IMAGE_SIZE),
        source="ROOT/cifar-100-python/{meta,train,test} (the python version; ROOT may also "
        "be the cifar-100-python folder itself)",
        needs_root=True,
        hflip=True,
    )


class Cifar100Builder(DatasetBuilder):
    """Reads the python-pickle CIFAR-100; val is a seeded hold-out of train."""

    info = _info()

    def folder(self, cfg: DataConfig) -> Path:
        """The folder holding ``meta``/``train``/``test``: ``root/cifar-100-python`` or root.

        When neither holds any of the files, the canonical place is returned so that the
        missing-file error names where the files were expected.
        """
        root = self.root(cfg)
        nested = root / FOLDER
        if nested.is_dir() or not any((root / f).exists() for f in FILES):
            return nested
        return root

    def _rows(
        self, cfg: DataConfig, split: str, fine: np.ndarray, tasks: Sequence[TaskSpec]
    ) -> np.ndarray:
        """Rows of the source file that form ``split`` with ``tasks``.

        The hold-out is drawn over the whole train file, before the task filter, so val is
        the same images whichever tasks are chosen; then images whose superclass is not
        among ``tasks`` are dropped, since they would carry no label at all.
        """
        n = len(fine)
        if split == "test":
            rows = np.arange(n)
        else:
            train, val = holdout_split(n, cfg.val_fraction, cfg.seed)
            rows = train if split == "train" else val
        wanted = np.array([COARSE_LABEL_NAMES.index(t.name) for t in tasks])
        return rows[np.isin(COARSE_OF_FINE[fine[rows]], wanted)]

    def load(self, cfg: DataConfig, split: str) -> ArrayDataset:
        split = check_split(split)
        tasks = self.info.select(cfg.tasks)
        folder = self.folder(cfg)
        check_meta(require_file(folder / "meta", NAME))
        source = "test" if split == "test" else "train"
        images, fine = read_batch(require_file(folder / source, NAME))
        rows = self._rows(cfg, split, fine, tasks)
        size = cfg.size or self.info.default_size
        arrays: dict[str, np.ndarray] = {"image": resize_images(images[rows], size)}
        fine = fine[rows]
        coarse = COARSE_OF_FINE[fine]
        for spec in tasks:
            target = np.full(len(rows), IGNORE_INDEX, dtype=np.int8)
            own = coarse == COARSE_LABEL_NAMES.index(spec.name)
            target[own] = POSITION_OF_FINE[fine[own]]
            arrays[spec.name] = target
        return ArrayDataset(self.info, split, tasks, arrays)

    def prepare(self, cfg: DataConfig, progress: bool = False) -> dict[str, Any]:
        """Validate all three files and report the split sizes for ``cfg.tasks``."""
        tasks = self.info.select(cfg.tasks)
        folder = self.folder(cfg)
        paths = {f: require_file(folder / f, NAME) for f in FILES}
        check_meta(paths["meta"])
        _, train_fine = read_batch(paths["train"])
        _, test_fine = read_batch(paths["test"])
        splits = {
            split: len(self._rows(cfg, split, test_fine if split == "test" else train_fine, tasks))
            for split in ("train", "val", "test")
        }
        return {"dataset": NAME, "root": str(folder), "cache": None, "splits": splits}


DATASETS.register(NAME)(Cifar100Builder())
