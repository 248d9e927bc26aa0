"""Datasets: the embedded ``synthscenes`` and real datasets read from local folders.

Use :func:`get_builder` / :func:`load_split`; loaders register themselves in
:data:`DATASETS` when their module is imported below.
"""

from __future__ import annotations

from dymu.config import DataConfig
from dymu.data.base import (
    DATASETS,
    SPLITS,
    ArrayDataset,
    DatasetBuilder,
    DatasetInfo,
    MultiTaskDataset,
    check_split,
)

__all__ = [
    "DATASETS",
    "SPLITS",
    "ArrayDataset",
    "DatasetBuilder",
    "DatasetInfo",
    "MultiTaskDataset",
    "check_split",
    "get_builder",
    "load_split",
]


def get_builder(name: str) -> DatasetBuilder:
    """The registered builder for ``name`` (one-line error listing the options otherwise)."""
    return DATASETS.get(name)


def input_size(cfg: DataConfig) -> tuple[int, int]:
    """The (H, W) the networks see: ``data.size``, else the dataset's own size."""
    if cfg.size is not None:
        return (int(cfg.size[0]), int(cfg.size[1]))
    return tuple(get_builder(cfg.name).info_for(cfg).default_size)


def load_split(cfg: DataConfig, split: str) -> MultiTaskDataset:
    """Load one split of the dataset ``cfg.name`` with ``cfg.tasks``."""
    return get_builder(cfg.name).load(cfg, check_split(split))


# Loaders register themselves in DATASETS on import.
from dymu.data import cifar100, multimnist, nyuv2, pascal_context, synthscenes  # noqa: E402, F401
