"""The loop every step-based trainer shares: the joint stage, stages 1 and 2, and the
comparison methods (PHN, the shared models of the weighting strategies, the Pareto sets,
whose "step" is one epoch).

A trainer supplies only its step, its extra checkpoint state and its artifacts; the loop
owns what they all repeat: resuming from the trainer's checkpoint, the progress bar,
timing, a checkpoint every ``every`` steps (rank 0 writes it), and the training log
(``<run_dir>/logs/<name>.jsonl``, :mod:`dymu.train.curves`). Library calls without a run
directory or a checkpoint file leave those out. Hooks in the manner of detectron2's
trainer, reduced to what the trainers need:

    loop = StepLoop(name="stage1", ..., step=step)  # step(i, log), step.state(), ...
    batches = loop.batches(train_ds, ...)  # resumes, then the batches still to come
    loop.run()                             # step(i, log) -> scalars when log, else None
    loop.finish(weights, record, ...)      # rank 0 writes the artifact and its record

``step(i, log)`` does one optimisation step; when ``log`` is True (every ``log_every``
steps and the last) it returns the scalars to show and log, reduced over the ranks as the
trainer defines.
``step.state()`` gives its extra checkpoint entries (random generators, counters) and
``step.load_state(state)`` restores them. A resumed run draws, steps and logs exactly as
an uninterrupted one: the loop restores model, optimizer and scheduler, the step the rest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from dymu import dist
from dymu.data.batches import endless, random_hflip, to_device
from dymu.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_finished,
)
from dymu.train.curves import StageLog

LOG_EVERY = 10
"""Steps between logged (and displayed) scalars; the last step is always logged."""


class Step(Protocol):
    """What a stage gives the loop: one step, and its extra checkpoint state."""

    def __call__(self, i: int, log: bool) -> dict[str, float] | None: ...

    def state(self) -> dict[str, Any]: ...

    def load_state(self, state: dict[str, Any]) -> None: ...


class Stateless:
    """Base of a step that adds nothing to a checkpoint: the trainers that keep none
    (``checkpoint=None``), whose loop never asks for it."""

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


class Seeded:
    """Base of a step whose extra checkpoint state is its draw generator ``rng`` (numpy)
    and its flip generator ``flip_gen`` (torch): the joint and the width stages, which also
    share how a batch is drawn, a step taken and its scalars logged (from their fields
    ``batches``, ``device``, ``optimizer`` and ``scheduler``)."""

    rng: Any
    flip_gen: Any

    def state(self) -> dict[str, Any]:
        return {"numpy_rng": rng_state(self.rng), "flip_rng": self.flip_gen.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        set_rng_state(self.rng, state["numpy_rng"])
        self.flip_gen.set_state(state["flip_rng"])

    def next_batch(self, tasks, hflip: bool) -> dict[str, Any]:
        """The next batch of ``self.batches`` on ``self.device``, this rank's flips drawn
        for the global batch when ``hflip``."""
        batch = to_device(next(self.batches), self.device)
        return random_hflip(batch, tasks, self.flip_gen, dist.shard()) if hflip else batch

    def update(self, loss: torch.Tensor, params) -> None:
        """One optimizer and scheduler step on ``loss``, gradients averaged over the ranks
        (the global batch's mean gradient)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(params)
        self.optimizer.step()
        self.scheduler.step()

    def logged(self, sums: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        """The mean of each summed scalar over ``count`` terms per rank and every rank, and
        the learning rate: what the step logs."""
        totals = dist.all_reduce_sums({k: v.item() for k, v in sums.items()})
        scale = dist.world_size() * count
        return {**{k: v / scale for k, v in totals.items()}, "lr": self.scheduler.get_last_lr()[0]}


def frozen(module: nn.Module, device) -> nn.Module:
    """``module`` on ``device``, in eval mode, with no parameter that trains (in place)."""
    return module.to(device).eval().requires_grad_(False)


class StepLoop:
    """Resume, run and checkpoint one step-based stage.

    Args:
        name: the trainer's log name (``joint``, ``stage1``, ``stage2``, ``phn_bn``...).
        label: how messages name it (``stage 1``); desc: the progress bar's text.
        run_dir: where ``logs/<name>.jsonl`` goes; None writes no log.
        checkpoint: the trainer's checkpoint file; None never writes or reads one.
        config_hash: the trainer's hash, stored in and checked against its checkpoint.
        steps: steps of the whole training; every: steps between checkpoints.
        model, optimizer, scheduler: what is trained and restored (scheduler may be None).
        step: the trainer's :class:`Step`.
        show: the scalars the progress bar shows (all that are logged when None).
        log_every: steps between logged scalars (the last step is always logged).
        unit: what the progress bar counts.
    """

    def __init__(
        self,
        *,
        name: str,
        label: str,
        desc: str,
        run_dir: Path | None,
        checkpoint: Path | None,
        config_hash: str,
        steps: int,
        every: int,
        model: nn.Module,
        optimizer,
        scheduler,
        step: Step,
        show: tuple[str, ...] | None = None,
        log_every: int = LOG_EVERY,
        unit: str = "step",
    ) -> None:
        self.name, self.label, self.desc, self.unit = name, label, desc, unit
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.checkpoint, self.config_hash = checkpoint, config_hash
        self.steps, self.every, self.log_every = steps, every, log_every
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step, self.show = step, show
        self.main = dist.is_main()
        self.first = 0
        self.seconds = 0.0
        self.last: dict[str, float] = {}

    def resume(self, resume: bool) -> int:
        """Restore the stage from its checkpoint when ``resume`` and one exists; return the
        first step still to run (0 for a fresh start)."""
        if resume and self.checkpoint is not None and self.checkpoint.is_file():
            state = load_checkpoint(
                self.checkpoint,
                self.config_hash,
                self.label.replace(" ", "-"),
                self.model,
                self.optimizer,
                self.scheduler,
            )
            self.step.load_state(state)
            self.first, self.seconds = state["step"], state.get("seconds", 0.0)
            if self.main:
                print(
                    f"{self.label}: resuming after {self.unit} {self.first}/{self.steps} "
                    f"from {self.checkpoint}"
                )
        return self.first

    def batches(self, train_ds, batch_size: int, seed: int, resume: bool, workers: int, device):
        """Resume (:meth:`resume`), then the stage's endless stream of this rank's part of
        each global batch, from the first batch still to train on."""
        return endless(
            train_ds,
            batch_size,
            seed,
            start=self.resume(resume),
            shard=dist.shard(),
            workers=workers,
            pin_memory=device.type == "cuda",
        )

    def finish(
        self,
        weights: Path,
        record_path: Path,
        meta: dict[str, Any],
        batch_size: int,
        **extra: Any,
    ) -> dict[str, Any]:
        """Write the trained model to ``weights`` and its record (``meta``, steps, time,
        throughput, the stage's ``extra`` entries, the processes under torchrun) to
        ``record_path``, rank 0 alone; remove the checkpoint. Returns the record."""
        record = {
            **meta,
            "steps": self.steps,
            "seconds": round(self.seconds, 2),
            "images_per_s": round(self.steps * batch_size / max(self.seconds, 1e-9), 1),
            **extra,
        }
        if dist.world_size() > 1:
            record["processes"] = dist.world_size()
        write_finished(weights, record_path, self.model, meta, record, self.checkpoint)
        return record

    def run(self) -> dict[str, float]:
        """Run the remaining steps; return the last logged scalars."""
        bar = tqdm(
            range(self.first, self.steps),
            initial=self.first,
            total=self.steps,
            desc=self.desc,
            unit=self.unit,
            leave=False,
            disable=not self.main,
        )
        writes = self.main and self.run_dir is not None
        curve = StageLog(self.run_dir or Path(), self.name, self.first, enabled=writes)
        saves = self.main and self.checkpoint is not None
        try:
            for i in bar:
                tick = time.perf_counter()
                log = i % self.log_every == 0 or i + 1 == self.steps
                scalars = self.step(i, log)
                self.seconds += time.perf_counter() - tick
                if log and scalars is not None:
                    self.last = dict(scalars)
                    keys = self.show or tuple(scalars)
                    bar.set_postfix({k: f"{scalars[k]:.3g}" for k in keys if k in scalars})
                    curve.log(i, **scalars)
                if saves and (i + 1) % self.every == 0 and i + 1 < self.steps:
                    save_checkpoint(
                        self.checkpoint,
                        self.config_hash,
                        i + 1,
                        self.model,
                        self.optimizer,
                        self.scheduler,
                        seconds=self.seconds,
                        **self.step.state(),
                    )
        finally:
            bar.close()
            curve.close()
        return self.last
