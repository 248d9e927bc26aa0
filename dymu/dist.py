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
* batch norms use the statistics of the global batch (:class:`GlobalBatchNorm` off CUDA,
  torch's :class:`~torch.nn.SyncBatchNorm` on CUDA), since per-rank statistics would
  normalise every shard differently from the single-process run.

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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dymu.errors import UserError


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


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


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: y = sum_r x_r on every rank.

    Every rank's loss depends on y, so dJ/dx_r = sum_r' dJ_r'/dy: the backward pass is the
    same all-reduce applied to the incoming gradients.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = x.clone(memory_format=torch.contiguous_format)
        torch_dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _AllReduceSum.apply(grad)


class GlobalBatchNorm(_BatchNorm):
    """Batch norm over the global batch of all ranks, for any backend (gloo on CPU too).

    y = (x - mu) / sqrt(var + eps) * gamma + beta, where mu and the biased var are taken
    over the batch and spatial positions of every rank's shard, so a step on K ranks equals
    the single-process step on the whole batch (Ioffe & Szegedy, 2015; the cross-device
    form is MegDet's, Peng et al., 2018). torch's ``SyncBatchNorm`` does this on GPUs only;
    this module does it with two differentiable all-reduces (the sums, then the squared
    deviations from the global mean: two passes, so no E[x^2] - mu^2 cancellation).
    Running statistics are updated with the global mean and unbiased variance, identically
    on every rank. Evaluation, and training outside a process group, is plain batch norm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and _initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        c = input.shape[1]
        dims = [0, *range(2, input.dim())]  # every axis but the channels
        shape = [1, c] + [1] * (input.dim() - 2)  # broadcasts a [C] vector over x
        local = input.numel() // c
        sums = _AllReduceSum.apply(  # [C + 1]: per-channel sums, then the item count
            torch.cat([input.sum(dims), input.new_tensor([local])])
        )
        count = sums[c].detach()
        mean = sums[:c] / count  # [C]
        centred = input - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims)) / count  # [C], biased
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (count / max(float(count) - 1.0, 1.0))
                self.running_mean.lerp_(mean, factor)
                self.running_var.lerp_(unbiased, factor)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> GlobalBatchNorm:
        """A GlobalBatchNorm sharing ``bn``'s parameters and buffers (the same tensors, so an
        optimizer built on ``bn``'s parameters keeps working)."""
        out = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            out.weight, out.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            out.running_mean, out.running_var = bn.running_mean, bn.running_var
            out.num_batches_tracked = bn.num_batches_tracked
        out.train(bn.training)
        return out


class GlobalBatchDropout(nn.Module):
    """Dropout whose mask is drawn for the whole global batch, then sharded.

    ``F.dropout`` on one rank's shard would draw a mask of the shard's size; drawing it on
    a ones tensor of the global batch's shape consumes the random stream exactly as the
    single-process run does (its values are 0 or 1/(1-p)), and every rank keeps its slice.
    Costs one global-batch-sized temporary per call.
    """

    def __init__(self, p: float, part: Shard) -> None:
        super().__init__()
        self.p = p
        self.part = part

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        shape = (x.shape[0] * self.part.world, *x.shape[1:])  # the global batch
        keep = F.dropout(torch.ones(shape, dtype=x.dtype, device=x.device), self.p, True)
        return x * self.part.take(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}, rank={self.part.rank}, world={self.part.world}"


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


def global_count(local: int) -> int:
    """Items in the global batch when every rank holds ``local`` of them."""
    return local * world_size()
