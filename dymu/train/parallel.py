"""A training stage's module ready for data-parallel steps under ``torchrun``: global batch
norms and dropouts swapped in (:mod:`dymu.models.global_batch`), then DDP on top. Outside a
process group nothing changes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dymu.dist import is_distributed, shard
from dymu.models.global_batch import GlobalBatchDropout, GlobalBatchNorm


def _replace(module: nn.Module, convert) -> list[tuple[nn.Module, str, nn.Module]]:
    """Swap, in place, every descendant that ``convert`` maps to a new module; return
    (parent, name, old module) of every swap, to undo them."""
    swapped = []
    for name, child in module.named_children():
        new = convert(child)
        if new is child:
            swapped += _replace(child, convert)
        else:
            setattr(module, name, new)
            swapped.append((module, name, child))
    return swapped


def _global_batchnorm(device: torch.device):
    def convert(m: nn.Module) -> nn.Module:
        if not isinstance(m, _BatchNorm) or isinstance(m, (GlobalBatchNorm, nn.SyncBatchNorm)):
            return m
        if device.type == "cuda":  # torch's fused kernels; it refuses CPU tensors
            return nn.SyncBatchNorm.convert_sync_batchnorm(m)
        return GlobalBatchNorm.from_batchnorm(m)

    return convert


@contextmanager
def global_batch(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``module`` with global batch norms and dropouts while the block runs (in place,
    sharing parameters and buffers; the original modules are put back on exit). Nothing
    changes when not distributed. :func:`data_parallel` adds DDP on top; use this alone
    where gradients are averaged by :func:`average_gradients`."""
    if not is_distributed():
        yield module
        return
    part = shard()
    swapped = _replace(module, _global_batchnorm(device))
    swapped += _replace(
        module, lambda m: GlobalBatchDropout(m.p, part) if type(m) is nn.Dropout else m
    )
    try:
        yield module
    finally:
        for parent, name, old in reversed(swapped):
            setattr(parent, name, old)


@contextmanager
def data_parallel(
    module: nn.Module, device: torch.device, find_unused: bool = False
) -> Iterator[nn.Module]:
    """``module`` ready for data-parallel steps while the block runs.

    Not distributed: yields ``module`` itself and changes nothing. Under torchrun: swaps its
    batch norms for global ones and its dropouts for :class:`GlobalBatchDropout` (in place,
    sharing parameters and buffers, so optimizers and checkpoints of ``module`` keep
    working) and yields it wrapped in DistributedDataParallel; on exit the original modules
    are put back, holding the trained values, so code that looks for ``nn.BatchNorm2d``
    (writing stacked streams back, folding) finds them.

    Call the yielded module's ``forward`` for each step: DDP synchronises gradients only of
    work done there. ``find_unused``: some parameters may take no part in a step (the weight
    hypernet's adapters of edges that step's tree lacks).
    """
    if not is_distributed():
        yield module
        return
    with global_batch(module, device):
        ids = [device.index] if device.type == "cuda" else None
        yield nn.parallel.DistributedDataParallel(
            module, device_ids=ids, find_unused_parameters=find_unused
        )
