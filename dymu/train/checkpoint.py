"""Checkpoints of the step-based stages: save everything a resumed run needs, atomically.

A checkpoint is a ``torch.save`` dict of state dicts, plain numbers and strings, read back
with ``torch.load(weights_only=True)`` so loading never runs code from the file. It records
the config hash of its stage; a checkpoint from another config is refused with one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dymu import dist
from dymu.artifacts import read_checkpoint
from dymu.errors import UserError
from dymu.io import atomic_path, write_json


def save_checkpoint(
    path: Path, config_hash: str, step: int, model, optimizer, scheduler, **extra: Any
) -> None:
    """Write the model's, optimizer's and scheduler's (if any) state, ``extra`` (tensors,
    numbers, RNG states), the step and the config hash."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **extra}
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    with atomic_path(path) as tmp:
        torch.save({**state, "step": int(step), "config_hash": config_hash}, tmp)


def load_checkpoint(
    path: Path, config_hash: str, stage: str, model, optimizer, scheduler
) -> dict[str, Any]:
    """Restore model, optimizer and scheduler (if any) from a checkpoint of ``stage`` written by
    :func:`save_checkpoint` for ``config_hash``; return the whole record (``step`` and
    the extras).

    Raises:
        UserError: the file is unreadable or was written with another config.
    """
    state = read_checkpoint(path, f"{stage} checkpoint", "delete it or drop --resume")
    if state.get("config_hash") != config_hash:
        raise UserError(
            f"{stage} checkpoint {path} was made with another config; delete it or drop --resume"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def write_finished(
    weights: Path, record_path: Path, module, meta: dict[str, Any], record: dict, ckpt: Path
) -> None:
    """A finished stage's files, which supersede its checkpoint: ``module``'s weights as
    safetensors (``meta`` in the header), the record as JSON, the checkpoint removed. Under
    torchrun rank 0 writes them and every rank waits until they exist."""
    if dist.is_main():
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        with atomic_path(weights) as tmp:
            save_file(state, str(tmp), metadata={"dymu": json.dumps(meta)})
        write_json(record_path, record)
        ckpt.unlink(missing_ok=True)
    dist.barrier()


def record_matches(record_path: Path, config_hash: str) -> bool:
    """Whether a finished stage's JSON record exists and carries ``config_hash`` (an
    unreadable record counts as no match: the stage runs again)."""
    if not record_path.is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(record, dict) and record.get("config_hash") == config_hash


def rng_state(rng) -> dict[str, Any]:
    """A numpy Generator's state as plain Python values (loadable with weights_only)."""
    return rng.bit_generator.state


def set_rng_state(rng, state: dict[str, Any]) -> None:
    rng.bit_generator.state = state
