"""Loss weightings (equal, uncertainty, DWA) and gradient weightings (MGDA-UB, PCGrad).

The task tensioner lives in :mod:`dymu.weighting.tensioner`; the shared min-norm solver in
:mod:`dymu.weighting.min_norm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from dymu.errors import UserError
from dymu.weighting.base import GradientWeighting, LossWeighting, check_number, register
from dymu.weighting.min_norm import min_norm_weights

# --------------------------------------------------------------------------- loss weightings


@register("equal")
class Equal(LossWeighting):
    """Fixed weights, ``L = sum_t w_t L_t`` (linear scalarisation).

    With the default all-ones weights this is plain equal weighting; with a preference
    vector ``r`` it is the scalarised loss of one static shared model per preference.

    Args:
        num_tasks: ``T``.
        weights: ``T`` non-negative weights, not all zero; default all ones.

    Returns (from ``backward``): the fixed weights. Heads get ``w_t`` times their gradient.
    """

    def __init__(self, *, num_tasks: int, weights: Sequence[float] | None = None) -> None:
        super().__init__(num_tasks=num_tasks)
        if weights is None:
            values = [1.0] * num_tasks
        else:
            if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
                raise UserError(f"weighting 'equal': weights must be a list, got {weights!r}")
            if len(weights) != num_tasks:
                raise UserError(
                    f"weighting 'equal': weights must have one entry per task ({num_tasks}), "
                    f"got {len(weights)}"
                )
            values = [float(check_number("equal", "weights", w, low=0.0)) for w in weights]
            if not any(values):
                raise UserError("weighting 'equal': weights must not all be zero")
        self.register_buffer("weights", torch.tensor(values, dtype=torch.float32))

    def combine(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.weights.to(losses)
        return (weights * losses).sum(), weights.clone()


@register("uncertainty")
class Uncertainty(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal, Cipolla, CVPR 2018).

    With learned ``s_t = log sigma_t^2`` (one ``nn.Parameter`` [T], ``log_vars``):

        L = sum_t exp(-s_t) L_t + s_t,    dL/ds_t = 1 - exp(-s_t) L_t,

    so each ``s_t`` tends to ``log L_t`` and the task weight ``exp(-s_t)`` to ``1 / L_t``.
    This is twice the paper's regression form ``L_t / (2 sigma^2) + log sigma`` (same
    minimiser in ``s``; LibMTL uses the halved form).

    Args:
        num_tasks: ``T``.
        init_log_var: initial ``s_t`` (0: all weights 1).

    Returns (from ``backward``): ``exp(-s_t)``. Heads get ``exp(-s_t)`` times their gradient.
    Optimise ``weighting.parameters()`` together with the model.
    """

    def __init__(self, *, num_tasks: int, init_log_var: float = 0.0) -> None:
        super().__init__(num_tasks=num_tasks)
        init = float(check_number("uncertainty", "init_log_var", init_log_var))
        self.log_vars = nn.Parameter(torch.full((num_tasks,), init))

    def combine(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        log_vars = self.log_vars.to(losses.dtype)
        weights = torch.exp(-log_vars)  # [T]
        return (weights * losses + log_vars).sum(), weights.detach()


@register("dwa")
class DynamicWeightAverage(LossWeighting):
    """Dynamic Weight Average (Liu, Johns, Davison, CVPR 2019, eq. 7).

    With ``L_t(k)`` the mean training loss of task ``t`` in epoch ``k`` (from
    :meth:`epoch_end`), the weights of epoch ``k`` are

        r_t = L_t(k-1) / L_t(k-2),    w_t = T * softmax_t(r_t / temperature),

    and all ones for the first two epochs. Tasks whose loss falls more slowly get more
    weight. The last two epochs' losses live in a buffer, so resuming keeps the weights.

    Args:
        num_tasks: ``T``.
        temperature: softmax temperature (2 in the paper).

    Returns (from ``backward``): ``w``. Heads get ``w_t`` times their gradient.
    """

    def __init__(self, *, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(num_tasks=num_tasks)
        self.temperature = float(
            check_number("dwa", "temperature", temperature, low=0.0, open_low=True)
        )
        self.register_buffer("history", torch.ones(2, num_tasks, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def epoch_weights(self) -> Tensor:
        """Weights [T] (float64) for the coming epoch."""
        if int(self.epochs_seen) < 2:
            return torch.ones(self.num_tasks, dtype=torch.float64, device=self.history.device)
        ratio = self.history[1] / self.history[0].clamp_min(torch.finfo(torch.float64).tiny)
        return self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)

    def epoch_end(self, mean_losses: Tensor) -> None:
        """Record the mean task losses [T] of the epoch that just ended."""
        mean_losses = torch.as_tensor(mean_losses).detach()
        if tuple(mean_losses.shape) != (self.num_tasks,):
            raise ValueError(
                f"dwa: mean_losses must be [{self.num_tasks}], got {tuple(mean_losses.shape)}"
            )
        row = mean_losses.to(self.history)
        self.history.copy_(torch.stack([self.history[1], row]))  # [2, T]: epochs k-2, k-1
        self.epochs_seen += 1

    def combine(self, losses: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.epoch_weights().to(losses)
        return (weights * losses).sum(), weights

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, temperature={self.temperature}"


# ----------------------------------------------------------------------- gradient weightings

MGDA_NORMALIZATIONS = ("none", "l2", "loss", "loss+")


@register("mgda_ub")
class MGDA(GradientWeighting):
    """Multiple-gradient descent, MGDA-UB (Sener & Koltun, NeurIPS 2018, Algorithm 2).

    The shared update is the min-norm point of the convex hull of the task gradients,

        alpha = argmin_{alpha in simplex} || sum_t alpha_t g_t / n_t ||^2,
        shared gradient = sum_t alpha_t g_t,

    found by the Frank-Wolfe solver of :mod:`dymu.weighting.min_norm`. With
    ``representation`` given (the trainer passes the shared encoder's output ``z``), ``g_t``
    are the gradients w.r.t. the whole ``z`` [B, ...] flattened, as in the paper's
    upper-bound variant and the authors' code (LibMTL instead sums them over the batch);
    otherwise the gradients w.r.t. the shared parameters (plain MGDA).

    ``n_t`` is the optional gradient normalisation of the authors' code ("not included in
    the paper"): ``none`` (1, the paper), ``l2`` (``||g_t||``), ``loss`` (``L_t``) or
    ``loss+`` (``L_t ||g_t||``, their sample config). Like the authors' code (a backward of
    ``sum_t alpha_t L_t``), the weights found on normalised gradients multiply the raw ones.

    Heads get their own gradient unscaled (Algorithm 2 line 2; LibMTL). The authors' code
    instead back-propagates ``sum_t alpha_t L_t``, so its heads get ``alpha_t`` times theirs.

    Args:
        num_tasks: ``T``.
        normalization: one of ``none``, ``l2``, ``loss``, ``loss+``.

    Returns (from ``backward``): ``alpha`` [T] (on the simplex). ``log["min_norm"]`` is
    ``||sum_t alpha_t g_t / n_t||`` (0 at a Pareto-stationary point).
    """

    def __init__(
        self, *, num_tasks: int, normalization: Literal["none", "l2", "loss", "loss+"] = "none"
    ) -> None:
        super().__init__(num_tasks=num_tasks)
        if normalization not in MGDA_NORMALIZATIONS:
            raise UserError(
                f"weighting 'mgda_ub': unknown normalization {normalization!r}; "
                f"choose one of: {', '.join(MGDA_NORMALIZATIONS)}"
            )
        self.normalization = normalization
        self._min_norm = 0.0

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        scale = {
            "none": np.ones_like(norms),
            "l2": norms,
            "loss": losses,
            "loss+": losses * norms,
        }[self.normalization]
        scale = np.where(scale > 0, scale, 1.0)  # a zero gradient or loss stays unscaled
        normalized = gram / np.outer(scale, scale)  # [T, T]: Gram of g_t / n_t
        alpha = min_norm_weights(normalized)
        self._min_norm = float(np.sqrt(max(alpha @ normalized @ alpha, 0.0)))
        return alpha

    def _extra_log(self) -> dict[str, Tensor]:
        return {"min_norm": torch.tensor(self._min_norm)}

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, normalization={self.normalization!r}"


def pcgrad_coefficients(gram: np.ndarray, orders: Sequence[Sequence[int]]) -> np.ndarray:
    """PCGrad's projections in the basis of the task gradients.

    Row ``i`` of the result holds ``C[i]`` with ``g_i^PC = sum_k C[i, k] g_k``. Starting
    from ``C = I``, for each ``j`` in ``orders[i]``: if ``<g_i^PC, g_j> < 0``,

        g_i^PC <- g_i^PC - <g_i^PC, g_j> / ||g_j||^2 g_j,

    where ``<g_i^PC, g_j> = (C M)[i, j]``.

    Args:
        gram: [T, T] Gram matrix of the task gradients.
        orders: for every task ``i``, the other tasks in the order to project against.

    Returns:
        [T, T] float64 ``C``.
    """
    num = gram.shape[0]
    coef = np.eye(num)
    for i in range(num):
        for j in orders[i]:
            inner = float(coef[i] @ gram[:, j])
            if inner < 0.0:
                coef[i, j] -= inner / gram[j, j]
    return coef


@register("pcgrad")
class PCGrad(GradientWeighting):
    """Projecting conflicting gradients (Yu et al., NeurIPS 2020, Algorithm 1).

    Each task gradient is projected, in a random order of the other tasks, onto the normal
    plane of every task gradient it conflicts with (negative inner product), always against
    the *original* ``g_j``; the shared update is the sum ``sum_i g_i^PC``
    (:func:`pcgrad_coefficients`). The order comes from a ``torch.Generator`` seeded with
    ``seed``; its state is part of ``state_dict``. Like the paper, a task is never
    projected against itself (the authors' code and LibMTL shuffle all T, self included,
    which only differs when ``<g_i^PC, g_i> < 0``).

    Heads get their own gradient unscaled (heads have no conflicts; the authors' code sums
    the unshared gradients as they are).

    Args:
        num_tasks: ``T``.
        seed: seed of the task-order generator.

    Returns (from ``backward``): the coefficients ``c = C.sum(0)`` with shared gradient
    ``sum_t c_t g_t`` (all ones when no gradients conflict). ``log["conflicts"]`` counts the
    projections made.
    """

    def __init__(self, *, num_tasks: int, seed: int = 0) -> None:
        super().__init__(num_tasks=num_tasks)
        self.seed = int(check_number("pcgrad", "seed", seed, low=0, integer=True))
        self.generator = torch.Generator().manual_seed(self.seed)
        self._conflicts = 0

    def coefficients(self, gram: np.ndarray, losses: np.ndarray) -> np.ndarray:
        del losses
        num = self.num_tasks
        orders = []
        for i in range(num):
            others = [j for j in range(num) if j != i]
            perm = torch.randperm(num - 1, generator=self.generator).tolist()
            orders.append([others[k] for k in perm])
        coef = pcgrad_coefficients(gram, orders)
        self._conflicts = int(np.count_nonzero(coef - np.eye(num)))
        return coef.sum(axis=0)

    def _extra_log(self) -> dict[str, Tensor]:
        return {"conflicts": torch.tensor(self._conflicts)}

    def get_extra_state(self) -> Tensor:
        return self.generator.get_state()

    def set_extra_state(self, state: Tensor) -> None:
        self.generator.set_state(state)

    def extra_repr(self) -> str:
        return f"num_tasks={self.num_tasks}, seed={self.seed}"
