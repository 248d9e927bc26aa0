"""Task weighting: how T task losses become one update of a shared multi-task model.

The "architecture x weighting" split of LibMTL: a model computes one loss per task, a
:class:`Weighting` turns them into gradients. The contract of every strategy is
:meth:`Weighting.backward`::

    weights = weighting.backward(losses, shared, representation=z)   # losses: [T]
    optimizer.step()

``losses`` is a [T] tensor or, better for the gradient methods, a sequence of T scalar
tensors: back-propagating one entry of a stacked tensor also sends zeros through every
other task's head (autograd does not skip zero gradients), so with a stacked tensor each of
the T per-task passes visits all T heads.

After the call every parameter the losses depend on has its ``.grad`` *accumulated*
(added to what was there, like ``Tensor.backward``):

- the ``shared`` parameters get the method's combined gradient;
- every other parameter (the task-specific heads) gets ``h_t * d L_t / d theta`` of its
  own task ``t``; the head factor ``h_t`` is documented per method: it is the loss weight
  for the loss-weighting methods (equal, uncertainty, DWA) and 1 for the gradient methods
  (MGDA-UB, PCGrad, tensioner), as in their papers' algorithms and in LibMTL.

Two families share the plumbing here:

- :class:`LossWeighting`: the update is the gradient of a scalarised loss
  ``sum_t w_t L_t (+ extra terms)``; one ``backward`` pass.
- :class:`GradientWeighting`: the method looks at the per-task gradients ``g_t`` of the
  shared part and returns coefficients ``c`` [T]; the shared parameters get
  ``sum_t c_t g_t``. Every such method here (min-norm MGDA, PCGrad's projections, the
  tensioner's bisector, tensions and repair) is a linear map of the ``g_t`` whose
  coefficients depend only on their Gram matrix ``M = G G^T``, so methods work on the
  [T, T] matrix (float64) and touch the [T, P] gradients only to form ``M`` and
  ``c @ G``. The returned weights are ``c``.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from dymu import dist
from dymu.errors import RuntimeFailure, UserError
from dymu.registry import Registry
from dymu.weighting.min_norm import gram_matrix

WEIGHTINGS: Registry[type[Weighting]] = Registry("weighting")
"""Weighting classes by name: ``equal``, ``uncertainty``, ``dwa``, ``mgda_ub``, ``pcgrad``,
``tensioner``."""


W = TypeVar("W", bound="Weighting")


def register(name: str) -> Callable[[type[W]], type[W]]:
    """Class decorator: register a :class:`Weighting` as ``name`` and set its ``name``."""

    def deco(cls: type[W]) -> type[W]:
        cls.name = name
        return WEIGHTINGS.register(name)(cls)

    return deco


class Weighting(nn.Module, abc.ABC):
    """Base of all task weightings: per-step gradients plus an optional per-epoch hook.

    Learnable weightings keep their parameters as ordinary ``nn.Module`` parameters (give
    ``weighting.parameters()`` to the optimizer); stateful ones keep their state in buffers,
    so ``state_dict`` checkpoints and resumes them.

    Attributes:
        num_tasks: ``T``.
        log: detached diagnostics of the last :meth:`backward` for the trainer to record;
            always holds ``"weights"`` [T] (the returned weights), plus method-specific
            entries named in each class's docstring.
    """

    name: str = ""

    def __init__(self, *, num_tasks: int) -> None:
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise UserError(f"weighting: num_tasks must be an integer >= 1, got {num_tasks!r}")
        self.num_tasks = num_tasks
        self.log: dict[str, Tensor] = {}

    @abc.abstractmethod
    def backward(
        self,
        losses: Tensor | Sequence[Tensor],
        shared: Sequence[Tensor],
        *,
        representation: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Accumulate the method's gradients into ``.grad`` (see the module docstring).

        Args:
            losses: one scalar loss per task, with its graph: a [T] tensor or T scalars
                (the latter saves the gradient methods work, see the module docstring).
            shared: the shared parameters (leaves with ``requires_grad``).
            representation: the shared encoder's output that the heads read, with its graph,
                or several such outputs (e.g. the last features and a skip connection's);
                gradient methods then take task gradients w.r.t. it (all tensors' total
                derivatives, concatenated) instead of the shared parameters, MGDA-UB's
                "upper bound". Every path from the shared parameters to the losses must go
                through one of these tensors. Loss-weighting methods ignore it.

        Returns:
            [T] detached weights of this step, as each method defines them.
        """

    def epoch_end(self, mean_losses: Tensor) -> None:
        """Hook after every training epoch with the epoch's mean task losses [T]; no-op."""
        del mean_losses

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}"

    def _split_losses(self, losses: Tensor | Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
        """``(T scalar losses, the same stacked [T])``; ValueError on another count or shape."""
        if isinstance(losses, Tensor):
            if tuple(losses.shape) != (self.num_tasks,):
                raise ValueError(
                    f"{self.name}: losses must be a [{self.num_tasks}] tensor, "
                    f"got {tuple(losses.shape)}"
                )
            return list(losses.unbind()), losses
        parts = list(losses)
        if len(parts) != self.num_tasks or not all(
            isinstance(x, Tensor) and x.numel() == 1 for x in parts
        ):
            raise ValueError(f"{self.name}: losses must be {self.num_tasks} scalar tensors")
        parts = [x.reshape(()) for x in parts]
        return parts, torch.stack(parts)


class LossWeighting(Weighting):
    """A weighting whose update is the gradient of one scalarised loss.

    Shared parameters get ``sum_t w_t g_t`` (plus the gradient of any extra term), heads
    get ``w_t`` times their own task's gradient: head factor ``h_t = w_t``.
    ``log`` also holds ``"total"``, the scalarised loss.
    """

    @abc.abstractmethod
    def combine(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        """``(scalarised loss with its graph, weights [T] detached)`` for ``losses`` [T]."""

    def backward(
        self,
        losses: Tensor | Sequence[Tensor],
        shared: Sequence[Tensor],
        *,
        representation: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor:
        del shared, representation  # one backward of the scalarised loss reaches everything
        total, weights = self.combine(self._split_losses(losses)[1])
        total.backward()
        self.log = {"weights": weights, "total": total.detach()}
        return weights


class GradientWeighting(Weighting):
    """A weighting that combines the per-task gradients of the shared part linearly.

    ``backward`` collects ``G`` [T, P] (task gradients of the shared parameters, or of the
    ``representation`` when given), asks :meth:`coefficients` for ``c`` [T] from the Gram
    matrix ``M = G G^T`` (float64), and makes the shared parameters' gradient
    ``sum_t c_t g_t``. Heads get their own task's gradient unscaled (``h_t = 1``), as in
    MGDA-UB's Algorithm 2, PCGrad's and the tensioner's code, and LibMTL.

    Cost: parameter mode runs T backward passes through the whole graph (each accumulating
    the heads' gradients once); representation mode runs T backward passes through the
    heads only plus one through the whole graph, with a hook that replaces the gradient
    arriving at the representation by ``sum_t c_t dL_t/dz``.
    """

    @abc.abstractmethod
    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """Coefficients ``c`` [T] of the shared update ``sum_t c_t g_t``.

        Args:
            gram: [T, T] float64 ``M[i, j] = <g_i, g_j>``.
            losses: [T] float64 loss values of this step.
        """

    def backward(
        self,
        losses: Tensor | Sequence[Tensor],
        shared: Sequence[Tensor],
        *,
        representation: Tensor | Sequence[Tensor] | None = None,
    ) -> Tensor:
        parts, losses = self._split_losses(losses)
        params = _check_shared(self.name, shared)
        # Under torchrun the coefficients come from the global batch's gradients and losses,
        # the same on every rank; the trainer then averages the parameters' gradients.
        if representation is None:
            grads, saved = _parameter_grads(parts, params)  # [T, P]
            grads = dist.all_reduce_mean(grads)  # the global batch's mean loss's gradients
            gram = gram_matrix(grads)
        else:
            reps = _representations(self.name, representation)
            grads = _representation_grads(parts, reps)  # [T, Z], this rank's part of the batch
            # dL_t/dz on rank r is g_t^r / world, and the ranks' z are disjoint: the global
            # Gram matrix is the ranks' summed Gram matrices over world^2.
            gram = dist.all_reduce_mean(gram_matrix(grads)) / dist.world_size()
        losses = dist.all_reduce_mean(losses.detach())
        gram = gram.cpu().numpy()
        if not np.all(np.isfinite(gram)):
            bad = [t for t in range(self.num_tasks) if not np.isfinite(gram[t, t])]
            raise RuntimeFailure(f"{self.name}: task gradients are not finite (tasks {bad})")
        coef = self.coefficients(gram, losses.double().cpu().numpy())
        weights = torch.as_tensor(coef, dtype=grads.dtype, device=grads.device)
        combined = weights @ grads  # [P] or [Z]
        if representation is None:
            _set_grads(params, saved, combined)
        else:
            _backward_through(parts, reps, combined)
        weights = weights.to(losses.dtype)
        self.log = {"weights": weights, **self._extra_log()}
        return weights

    def _extra_log(self) -> dict[str, Tensor]:
        """Method-specific diagnostics of the last step (``log`` minus ``"weights"``)."""
        return {}


# ------------------------------------------------------------------------- gradient plumbing


def _check_shared(name: str, shared: Sequence[Tensor]) -> list[Tensor]:
    params = list(shared)
    if not params:
        raise ValueError(f"{name}: no shared parameters given")
    for p in params:
        if not isinstance(p, Tensor) or not p.requires_grad or not p.is_leaf:
            raise ValueError(f"{name}: shared parameters must be leaf tensors requiring grad")
    return params


def _parameter_grads(
    losses: list[Tensor], params: list[Tensor]
) -> tuple[Tensor, list[Tensor | None]]:
    """Per-task gradients of ``params`` [T, P], by T ``backward`` passes (LibMTL's way).

    Each pass also accumulates ``dL_t/dtheta`` into the heads, so heads end with
    ``sum_t dL_t/dtheta`` (each head sees only its own task). The shared parameters'
    previous ``.grad`` is returned so the combined gradient can be added to it.
    """
    saved = [p.grad for p in params]
    rows = []
    last = max((t for t in range(len(losses)) if losses[t].requires_grad), default=-1)
    for t in range(len(losses)):
        for p in params:
            p.grad = None
        if losses[t].requires_grad:
            losses[t].backward(retain_graph=t < last)
        rows.append(
            torch.cat(
                [
                    (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                    for p in params
                ]
            )
        )  # [P]
    for p in params:
        p.grad = None
    return torch.stack(rows), saved  # [T, P]


def _set_grads(params: list[Tensor], saved: list[Tensor | None], combined: Tensor) -> None:
    """Shared ``.grad`` = previous ``.grad`` + the slice of ``combined`` [P] of each parameter."""
    offset = 0
    for p, old in zip(params, saved, strict=True):
        new = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
        offset += p.numel()
        p.grad = new if old is None else old + new


def _representations(name: str, representation: Tensor | Sequence[Tensor]) -> list[Tensor]:
    reps = [representation] if isinstance(representation, Tensor) else list(representation)
    if not reps or not all(isinstance(z, Tensor) and z.grad_fn is not None for z in reps):
        raise ValueError(
            f"{name}: representation must be the shared encoder's output(s), carrying the graph"
        )
    return reps


def _representation_grads(losses: list[Tensor], reps: list[Tensor]) -> Tensor:
    """Per-task total derivatives w.r.t. the representation tensors: [T, sum numel(z)]."""
    rows = []
    for loss in losses:
        grads: Sequence[Tensor | None] = [None] * len(reps)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, reps, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(z)).reshape(-1)
                    for g, z in zip(grads, reps, strict=True)
                ]
            )
        )
    return torch.stack(rows)  # [T, sum numel(z)]


