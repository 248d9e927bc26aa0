"""The dataset contract every loader follows, and the registry that names them.

A *dataset builder* (registered in :data:`DATASETS`) knows one dataset: its
:class:`DatasetInfo` (tasks, default size, where it comes from), how to ``prepare`` it
(generate a cache or validate a folder) and how to ``load`` one split as a
:class:`MultiTaskDataset`. Samples follow the target conventions of
:mod:`dymu.tasks.base`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dymu.config import DataConfig
from dymu.errors import UserError
from dymu.registry import Registry
from dymu.tasks.base import TaskSpec

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset offers, for listings and for building models before loading data."""

    name: str
    description: str
    tasks: tuple[TaskSpec, ...]
    default_tasks: tuple[str, ...]
    default_size: tuple[int, int]
    source: str
    """``"embedded"`` or a short description of the expected on-disk layout."""
    needs_root: bool
    hflip: bool
    """Whether a horizontally mirrored training image (with its labels mirrored the same
    way) is an image of the same distribution: true for scenes and natural images, false
    where left and right mean something (MultiMNIST's items are told apart by side, and a
    mirrored digit is not a digit). No stage flips a dataset that says false
    (:func:`dymu.data.batches.check_flips`)."""

    def task(self, name: str) -> TaskSpec:
        for spec in self.tasks:
            if spec.name == name:
                return spec
        options = ", ".join(s.name for s in self.tasks)
        raise UserError(f"dataset {self.name} has no task {name!r}; its tasks are: {options}")

    def select(self, names: Sequence[str] | None) -> tuple[TaskSpec, ...]:
        """The specs of ``names`` (default tasks when None), in the order given."""
        chosen = self.default_tasks if names is None else tuple(names)
        if len(set(chosen)) != len(chosen):
            raise UserError(f"data.tasks lists a task twice: {list(chosen)}")
        return tuple(self.task(n) for n in chosen)


