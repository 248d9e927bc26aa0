"""Pareto sets by multi-task optimisation with parameter transfer (METHOD.md 3).

Multi-task learning cast as multi-objective optimisation (Bai, Gupta, Ong, "Multi-task
learning with multi-task optimization", arXiv 2403.16162; precursor: multi-task gradient
descent, MGD, Memetic Computing 2020): the T task losses are decomposed into K scalar
subproblems F_k(theta) = sum_t w_kt L_t(theta), one per preference vector w_k, each with its
own model theta_k, and the K subproblems are solved jointly by one update per step

    theta_k <- sum_j M[k, j] theta_j - lr * grad F_k(theta_k),            (1)

where M is row-stochastic and non-zero only between similar subproblems, so every model
borrows a little of its neighbours' parameters while descending its own objective. The
hypervolume (HV) of the K models' losses is the quality of the set; the papers' claim is
that transfer reaches a given share of the final HV in fewer epochs than K independent
models (METHOD.md 3; :func:`time_to_fraction`).

The pieces:

* :class:`~dymu.pareto.stacked.ParetoSet` (its own module) holds the K models, every
  parameter and buffer stacked along a leading K dimension, and runs all K as one batched
  computation (``torch.vmap(functional_call)``), BatchNorm included.
* :func:`transfer_matrix` builds M from the preferences (nearest neighbours by cosine
  similarity, MGD's similarity weighting); :func:`transfer_` applies theta <- M theta to
  every stacked tensor.
* :func:`pareto_step` is one step of (1); :func:`train_pareto_set` trains for some epochs
  and records the HV and wall time per epoch; ``transfer=False`` (M = I) trains K
  independent models with exactly the same steps, the baseline and also the way to train
  K static models for K preferences in one stacked run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dymu import dist
from dymu.errors import UserError
from dymu.evaluate.metrics import hypervolume
from dymu.pareto.stacked import ParetoSet, select_output
from dymu.registry import Registry
from dymu.train.engine import StepLoop
from dymu.train.loop import lr_lambda

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "evaluate_losses",
    "pareto_step",
    "time_to_fraction",
    "train_pareto_set",
    "transfer_",
    "transfer_matrix",
]

LossFn = Callable[[Any, Any], Tensor]
"""``loss_fn(outputs_k, targets) -> Tensor [T]``: the T task losses of one model's outputs."""

SCHEDULES = ("constant", "cosine", "step")
"""Learning-rate schedules of :func:`train_pareto_set` (:func:`dymu.train.loop.lr_lambda`)."""

ROW_SUM_TOLERANCE = 1e-6
"""How far a row of a user-given transfer matrix may sum from 1."""

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")
"""Name -> ``builder(params, *, lr, momentum, weight_decay)``. Both act elementwise, so one
optimizer over the stacked [K, ...] tensors is exactly K optimizers over K models."""


