"""Gradient-based task affinity: gradient cosine and TAG's lookahead (METHOD.md 1.3).

Both estimators look at the parameters the tasks share: tasks whose gradients point the
same way (cosine), or whose update lowers each other's loss (lookahead), help each other
when they share those parameters. The functions here are the math only; running the
network, choosing the shared parameters and drawing the batches is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["RunningMean", "gradient_cosine", "lookahead_affinity", "virtual_step_losses"]


def gradient_cosine(grads: Tensor) -> Tensor:
    """Cosine similarity between the tasks' gradients on the same shared parameters.

    ``C[i, j] = <g_i, g_j> / (||g_i|| ||g_j||)``, as used to detect conflicting gradients
    (Yu et al., "Gradient surgery for multi-task learning" (PCGrad), NeurIPS 2020; Du et
    al., "Adapting auxiliary losses using gradient similarity", 2018). Positive means a step
    for task i also descends task j's loss to first order. Symmetric.

    A task with a zero gradient (it does not reach these parameters, or it is solved) has
    no direction: its row and column are 0, diagonal included, instead of NaN.

    Args:
        grads: ``[N, P]``, row i is task i's gradient on the shared parameters, flattened
            and concatenated in the same order for every task.

    Returns:
        ``[N, N]`` float64, values in [-1, 1], diagonal 1 for non-zero gradients.

    Raises:
        ValueError: wrong shape, or NaN / inf among the gradients.
    """
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError(f"grads must be [N, P] with N >= 1, got shape {tuple(grads.shape)}")
    g = grads.detach().to(torch.float64)
    if not torch.isfinite(g).all():
        raise ValueError("gradients contain NaN or inf")
    norm = g.norm(dim=1, keepdim=True)  # [N, 1]
    nonzero = norm > 0  # [N, 1]
    g = torch.where(nonzero, g / norm.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    cos = (g @ g.T).clamp_(-1.0, 1.0)  # [N, P] @ [P, N] -> [N, N]
    # The diagonal is 1 by definition; rounding in the dot product would give 1 - 1e-16.
    cos.diagonal().copy_(nonzero.squeeze(1).to(cos.dtype))
    return cos


def lookahead_affinity(loss_before: Tensor, loss_after: Tensor, lr: float) -> Tensor:
    """TAG's lookahead inter-task affinity.

    ``Z[i, j] = (1 - L_j(theta - lr * g_i) / L_j(theta)) / lr``: the relative drop of task
    j's loss after one SGD step on the shared parameters taken with task i's gradient only
    (Fifty et al., "Efficiently identifying task groupings for multi-task learning", NeurIPS
    2021, eq. 3; the division by the step size, as in METHOD.md 1.3, makes values comparable
    across learning rates). Positive: task i's step helps task j; negative: it hurts.
    Not symmetric. TAG averages Z over many training steps (see :class:`RunningMean`).

    The ratio assumes positive losses (TAG's setting): a task whose loss before the step
    is 0 (or negative) gets a column of 0 instead of inf / NaN or a flipped sign.

    Args:
        loss_before: ``[N]``, task j's loss before the step (on the same batch).
        loss_after: ``[N, N]``, row i holds every task j's loss after the step with task
            i's gradient (see :func:`virtual_step_losses`).
        lr: the step size of the virtual step (> 0).

    Returns:
        ``Z``: ``[N, N]`` float64.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    n = loss_before.shape[0] if loss_before.dim() == 1 else -1
    if n < 1 or loss_after.shape != (n, n):
        raise ValueError(
            f"loss_before must be [N] and loss_after [N, N], got {tuple(loss_before.shape)} "
            f"and {tuple(loss_after.shape)}"
        )
    before = loss_before.detach().to(torch.float64)
    after = loss_after.detach().to(torch.float64)
    if not (torch.isfinite(before).all() and torch.isfinite(after).all()):
        raise ValueError("losses contain NaN or inf")
    ratio = after / before.clamp_min(torch.finfo(before.dtype).tiny).unsqueeze(0)  # [N, N]
    return torch.where(before.unsqueeze(0) > 0, (1.0 - ratio) / lr, 0.0)


def virtual_step_losses(
    params: Sequence[Tensor],
    task_grads: Sequence[Sequence[Tensor | None]],
    loss_fn: Callable[[list[Tensor]], Tensor],
    lr: float,
) -> Tensor:
    """Every task's loss after a virtual SGD step with each task's gradient (TAG's lookahead).

    Row i is ``loss_fn([p - lr * g_i(p) for p in params])``. The parameters are never
    changed: each step builds new tensors and the loss is evaluated on them under
    ``torch.no_grad()``, so the caller's model and optimiser state stay as they were.

    Args:
        params: the shared parameters, theta.
        task_grads: ``task_grads[i][k]`` is task i's gradient on ``params[k]`` (same
            shape). ``None`` (as ``torch.autograd.grad(..., allow_unused=True)`` returns
            for a parameter the task does not reach) means a zero gradient.
        loss_fn: ``loss_fn(values)`` evaluates all N tasks' losses with the shared
            parameters set to ``values`` (aligned with ``params``), e.g. through
            ``torch.func.functional_call``, on the same batch as the gradients; returns
            ``[N]``.
        lr: step size of the virtual step (> 0).

    Returns:
        ``loss_after``: ``[N, N]`` float64, row i = losses after task i's step; feed it to
        :func:`lookahead_affinity`.
    """
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0, got {lr}")
    n = len(task_grads)
    if n < 1:
        raise ValueError("task_grads is empty: need one gradient list per task")
    rows = []
    with torch.no_grad():
        for i, grads in enumerate(task_grads):
            if len(grads) != len(params):
                raise ValueError(
                    f"task {i} has {len(grads)} gradients for {len(params)} parameters"
                )
            stepped = []
            for k, (p, g) in enumerate(zip(params, grads, strict=True)):
                if g is None:
                    stepped.append(p.detach())
                    continue
                if g.shape != p.shape:
                    raise ValueError(
                        f"task {i}: gradient {k} has shape {tuple(g.shape)}, "
                        f"parameter has {tuple(p.shape)}"
                    )
                stepped.append(p.detach() - lr * g.detach())  # a new tensor: p is untouched
            losses = loss_fn(stepped)
            if losses.shape != (n,):
                raise ValueError(
                    f"loss_fn must return one loss per task, shape ({n},), "
                    f"got {tuple(losses.shape)}"
                )
            rows.append(losses.detach().to(torch.float64))
    return torch.stack(rows)  # N x [N] -> [N, N]


class RunningMean:
    """Average of equally shaped matrices over batches, kept in float64.

    TAG and gradient cosine are noisy per batch; the orchestration averages them over a
    number of batches (``affinity.batches`` in the config)::

        avg = RunningMean()
        for batch in batches:
            avg.update(gradient_cosine(grads_of(batch)))
        affinity = avg.value()
    """

    def __init__(self) -> None:
        self._sum: Tensor | None = None
        self.count = 0

    def update(self, m: Tensor) -> None:
        """Add one matrix ``[..., N, N]`` (its shape must match earlier ones)."""
        m = m.detach().to(torch.float64)
        if self._sum is None:
            self._sum = m.clone()
        elif m.shape != self._sum.shape:
            raise ValueError(
                f"RunningMean got shape {tuple(m.shape)}, earlier {tuple(self._sum.shape)}"
            )
        else:
            self._sum += m
        self.count += 1

    def value(self) -> Tensor:
        """The mean of all matrices so far (float64); an error before the first update."""
        if self._sum is None:
            raise ValueError("RunningMean.value() before any update()")
        return self._sum / self.count
