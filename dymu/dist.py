"""Data-parallel training over the processes ``torchrun`` starts (one per device).

``torchrun --nproc-per-node K -m dymu ...`` starts K copies of the command and tells each its
place through the environment: ``RANK`` (0..K-1 over all machines), ``LOCAL_RANK`` (0..K-1
on this machine: the GPU it takes) and ``WORLD_SIZE`` (K). Without those variables every
helper here answers for one process (rank 0 of 1) and changes nothing, so a plain run is
exactly what it was before distribution existed.

A step on K ranks is the single-process step on the same global batch of B images:

* every rank walks the same shuffled index order and keeps its own contiguous B/K of each
  global batch (:class:`Shard`); random flips and dropout masks are drawn for the whole
  global batch from generators seeded alike on every rank, then sharded;
* :class:`~torch.nn.parallel.DistributedDataParallel` averages the gradients, which equals
  the gradient of the global mean loss because the shards are equal in size (a loss that
  averages over the *valid* pixels of its batch gets the mean of the shards' means
  instead, which differs where the shards hold different numbers of ignored pixels);
* batch norms use the statistics of the global batch
  (:class:`~dymu.models.global_batch.GlobalBatchNorm` off CUDA, torch's
  :class:`~torch.nn.SyncBatchNorm` on CUDA), since per-rank statistics would normalise
  every shard differently from the single-process run; :mod:`dymu.train.parallel` swaps
  them in for a training stage.

This module is the process-group plumbing only; the layers are in
:mod:`dymu.models.global_batch`.

Rank 0 alone writes artifacts and checkpoints; the others wait at :func:`barrier` and read
what it wrote.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import Tensor

from dymu.errors import UserError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def initialized() -> bool:
    """Whether a process group is up (collectives can run)."""
    return _initialized()


def _initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    """How many processes train together (1 without torchrun)."""
    return torch_dist.get_world_size() if _initialized() else _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's place among all of them, 0..world_size()-1 (0 without torchrun)."""
    return torch_dist.get_rank() if _initialized() else _env_int("RANK", 0)


def local_rank() -> int:
    """This process's place on its machine: the index of the GPU it uses."""
    return _env_int("LOCAL_RANK", 0)


def is_distributed() -> bool:
    """Whether more than one process trains (torchrun started several)."""
    return world_size() > 1


def is_main() -> bool:
    """Whether this process is rank 0, the one that writes files and prints progress."""
    return rank() == 0


@dataclass(frozen=True)
class Shard:
    """This rank's part of every global batch: the ``rank``-th of ``world`` equal,
    contiguous slices, so that concatenating all ranks' parts in rank order gives back the
    global batch."""

    rank: int = 0
    world: int = 1

    def part(self, n: int) -> slice:
        """Where this rank's items lie among a global batch of ``n``.

        Raises:
            UserError: ``n`` does not split into ``world`` equal parts (unequal parts would
                weight the ranks' mean losses unequally, and the step would no longer be
                the single-process one).
        """
        if n % self.world:
            raise UserError(
                f"a batch of {n} does not split evenly over {self.world} processes; "
                f"use batch sizes (and splits) that are multiples of {self.world}"
            )
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def take(self, x: Tensor) -> Tensor:
        """This rank's rows of ``x`` (a tensor over the global batch)."""
        return x[self.part(x.shape[0])]


WHOLE = Shard()
"""The whole batch: the shard of a single process."""


def shard() -> Shard:
    """This process's :class:`Shard` (the whole batch without torchrun)."""
    return Shard(rank(), world_size())