class MultiTaskDataset(Dataset, ABC):
    """One split of a dataset: ``ds[i]`` is ``{"image": [3,H,W] float, task: target, ...}``."""

    def __init__(self, info: DatasetInfo, split: str, tasks: Sequence[TaskSpec]) -> None:
        self.info = info
        self.split = split
        self.tasks = tuple(tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


class ArrayDataset(MultiTaskDataset):
    """A split held as numpy arrays (in memory or memory-mapped), indexed without copies.

    ``arrays["image"]`` is uint8 [N, H, W, 3] (or [N, H, W, 1] for grey images, returned
    with the channel repeated); ``arrays[task]`` holds that task's targets
    already in the conventions of :mod:`dymu.tasks.base` except for the layout: dense
    targets are stored channels-last ([N, H, W] or [N, H, W, C]) and in compact dtypes
    (float16, uint8; normals may be int8 holding round(127 * n)); :meth:`batch` converts
    to the tensor conventions.
    """

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        tasks: Sequence[TaskSpec],
        arrays: dict[str, np.ndarray],
        indices: np.ndarray | None = None,
    ) -> None:
        super().__init__(info, split, tasks)
        missing = [k for k in ["image", *self.task_names] if k not in arrays]
        if missing:
            raise UserError(f"dataset {info.name} ({split}) lacks arrays for: {', '.join(missing)}")
        self.arrays = arrays
        n = len(arrays["image"])
        self.indices = np.arange(n) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        out = self.batch(np.asarray([index]))
        return {k: v[0] for k, v in out.items()}

    def batch(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        """Samples at ``positions`` (into this split) as batched tensors, vectorised."""
        rows = self.indices[np.asarray(positions)]
        image = torch.from_numpy(np.ascontiguousarray(self.arrays["image"][rows]))
        # [B, H, W, C] -> [B, C, H, W], made contiguous: the permuted (channels-last) strides
        # send torch 2.13's CPU kernels down a path that corrupted the heap in backward.
        # Transposed while still uint8 (a quarter of the bytes to move), then converted.
        image = image.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        if image.shape[1] == 1:  # grey images are stored with one channel (a third of the RAM)
            image = image.expand(-1, 3, -1, -1).contiguous()  # [B, 1, H, W] -> [B, 3, H, W]
        out = {"image": image}
        for spec in self.tasks:
            out[spec.name] = to_target_tensor(spec, self.arrays[spec.name][rows])
        return out


class FileDataset(MultiTaskDataset):
    """One split of a folder dataset, read lazily: ``ds[i]`` reads sample ``ids[i]``.

    Real datasets are too large to hold in memory; ``read(id, tasks)`` opens one sample's
    files and returns tensors in the conventions, which are then resized to ``size``
    (None = the sample's own image size, so stored targets follow the image).
    """

    def __init__(
        self,
        info: DatasetInfo,
        split: str,
        tasks: Sequence[TaskSpec],
        ids: Sequence[str],
        read: Callable[[str, tuple[TaskSpec, ...]], dict[str, torch.Tensor]],
        size: tuple[int, int] | None,
    ) -> None:
        super().__init__(info, split, tasks)
        self.ids = list(ids)
        """Sample ids (file stems) of this split, in order."""
        self.read = read
        self.size = size

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from dymu.data.imageio import fit_sample

        if not -len(self.ids) <= index < len(self.ids):
            raise IndexError(f"index {index} out of range for {len(self.ids)} samples")
        sample = self.read(self.ids[index], self.tasks)
        return fit_sample(sample, self.size or tuple(sample["image"].shape[-2:]))


def to_target_tensor(spec: TaskSpec, array: np.ndarray) -> torch.Tensor:
    """Convert a batch of stored targets (channels-last, compact dtypes) to the conventions."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if spec.kind in ("semseg", "parts", "classification"):
        return t.long()
    if spec.kind == "normals" and t.dtype == torch.int8:  # stored as round(127 * n)
        # The hot spot of a batch: in place, and no where() for the all-zero (invalid)
        # pixels, whose norm is 0 and which the clamp keeps at 0 / 1e-6 = 0. A stored
        # non-zero vector has norm >= 1, untouched by the clamp: same values as dividing
        # where the norm is positive.
        t = t.float()
        t = t.div_(t.norm(dim=-1, keepdim=True).clamp_min_(1e-6))
    if t.ndim == 3:  # [B, H, W] -> [B, 1, H, W]
        return t.unsqueeze(1).float()
    return t.permute(0, 3, 1, 2).float()  # [B, H, W, C] -> [B, C, H, W]


class DatasetBuilder(ABC):
    """Knows one dataset: its info, how to prepare it and how to load a split."""

    info: DatasetInfo

    @abstractmethod
    def prepare(self, cfg: DataConfig, progress: bool = False) -> dict[str, Any]:
        """Generate the cache or validate the folder; return a summary (split sizes, paths).

        ``progress`` shows a progress bar for work that takes more than a moment.
        """

    @abstractmethod
    def load(self, cfg: DataConfig, split: str) -> MultiTaskDataset:
        """Load ``split`` (``train``/``val``/``test``) with the tasks of ``cfg.tasks``."""

    def info_for(self, cfg: DataConfig) -> DatasetInfo:
        """The info of the data ``cfg`` points at (a loader that detects its on-disk layout
        may offer other tasks than its static :attr:`info`); build heads from this."""
        return self.info

    def root(self, cfg: DataConfig) -> Path:
        """``cfg.root`` as an existing folder, or a one-line error saying how to set it."""
        if cfg.root is None:
            raise UserError(
                f"dataset {self.info.name} is read from a local folder: set data.root=PATH "
                f"(expected layout: {self.info.source})"
            )
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise UserError(f"dataset {self.info.name}: folder {root} does not exist")
        return root


DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


def cache_root(cfg: DataConfig) -> Path:
    """Where generated datasets live: data.cache_dir, else $DYMU_CACHE, else ~/.cache/dymu."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("DYMU_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "dymu"


def require_file(path: Path, dataset: str) -> Path:
    """``path`` if it is a file, else a one-line error naming the missing file."""
    if not path.is_file():
        raise UserError(f"dataset {dataset}: missing file {path}")
    return path


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically split ``range(n)`` into (train, val) with ``fraction`` in val."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = max(1, round(n * fraction)) if n > 1 else 0
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])
