"""A run directory: where a command writes its resolved config and environment first.

Every command that takes ``--run DIR`` starts with :func:`start_run`, so any artifact in
DIR can be traced back to the exact settings and software versions that produced it.
"""

from __future__ import annotations

import os
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from dymu import __version__, dist
from dymu.artifacts import read_text
from dymu.config import Config, to_yaml
from dymu.errors import UserError
from dymu.io import clean_stale, ensure_dir, write_json, write_text
from dymu.lock import lock_run

_VERSIONED = ("numpy", "torch", "networkx", "scikit-learn", "fvcore", "onnx", "onnxruntime")


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable CUDA request is an error.

    Under ``torchrun`` with several processes, ``auto`` and ``cuda`` give each process the
    GPU of its ``LOCAL_RANK``; naming one GPU (``cuda:N``) is an error there, since every
    process would share it.
    """
    world = dist.world_size()
    if world > 1 and spec in ("auto", "cuda") and torch.cuda.is_available():
        index = dist.local_rank()
        if index >= torch.cuda.device_count():
            raise UserError(
                f"process {index} of torchrun has no GPU of its own: only "
                f"{torch.cuda.device_count()} CUDA device(s) exist (use --nproc-per-node "
                f"{torch.cuda.device_count()} or fewer)"
            )
        return torch.device("cuda", index)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1 and spec.startswith("cuda:"):
        raise UserError(
            f"run.device={spec} names one GPU for all {world} torchrun processes; use "
            "run.device=cuda (each process takes the GPU of its LOCAL_RANK)"
        )
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"run.device={spec} but no CUDA device is available (use cpu or auto)")
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(
                f"run.device={spec} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return torch.device(spec)


def env_info(device: torch.device | None = None) -> dict[str, Any]:
    """Versions and hardware that can change a result (written as ``env.json``)."""
    versions = {}
    for package in _VERSIONED:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    info: dict[str, Any] = {
        "dymu": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device is not None:
        info["device"] = str(device)
    return info


def check_names(cfg: Config, need_data: bool = True) -> None:
    """Refuse unknown dataset, task, backbone and head names in one line listing the valid
    ones, before anything is written. With ``need_data`` the dataset's folder must be there
    too (a loader that detects its layout from the folder offers the tasks it finds);
    without it, tasks are checked against the dataset's static list."""
    from dymu.data import get_builder
    from dymu.models import BACKBONES, HEADS

    builder = get_builder(cfg.data.name)
    try:
        info = builder.info_for(cfg.data)
    except UserError:
        if need_data:
            raise
        info = builder.info
    info.select(cfg.data.tasks)
    BACKBONES.get(cfg.model.backbone)
    HEADS.get(cfg.model.dense_head)
    HEADS.get(cfg.model.class_head)


def read_run_config(run_dir: str | os.PathLike) -> Config:
    """The ``config.yaml`` a run directory holds; an error in it names the file.

    A run written by another version of dymu, whose file lacks keys dymu has now or holds
    keys it no longer has, is refused with one line: what its artifacts were made from
    cannot be told from today's defaults, so nothing is guessed.
    """
    from dymu.config import dotted_keys, from_dict, load_yaml, to_dict

    path = Path(run_dir) / "config.yaml"
    fix = f"rerun dymu search --run {run_dir}"
    if not read_text(path, "run config", fix).strip():
        raise UserError(f"run config {path} is damaged (empty); {fix}")
    raw = load_yaml(path)  # its errors name the file
    want, have = set(dotted_keys(to_dict(Config()))), set(dotted_keys(raw))
    drift = [f"lacks {k}" for k in sorted(want - have)]
    drift += [f"has {k}, which dymu no longer has" for k in sorted(have - want)]
    if drift:
        more = f" and {len(drift) - 1} more" if len(drift) > 1 else ""
        raise UserError(
            f"{run_dir} was made by another version of dymu (its config.yaml {drift[0]}{more}); "
            f"{fix} (its stages are retrained where their inputs changed)"
        )
    try:
        return from_dict(raw)
    except UserError as exc:
        text = str(exc).removeprefix("config: ")
        raise UserError(f"run config {path} is damaged ({text}); {fix}") from None


def start_run(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Check the config's names, create ``run_dir``, take its lock (one writer at a time),
    remove temporary files that killed writers left, and write ``config.yaml`` (fully
    resolved) and ``env.json``.

    Under ``torchrun`` only rank 0 locks and writes (with the number of processes in
    ``env.json``); every rank gets the path.
    """
    check_names(cfg)
    device = resolve_device(cfg.run.device)
    path = ensure_dir(run_dir)
    if dist.is_main():
        lock_run(path, write=True)
        clean_stale(path, recursive=True)
        write_text(path / "config.yaml", to_yaml(cfg))
        info = env_info(device)
        if dist.is_distributed():
            info["processes"] = dist.world_size()
        write_json(path / "env.json", info)
    return path