def per_rank_batch(batch_size: int, key: str) -> int:
    """The images each rank holds of a global batch of ``batch_size``.

    Args:
        batch_size: the configured (global) batch size.
        key: its config key, for the error message.

    Raises:
        UserError: the batch does not split evenly over the processes.
    """
    world = world_size()
    if batch_size % world:
        raise UserError(
            f"{key}={batch_size} does not split evenly over {world} processes "
            f"(torchrun --nproc-per-node {world}); use a multiple of {world}"
        )
    return batch_size // world


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for everything else."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: torch.device, backend: str | None = None) -> bool:
    """Join the process group torchrun's environment describes; return whether distributed.

    Idempotent: a second call, a group set up by the caller, or a run without torchrun
    (``WORLD_SIZE`` unset or 1) does nothing. The group is destroyed at interpreter exit
    unless :func:`teardown` (or :func:`session`) does it first. Join once per process: a
    group made again after a teardown, under the same torchrun, can hang while its ranks
    connect (seen with torch 2.13 and gloo).

    Args:
        device: this rank's device (``cuda:LOCAL_RANK`` on GPUs); picks the backend.
        backend: ``gloo`` or ``nccl`` to override that choice.

    Raises:
        UserError: nccl without a CUDA device, or an unknown backend.
    """
    if _initialized():
        return world_size() > 1
    if _env_int("WORLD_SIZE", 1) <= 1:
        return False
    backend = backend or backend_for(device)
    if backend not in ("gloo", "nccl"):
        raise UserError(f"distributed backend must be gloo or nccl, got {backend!r}")
    if backend == "nccl" and not (device.type == "cuda" and torch.cuda.is_available()):
        raise UserError(
            f"the nccl backend needs a CUDA device, but this process runs on {device}; "
            "use gloo (run.device=cpu)"
        )
    if not torch_dist.is_available():
        raise UserError("this torch build has no torch.distributed; run without torchrun")
    if backend == "nccl":
        torch.cuda.set_device(device)
    torch_dist.init_process_group(
        backend, device_id=device if backend == "nccl" else None
    )  # reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    atexit.register(teardown)
    return True


def teardown() -> None:
    """Leave the process group, if this process is in one."""
    if _initialized():
        torch_dist.destroy_process_group()


@contextmanager
def session(device: torch.device, backend: str | None = None) -> Iterator[bool]:
    """:func:`setup` on entry and :func:`teardown` on exit; yields whether distributed."""
    try:
        yield setup(device, backend)
    finally:
        teardown()


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if not _initialized() or world_size() == 1:
        return
    if torch_dist.get_backend() == "nccl":
        torch_dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch_dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks after it has finished.

    For work whose result every rank then shares, such as generating a dataset cache: rank
    0 makes it, the others find it made.
    """
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def main_decides(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (``flag`` itself when not distributed).

    For a choice read from files, such as whether an artifact is up to date: rank 0 may
    write that file while another rank is still about to read it, and ranks that choose
    differently wait forever at different collectives.
    """
    if not _initialized() or world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=_collective_device())
    torch_dist.broadcast(value, src=0)
    return bool(value.item())


def _collective_device() -> torch.device:
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sums(values: Mapping[str, float | Tensor]) -> dict[str, float]:
    """Every value summed over all ranks, in one collective (the values unchanged when not
    distributed). Reduce sums and counts, then divide: a mean of per-rank means is wrong
    whenever the ranks saw different numbers of items."""
    names = list(values)
    if not _initialized() or world_size() == 1:
        return {k: float(values[k]) for k in names}
    flat = torch.tensor(  # [len(values)], float64 so sums of many items stay exact
        [float(values[k]) for k in names], dtype=torch.float64, device=_collective_device()
    )
    torch_dist.all_reduce(flat)
    return dict(zip(names, flat.tolist(), strict=True))


def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of ``x`` over all ranks (``x`` itself when not distributed); not
    differentiable. For values every rank must agree on, such as per-task gradients that a
    nonlinear weighting combines: combining each rank's own would not give the global step."""
    if not _initialized() or world_size() == 1:
        return x
    y = x.detach().clone(memory_format=torch.contiguous_format)
    torch_dist.all_reduce(y)
    return y / world_size()


def average_gradients(params) -> None:
    """Replace every parameter's ``.grad`` by its mean over the ranks, in one collective.

    What DDP does during ``backward``, for trainers whose step is not one ``backward`` of
    one loss (gradient-combining weightings, hypernets called through ``functional_call``):
    call it after the gradients are made and before the optimizer step. Every rank must
    pass the same parameters in the same order; a missing ``.grad`` counts as zeros (and
    stays missing when it is missing on every rank). No-op when not distributed.
    """
    if not _initialized() or world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    present = torch.tensor(  # [P] 1 where this rank has a gradient
        [p.grad is not None for p in params], dtype=torch.float64, device=_collective_device()
    )
    torch_dist.all_reduce(present)
    grads = [
        p.grad if p.grad is not None else torch.zeros_like(p)
        for p, n in zip(params, present.tolist(), strict=True)
        if n > 0
    ]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])  # [sum of numels], one all-reduce
    torch_dist.all_reduce(flat)
    flat /= world_size()
    i = 0
    for p, n in zip(params, present.tolist(), strict=True):
        if n == 0:
            continue
        p.grad = flat[i : i + p.numel()].view_as(p).clone()
        i += p.numel()


def global_count(local: int) -> int:
    """Items in the global batch when every rank holds ``local`` of them."""
    return local * world_size()
