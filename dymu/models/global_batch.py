"""Layers whose statistics and random masks span the global batch of every ``torchrun``
rank, so that a step on K ranks equals the single-process step (see :mod:`dymu.dist`);
outside a process group each is its plain counterpart."""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from dymu.dist import Shard, initialized


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
        if not (self.training and initialized()):
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
