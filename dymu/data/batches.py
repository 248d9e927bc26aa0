"""Batches of a dataset: iteration (shuffled, sharded for torchrun, pinned), endless
streams for step-based stages, moving to a device, and horizontal flips that every task's
target follows. Every training stage and the affinity estimate draw their data here."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from dymu.data.base import ArrayDataset, MultiTaskDataset
from dymu.dist import WHOLE, Shard
from dymu.errors import UserError
from dymu.tasks import Task


def num_batches(ds: MultiTaskDataset, batch_size: int, drop_last: bool) -> int:
    n = len(ds)
    return n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)


def iterate(
    ds: MultiTaskDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    workers: int = 0,
    pin_memory: bool = False,
    shard: Shard = WHOLE,
) -> Iterator[dict[str, Tensor]]:
    """Batches of ``ds``. In-memory datasets are sliced as whole arrays (no per-sample
    Python work); folder datasets go through a DataLoader with ``workers`` processes.

    ``batch_size`` is the global batch; each batch holds this rank's contiguous part of it
    (``shard``, all of it by default): every rank walks the same index order, so the ranks'
    parts together are exactly the single-process batch.

    ``pin_memory`` puts every batch in page-locked memory, so that :func:`to_device` copies
    it to the GPU asynchronously; without CUDA it is ignored (same batches, no warning), so
    callers may pass ``device.type == "cuda"`` or simply True.
    """
    drop_last = drop_last and len(ds) >= batch_size  # never drop a whole small split
    pin_memory = pin_memory and can_pin()
    if isinstance(ds, ArrayDataset):
        order = np.random.default_rng(seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            positions = order[start : start + batch_size]  # the global batch
            batch = ds.batch(positions[shard.part(len(positions))])
            yield pin(batch) if pin_memory else batch
        return
    gen = torch.Generator().manual_seed(seed)
    if shard.world > 1:
        # The samplers DataLoader builds from shuffle/batch_size/drop_last, with the same
        # generator, so the global batches are the unsharded ones.
        sampler = RandomSampler(ds, generator=gen) if shuffle else SequentialSampler(ds)
        yield from DataLoader(
            ds,
            batch_sampler=_ShardedBatches(BatchSampler(sampler, batch_size, drop_last), shard),
            generator=gen,
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )
        return
    yield from DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=gen,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def can_pin() -> bool:
    """Whether batches can be pinned: page-locked host memory is a CUDA facility, and
    ``Tensor.pin_memory`` raises (DataLoader warns) where CUDA is absent."""
    return torch.cuda.is_available()


def pin(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` copied into page-locked memory (needs CUDA: see :func:`can_pin`).

    One host copy per tensor, from torch's caching host allocator (no new allocation once
    warm); it lets ``to(device, non_blocking=True)`` overlap the upload with the host's
    work on the next step instead of staging it through pageable memory synchronously.
    """
    return {k: v.pin_memory() for k, v in batch.items()}


class _ShardedBatches:
    """A batch sampler's batches cut to one rank's contiguous part."""

    def __init__(self, batches: BatchSampler, shard: Shard) -> None:
        self.batches = batches
        self.shard = shard

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.batches:
            yield indices[self.shard.part(len(indices))]

    def __len__(self) -> int:
        return len(self.batches)


def endless(
    ds: MultiTaskDataset,
    batch_size: int,
    seed: int,
    start: int = 0,
    shard: Shard = WHOLE,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Shuffled batches without end, a new order every pass (step-based stages 1 and 2).

    ``start`` skips that many batches, so a resumed stage sees the batches an uninterrupted
    run would have seen. ``shard``, ``workers`` and ``pin_memory`` are as in
    :func:`iterate` (``batch_size`` is global); neither of the last two changes the batches.
    """
    per_epoch = num_batches(ds, batch_size, drop_last=True)
    epoch, skip = divmod(start, per_epoch)
    while True:
        batches = iterate(
            ds,
            batch_size,
            shuffle=True,
            seed=seed * 1000 + epoch,
            drop_last=True,
            workers=workers,
            pin_memory=pin_memory,
            shard=shard,
        )
        yield from itertools.islice(batches, skip, None)
        epoch, skip = epoch + 1, 0


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """``batch`` on ``device``; asynchronous from pinned memory (``iterate(pin_memory=...)``),
    a no-op for tensors already there."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def check_flips(info, flips: dict[str, bool]) -> None:
    """Refuse flips a dataset forbids (:attr:`DatasetInfo.hflip`), naming the keys to turn
    off: ``flips`` maps config keys (``"stage0.hflip"``...) to their values. Every stage that
    flips calls this before its first step, and ``dymu search`` before any stage."""
    on = [key for key, value in flips.items() if value]
    if on and not info.hflip:
        raise UserError(
            f"dataset {info.name} may not be flipped (a mirrored image is not one of its "
            f"images); set {' '.join(f'{k}=false' for k in on)}"
        )


def random_hflip(
    batch: dict[str, Tensor],
    tasks: Sequence[Task],
    generator: torch.Generator,
    shard: Shard = WHOLE,
) -> dict[str, Tensor]:
    """Mirror a random half of the samples; normals' x component changes sign with them.

    ``batch`` is this rank's ``shard`` of the global batch (all of it by default): the
    coins are tossed for the whole global batch, as the single-process run tosses them, and
    this rank's part kept, so every rank must call this with the same generator state.
    """
    image = batch["image"]
    coins = torch.rand(image.shape[0] * shard.world, generator=generator)  # [B * world]
    flip = shard.take(coins) < 0.5  # [B]
    if not flip.any():
        return batch
    flip = flip.to(image.device)
    out = dict(batch)
    out["image"] = torch.where(flip[:, None, None, None], image.flip(-1), image)
    for task in tasks:
        if not task.dense:
            continue
        t = batch[task.name]
        mirrored = t.flip(-1)
        if task.kind == "normals":
            mirrored = mirrored * torch.tensor([-1.0, 1.0, 1.0], device=t.device)[:, None, None]
        shape = (-1,) + (1,) * (t.ndim - 1)
        out[task.name] = torch.where(flip.view(shape), mirrored, t)
    return out