def _backward_through(losses: list[Tensor], reps: list[Tensor], combined: Tensor) -> None:
    """One backward of ``sum_t L_t`` with the gradient at each ``reps[k]`` replaced.

    Each tensor's hook fires once its total gradient is accumulated and substitutes the
    slice of ``combined`` = ``sum_t c_t dL_t/dz_k``, so every shared parameter below
    ``z_k`` (and above any earlier one) receives ``sum_t c_t dL_t/dtheta``.
    """
    handles = []
    for z, part in zip(reps, combined.split([z.numel() for z in reps]), strict=True):
        replacement = part.view_as(z)
        handles.append(z.register_hook(lambda g, r=replacement: r.to(g.dtype)))
    try:
        torch.autograd.backward([x for x in losses if x.requires_grad])
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------- option validation


def check_number(
    name: str,
    option: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    integer: bool = False,
    open_low: bool = False,
) -> float:
    """``value`` as a float (or int) in ``[low, high]``, else a :class:`UserError`.

    ``open_low`` excludes ``low`` itself (e.g. a temperature must be ``> 0``).
    """
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise UserError(f"weighting {name!r}: {option} must be {kind}, got {value!r}")
    too_low = low is not None and (value <= low if open_low else value < low)
    if too_low or (high is not None and value > high):
        lo = "(" if open_low else "["
        rng = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise UserError(f"weighting {name!r}: {option} must be in {rng}, got {value!r}")
    return value


def weighting_options(name: str) -> dict[str, Any]:
    """The options of weighting ``name`` and their defaults (``num_tasks`` excluded)."""
    params = inspect.signature(WEIGHTINGS.get(name).__init__).parameters
    return {
        key: p.default
        for key, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and key != "num_tasks"
    }


def build_weighting(name: str, *, num_tasks: int, **options: Any) -> Weighting:
    """Build the weighting registered as ``name`` for ``num_tasks`` tasks.

    Args:
        name: one of :data:`WEIGHTINGS`.
        num_tasks: ``T``.
        **options: the strategy's keyword options (see :func:`weighting_options`).

    Raises:
        UserError: unknown name (listing the known ones), an option the strategy does not
            take (listing the ones it takes), or a bad option value.
    """
    cls = WEIGHTINGS.get(name)
    valid = weighting_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(
            f"weighting {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(valid) or '(none)'}"
        )
    return cls(num_tasks=num_tasks, **options)