@OPTIMIZERS.register("sgd")
def _sgd(params, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@OPTIMIZERS.register("adam")
def _adam(params, *, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    # ``momentum`` is Adam's beta1 when given (> 0); 0 keeps torch's default 0.9.
    betas = (momentum, 0.999) if momentum > 0 else (0.9, 0.999)
    return torch.optim.Adam(params, lr=lr, betas=betas, weight_decay=weight_decay)


# --------------------------------------------------------------------------- transfer


def _preferences(preferences: Tensor | np.ndarray, num_models: int | None = None) -> Tensor:
    """Preferences as a float64 tensor [K, T], checked: finite, >= 0, no all-zero row."""
    w = torch.as_tensor(np.asarray(preferences, dtype=np.float64))
    if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
        raise UserError(f"preferences: expected a 2-D array [K, T], got shape {tuple(w.shape)}")
    if num_models is not None and w.shape[0] != num_models:
        raise UserError(
            f"preferences: expected one row per model ({num_models}), got {w.shape[0]} rows"
        )
    if not torch.isfinite(w).all() or (w < 0).any():
        raise UserError("preferences: entries must be finite and >= 0")
    if (w.sum(dim=1) == 0).any():
        raise UserError("preferences: a row is all zeros (no objective to minimise)")
    return w


def transfer_matrix(
    preferences: Tensor | np.ndarray, *, neighbours: int, strength: float
) -> Tensor:
    """The row-stochastic transfer matrix M of update (1) from the subproblems' preferences.

    With c_kj = max(0, cos(w_k, w_j)) the cosine similarity of two preference vectors and
    N_k the ``neighbours`` subproblems j != k with the largest c_kj (ties: lower index):

        M[k, j] = strength * (2 c_kj / (1 + c_kj)) / neighbours     for j in N_k,
        M[k, k] = 1 - sum_{j in N_k} M[k, j],                        0 elsewhere.

    MGD (Memetic Computing 2020) mixes with weight alpha * lr * c / (1 + c); the factor 2
    normalises c / (1 + c) to 1 at c = 1, so ``strength`` is the share of model k taken
    from its neighbours when they solve the very same subproblem, and less similar
    neighbours give proportionally less. The learning-rate scaling of MGD is applied per
    step by :func:`train_pareto_set` (M_t = I + (lr_t / lr_0) (M - I)), so with
    alpha = 2 * strength / (neighbours * lr_0) the two agree exactly.

    Args:
        preferences: [K, T] nonnegative preference vectors (rows need not sum to 1; only
            their directions matter).
        neighbours: how many other subproblems each one borrows from, 0 <= n <= K - 1.
        strength: in [0, 1]; 0 gives the identity (independent models).

    Returns:
        float64 tensor [K, K]: rows sum to 1, entries >= 0, diagonal >= 1 - strength.

    Raises:
        UserError: malformed preferences, ``neighbours`` or ``strength`` out of range.
    """
    w = _preferences(preferences)
    k = w.shape[0]
    if not isinstance(neighbours, int) or not 0 <= neighbours <= k - 1:
        raise UserError(f"transfer_matrix: neighbours must be in [0, {k - 1}], got {neighbours!r}")
    if not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
        raise UserError(f"transfer_matrix: strength must be in [0, 1], got {strength!r}")
    unit = w / w.norm(dim=1, keepdim=True)  # [K, T], rows of norm 1
    cos = (unit @ unit.T).clamp(min=0.0, max=1.0)  # [K, K], c_kj
    weight = 2.0 * cos / (1.0 + cos)  # [K, K], in [0, 1]
    matrix = torch.zeros(k, k, dtype=torch.float64)
    for row in range(k):
        # Other subproblems by decreasing similarity; a stable sort breaks ties by index.
        others = [j for j in range(k) if j != row]
        order = np.argsort(-cos[row, others].numpy(), kind="stable")[:neighbours]
        chosen = [others[i] for i in order]
        matrix[row, chosen] = strength * weight[row, chosen] / neighbours
        matrix[row, row] = 1.0 - matrix[row].sum()
    return matrix


def _check_matrix(matrix: Tensor, num_models: int) -> Tensor:
    """``matrix`` as a checked [K, K] tensor: entries >= 0 and rows summing to 1."""
    m = torch.as_tensor(matrix)
    if m.shape != (num_models, num_models):
        raise UserError(
            f"transfer matrix: expected shape ({num_models}, {num_models}), got {tuple(m.shape)}"
        )
    if not torch.isfinite(m).all() or (m < 0).any():
        raise UserError("transfer matrix: entries must be finite and >= 0")
    worst = (m.double().sum(dim=1) - 1.0).abs().max().item()
    if worst > ROW_SUM_TOLERANCE:
        raise UserError(f"transfer matrix: rows must sum to 1 (off by up to {worst:.3g})")
    return m


@torch.no_grad()
def transfer_(pset: ParetoSet, matrix: Tensor, *, buffers: bool = True) -> None:
    """theta <- M theta for every stacked tensor of ``pset``, in place.

    Model k's new tensor is sum_j M[k, j] theta_j, computed for all models as one matmul
    per stacked tensor. Gradients (``.grad``) are left untouched, so a following optimizer
    step applies the gradient taken before the mix, as update (1) prescribes.

    Floating-point buffers (BatchNorm running statistics) are mixed too (``buffers=True``):
    to first order in the mixing weights the activation statistics of the mixed model are
    the same mix of the models' statistics, whereas unmixed ones would describe a model
    that no longer exists. Integer buffers (batch counters) are never mixed.

    Args:
        pset: the set to update.
        matrix: [K, K] row-stochastic.
        buffers: also mix floating-point buffers.

    Raises:
        UserError: wrong shape, negative entries or rows not summing to 1.
    """
    k = pset.num_models
    m = _check_matrix(matrix, k)
    for _, value in pset.stacked_tensors(buffers=buffers):
        if not value.is_floating_point():
            continue
        flat = value.reshape(k, -1)  # [K, ...] -> [K, D]
        mixed = m.to(device=value.device, dtype=value.dtype) @ flat  # [K, K] @ [K, D] -> [K, D]
        value.copy_(mixed.view_as(value))  # [K, D] -> [K, ...]


# --------------------------------------------------------------------------- training


def _model_losses(outputs: Any, targets: Any, loss_fn: LossFn, k: int, vmap_loss: bool) -> Tensor:
    """The [K, T] task losses of K models' ``outputs`` (leading K dim) against ``targets``."""
    if vmap_loss:
        losses = torch.vmap(loss_fn, in_dims=(0, None))(outputs, targets)  # [K, T]
    else:
        losses = torch.stack([loss_fn(select_output(outputs, i), targets) for i in range(k)])
    if losses.ndim != 2 or losses.shape[0] != k:
        raise UserError(
            f"loss_fn must return one loss per task (a [T] tensor); got {tuple(losses.shape)} "
            f"for {k} models"
        )
    return losses


def pareto_step(
    pset: ParetoSet,
    optimizer: torch.optim.Optimizer,
    inputs: Any,
    targets: Any,
    *,
    preferences: Tensor,
    loss_fn: LossFn,
    matrix: Tensor | None = None,
    vmap_loss: bool = False,
) -> Tensor:
    """One step of update (1): gradient at theta_k, then mix, then the optimizer's step.

    Order, exactly as (1) reads: (a) forward and backward at the current parameters give
    grad F_k(theta_k) with F_k = sum_t w_kt L_t (the sum over k of F_k is differentiated
    once; models share no parameters, so each receives only its own gradient); (b) the
    parameters are mixed, theta <- M theta (:func:`transfer_`), gradients untouched; (c)
    ``optimizer.step()``. With plain SGD this is theta_k <- sum_j M[k, j] theta_j - lr *
    grad F_k(theta_k); with momentum or Adam the gradient term is the optimizer's direction
    and its per-model state is not mixed.

    Args:
        pset: the K models (in training mode for training).
        optimizer: over ``pset.parameters()``.
        inputs: the model input shared by all K models (e.g. an image batch [B, C, H, W]).
        targets: whatever ``loss_fn`` needs besides the outputs.
        preferences: [K, T] on the parameters' device.
        loss_fn: ``loss_fn(outputs_k, targets) -> [T]`` for one model's outputs.
        matrix: [K, K] row-stochastic transfer matrix; None skips the mix (M = I).
        vmap_loss: evaluate ``loss_fn`` for all K models with ``torch.vmap`` (faster, needs
            a vmappable loss such as ``F.cross_entropy``) instead of a loop over K (any
            loss; the loop only touches the outputs, the model itself stays batched).

    Returns:
        The [K, T] task losses at the parameters before the step (detached).
    """
    optimizer.zero_grad(set_to_none=True)
    outputs = pset(inputs)
    losses = _model_losses(outputs, targets, loss_fn, pset.num_models, vmap_loss)  # [K, T]
    if losses.shape[1] != preferences.shape[1]:
        raise UserError(
            f"loss_fn returned {losses.shape[1]} task losses but preferences have "
            f"{preferences.shape[1]} tasks"
        )
    (losses * preferences.to(losses.dtype)).sum().backward()  # sum_k F_k
    dist.average_gradients(pset.parameters())  # under torchrun: the global batch's gradient
    if matrix is not None:
        transfer_(pset, matrix)
    optimizer.step()
    return losses.detach()


@torch.no_grad()
def evaluate_losses(
    pset: ParetoSet,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: LossFn,
    *,
    vmap_loss: bool = False,
) -> np.ndarray:
    """Each model's task losses over a data set, in eval mode: float64 [K, T].

    Batch means are weighted by the batch size (the leading dimension of ``inputs``, which
    must be a tensor), so the result is the mean over samples when ``loss_fn`` returns
    per-batch means. The set's training mode is restored afterwards.
    """
    was_training = pset.training
    pset.eval()
    total: Tensor | None = None
    count = 0
    try:
        for inputs, targets in batches:
            n = int(inputs.shape[0])
            outputs = pset(inputs)
            losses = _model_losses(outputs, targets, loss_fn, pset.num_models, vmap_loss)
            part = losses.double() * n  # [K, T]
            total = part if total is None else total + part
            count += n
    finally:
        pset.train(was_training)
    if total is None:
        raise UserError("evaluate_losses: the evaluation data yielded no batches")
    return (total / count).cpu().numpy()


def _epoch_batches(batches: Any, epoch: int) -> Iterable[tuple[Any, Any]]:
    return batches(epoch) if callable(batches) else batches


def train_pareto_set(
    pset: ParetoSet,
    preferences: Tensor | np.ndarray,
    batches: Iterable[tuple[Any, Any]] | Callable[[int], Iterable[tuple[Any, Any]]],
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    schedule: str = "constant",
    steps_per_epoch: int | None = None,
    transfer: bool = True,
    neighbours: int = 2,
    strength: float = 0.1,
    matrix: Tensor | None = None,
    vmap_loss: bool = False,
    eval_fn: Callable[[ParetoSet], np.ndarray] | None = None,
    reference: Sequence[float] | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_hash: str = "",
) -> dict[str, Any]:
    """Train K models on K preference-weighted objectives jointly, recording HV per epoch.

    Every step is :func:`pareto_step` with the transfer matrix of this step,

        M_t = I + (lr_t / lr) (M - I),

    i.e. the mixing weights follow the learning-rate schedule (MGD's w = alpha * lr * c /
    (1 + c); see :func:`transfer_matrix`): transfer is as strong as configured while the
    learning rate is at its base value and fades with it. ``transfer=False`` uses M = I
    (no mixing at all): K independent models trained with exactly the same batches and
    optimizer, the baseline of METHOD.md 3.

    After each epoch (and once before the first, epoch 0) ``eval_fn(pset) -> [K, T]``
    evaluation losses are turned into the hypervolume with respect to ``reference``
    (:func:`dymu.evaluate.metrics.hypervolume`, exact). Wall time counts training only
    (forward, backward, mix, optimizer step, data iteration), not evaluation, so the time
    to a share of the final HV (:func:`time_to_fraction`) compares training cost.

    Args:
        pset: the K models; trained in place, left in training mode.
        preferences: [K, T] nonnegative, model k's objective F_k = sum_t w_kt L_t.
        batches: ``(inputs, targets)`` pairs for one epoch: a re-iterable (list, DataLoader)
            or a callable ``epoch -> iterable`` (for a new shuffle per epoch).
        loss_fn: ``loss_fn(outputs_k, targets) -> [T]`` for one model's outputs.
        epochs: number of passes, >= 1.
        lr: base learning rate lr_0 > 0.
        optimizer: a name in :data:`OPTIMIZERS` (``"sgd"``, ``"adam"``).
        momentum: SGD momentum, or Adam's beta1 when > 0.
        weight_decay: L2 weight decay of the optimizer.
        schedule: ``"constant"``, ``"cosine"`` (to 0, per step) or ``"step"`` (x0.1 at 2/3).
        steps_per_epoch: steps in one epoch; needed by a non-constant schedule when
            ``batches`` has no ``len()``.
        transfer: mix parameters between neighbouring subproblems (False: M = I).
        neighbours: see :func:`transfer_matrix`.
        strength: see :func:`transfer_matrix`.
        matrix: a [K, K] row-stochastic M to use instead of :func:`transfer_matrix`
            (given, it is used whatever ``transfer`` says).
        vmap_loss: see :func:`pareto_step`.
        eval_fn: ``pset -> [K, T]`` evaluation losses (e.g. :func:`evaluate_losses` on a
            held-out split); None records no HV.
        reference: [T] HV reference point; required with ``eval_fn``.
        log: called with each epoch's record as it is made (progress printing).
        checkpoint: a file written after every epoch (models, optimizer, schedule, history,
            RNG) and read back when it exists, so an interrupted set of long trainings
            continues from its last finished epoch with the same result.
        checkpoint_hash: the settings' hash stored in the checkpoint; a file with another
            hash is refused (:func:`dymu.train.checkpoint.load_checkpoint`).

    Returns:
        ``{"history": [record per epoch], "final_hv", "matrix", "settings"}``; a record is
        ``{"epoch", "hv", "eval_losses" [K][T], "train_losses" [K][T] (epoch means),
        "epoch_s", "elapsed_s" (cumulative training seconds), "eval_s", "lr"}``; epoch 0
        has no training fields.

    Raises:
        UserError: bad preferences, names, counts, matrix or a missing reference.
    """
    k = pset.num_models
    w = _preferences(preferences, k)
    ref, steps_per_epoch = _check_settings(
        w, batches, epochs, lr, schedule, steps_per_epoch, eval_fn, reference
    )
    if matrix is not None:
        base = _check_matrix(matrix, k).double()
    elif transfer:
        base = transfer_matrix(w, neighbours=neighbours, strength=strength)
    else:
        base = None
    param = next(iter(pset.parameters()))
    weights = w.to(device=param.device, dtype=param.dtype)  # [K, T]
    opt = OPTIMIZERS.get(optimizer)(
        pset.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    factor = lr_lambda(schedule, max(1, epochs * steps_per_epoch))  # step -> lr_t / lr_0
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    history = _History(pset, tuple(w.shape), eval_fn, ref, log)
    step = _EpochStep(pset, opt, scheduler, batches, weights, base, lr, loss_fn, vmap_loss, history)
    ckpt = None if checkpoint is None else Path(checkpoint)
    loop = StepLoop(
        name="pareto_set", label="Pareto set", desc="Pareto set", run_dir=None,
        checkpoint=ckpt, config_hash=checkpoint_hash, steps=epochs, every=1, model=pset,
        optimizer=opt, scheduler=scheduler, step=step, show=("hv",), log_every=1, unit="epoch",
    )  # fmt: skip
    if loop.resume(ckpt is not None) == 0:  # a fresh start: epoch 0 is the untrained set
        history.record({"epoch": 0, "elapsed_s": 0.0})
    pset.train()
    loop.run()
    transferred = matrix is None and transfer
    settings = dict(
        num_models=k, preferences=w.tolist(), epochs=epochs, lr=lr, optimizer=optimizer,
        momentum=momentum, weight_decay=weight_decay, schedule=schedule,
        transfer=base is not None, neighbours=neighbours if transferred else None,
        strength=strength if transferred else None,
        reference=None if ref is None else ref.tolist(),
    )  # fmt: skip
    return {
        "history": history.entries,
        "final_hv": history.entries[-1]["hv"],
        "matrix": None if base is None else base.tolist(),
        "settings": settings,
    }


def _check_settings(
    w: Tensor,
    batches: Any,
    epochs: Any,
    lr: Any,
    schedule: str,
    steps_per_epoch: int | None,
    eval_fn: Callable | None,
    reference: Sequence[float] | None,
) -> tuple[np.ndarray | None, int]:
    """Refuse bad settings of :func:`train_pareto_set` with one line; return the HV
    reference point as float64 [T] (None without one) and the steps per epoch (1 when
    unknown and not needed: a constant schedule)."""
    if schedule != "constant" and steps_per_epoch is None:
        if callable(batches) or not hasattr(batches, "__len__"):
            raise UserError(
                f"train_pareto_set: schedule {schedule!r} needs steps_per_epoch when batches "
                "has no len()"
            )
        steps_per_epoch = len(batches)
    if not isinstance(epochs, int) or epochs < 1:
        raise UserError(f"train_pareto_set: epochs must be an integer >= 1, got {epochs!r}")
    if not lr > 0:
        raise UserError(f"train_pareto_set: lr must be > 0, got {lr!r}")
    if schedule not in SCHEDULES:
        raise UserError(
            f"train_pareto_set: unknown schedule {schedule!r}; choose one of: "
            f"{', '.join(SCHEDULES)}"
        )
    if eval_fn is not None and reference is None:
        raise UserError("train_pareto_set: eval_fn needs a reference point for the hypervolume")
    ref = None if reference is None else np.asarray(reference, dtype=np.float64)
    if ref is not None and ref.shape != (w.shape[1],):
        raise UserError(
            f"train_pareto_set: reference must have {w.shape[1]} entries, got {ref.shape}"
        )
    return ref, steps_per_epoch or 1


def _train_epoch(
    pset: ParetoSet,
    opt: torch.optim.Optimizer,
    scheduler,
    batches: Iterable[tuple[Any, Any]],
    weights: Tensor,
    base: Tensor | None,
    lr: float,
    loss_fn: LossFn,
    vmap_loss: bool,
) -> list[list[float]] | None:
    """One pass of :func:`pareto_step` with M_t = I + (lr_t / lr) (M - I) (M = ``base``;
    None: no mixing); returns the epoch's mean training losses [K][T], None when
    ``batches`` yielded nothing."""
    k = pset.num_models
    eye = torch.eye(k, dtype=torch.float64)
    sums = torch.zeros(k, weights.shape[1], dtype=torch.float64)
    steps = 0
    for inputs, targets in batches:
        mix = None
        if base is not None:
            scale = opt.param_groups[0]["lr"] / lr  # lr_t / lr_0
            mix = eye + scale * (base - eye)  # [K, K], M_t
        losses = pareto_step(
            pset,
            opt,
            inputs,
            targets,
            preferences=weights,
            loss_fn=loss_fn,
            matrix=mix,
            vmap_loss=vmap_loss,
        )
        scheduler.step()
        sums += losses.double().cpu()
        steps += 1
    return None if steps == 0 else (sums / steps).tolist()


class _History:
    """The per-epoch records of :func:`train_pareto_set`: each gets the evaluation losses
    and their hypervolume (when there is an ``eval_fn``) and is passed to ``log``."""

    def __init__(self, pset, shape, eval_fn, ref, log) -> None:
        self.pset, self.shape, self.eval_fn, self.ref, self.log = pset, shape, eval_fn, ref, log
        self.entries: list[dict[str, Any]] = []

    def record(self, entry: dict[str, Any]) -> None:
        if self.eval_fn is not None:
            start = time.perf_counter()
            losses = np.asarray(self.eval_fn(self.pset), dtype=np.float64)
            if losses.shape != self.shape:
                raise UserError(
                    f"eval_fn must return [K, T] = {self.shape} losses, got {losses.shape}"
                )
            entry["hv"] = hypervolume(losses, self.ref)
            entry["eval_losses"] = losses.tolist()
            entry["eval_s"] = time.perf_counter() - start
        else:
            entry["hv"] = None
        self.entries.append(entry)
        if self.log is not None:
            self.log(entry)


class _EpochStep:
    """One epoch of :func:`train_pareto_set` as a step of its
    :class:`~dymu.train.engine.StepLoop`: train, then record (and evaluate) the epoch.
    Its checkpoint state is the history, the training seconds and torch's RNG."""

    def __init__(self, pset, opt, scheduler, batches, weights, base, lr, loss_fn, vmap, history):
        self.pset, self.opt, self.scheduler, self.batches = pset, opt, scheduler, batches
        self.weights, self.base, self.lr, self.loss_fn = weights, base, lr, loss_fn
        self.vmap_loss, self.history = vmap, history
        self.elapsed = 0.0  # training seconds, evaluation excluded

    def __call__(self, i: int, log: bool) -> dict[str, float]:
        epoch = i + 1  # epoch 0 is the record before training
        start = time.perf_counter()
        train_losses = _train_epoch(
            self.pset, self.opt, self.scheduler, _epoch_batches(self.batches, epoch - 1),
            self.weights, self.base, self.lr, self.loss_fn, self.vmap_loss,
        )  # fmt: skip
        if train_losses is None:
            raise UserError(f"train_pareto_set: epoch {epoch} yielded no batches")
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        lr = self.opt.param_groups[0]["lr"]
        entry = {"epoch": epoch, "train_losses": train_losses, "epoch_s": seconds}
        self.history.record({**entry, "elapsed_s": self.elapsed, "lr": lr})
        hv = self.history.entries[-1]["hv"]
        return {"lr": lr} if hv is None else {"hv": hv, "lr": lr}

    def state(self) -> dict[str, Any]:
        return {
            "history": self.history.entries,
            "elapsed": self.elapsed,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch_rng"])
        self.history.entries.extend(state["history"])
        self.elapsed = float(state["elapsed"])


def time_to_fraction(
    history: Sequence[Mapping[str, Any]], fraction: float = 0.9, *, target: float | None = None
) -> dict[str, Any]:
    """When the HV first reached ``fraction`` of a target HV (METHOD.md 3's speed measure).

    The first record (in order) with hv >= fraction * target, where target defaults to the
    last record's HV (the run's own final HV); pass the better of two runs' final HVs to
    compare runs against a common bar.

    Args:
        history: records with ``"hv"``, ``"epoch"`` and ``"elapsed_s"`` (as returned by
            :func:`train_pareto_set`).
        fraction: in (0, 1].
        target: the HV to reach a share of; > 0.

    Returns:
        ``{"fraction", "target_hv", "threshold", "epoch", "elapsed_s"}``; ``epoch`` and
        ``elapsed_s`` are None when the threshold is never reached.

    Raises:
        UserError: empty history, records without HV, fraction or target out of range.
    """
    if not history:
        raise UserError("time_to_fraction: the history is empty")
    if any(entry.get("hv") is None for entry in history):
        raise UserError("time_to_fraction: every record needs an 'hv' (train with eval_fn)")
    if not 0.0 < fraction <= 1.0:
        raise UserError(f"time_to_fraction: fraction must be in (0, 1], got {fraction!r}")
    goal = float(history[-1]["hv"]) if target is None else float(target)
    if not (math.isfinite(goal) and goal > 0.0):
        raise UserError(f"time_to_fraction: the target HV must be > 0, got {goal!r}")
    threshold = fraction * goal
    for entry in history:
        if entry["hv"] >= threshold:
            return {
                "fraction": fraction,
                "target_hv": goal,
                "threshold": threshold,
                "epoch": entry["epoch"],
                "elapsed_s": entry["elapsed_s"],
            }
    return {
        "fraction": fraction,
        "target_hv": goal,
        "threshold": threshold,
        "epoch": None,
        "elapsed_s": None,
    }
