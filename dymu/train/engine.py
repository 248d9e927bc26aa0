"""The loop every step-based training stage shares (the joint stage, stages 1 and 2).

A stage supplies only its step, its extra checkpoint state and its artifacts; the loop
owns what they all repeat: resuming from the stage's checkpoint, the progress bar, timing,
a checkpoint every ``run.checkpoint_every`` steps (rank 0 writes it), and the training log
(``RUN/logs/<stage>.jsonl``, :mod:`dymu.train.curves`). Hooks in the manner of detectron2's
trainer, reduced to what the stages need:

    loop = StepLoop(name="stage1", ..., state=lambda: {...}, load_state=...)
    first = loop.resume(resume)          # before the stage builds its batch stream
    loop.run(step)                       # step(i, log) -> scalars when log, else None

``step(i, log)`` does one optimisation step; when ``log`` is True (every 10 steps and the
last) it returns the scalars to show and log, reduced over the ranks as the stage defines.
A resumed run draws, steps and logs exactly as an uninterrupted one: the loop restores
model, optimizer and scheduler, and ``load_state`` the stage's random generators.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from dymu import dist
from dymu.train.checkpoint import load_checkpoint, save_checkpoint
from dymu.train.curves import StageLog

LOG_EVERY = 10
"""Steps between logged (and displayed) scalars; the last step is always logged."""


class StepLoop:
    """Resume, run and checkpoint one step-based stage.

    Args:
        name: the stage's log name (``joint``, ``stage1``, ``stage2``).
        label: how messages name it (``stage 1``); desc: the progress bar's text.
        run_dir: the run directory; checkpoint: the stage's checkpoint file in it.
        config_hash: the stage's hash, stored in and checked against its checkpoint.
        steps: steps of the whole stage; every: steps between checkpoints.
        model, optimizer, scheduler: what is trained and restored.
        state: the stage's extra checkpoint entries (random generators, counters).
        load_state: restores them from a checkpoint's dict.
        show: the scalars the progress bar shows (all that are logged when None).
    """

    def __init__(
        self,
        *,
        name: str,
        label: str,
        desc: str,
        run_dir: Path,
        checkpoint: Path,
        config_hash: str,
        steps: int,
        every: int,
        model: nn.Module,
        optimizer,
        scheduler,
        state: Callable[[], dict[str, Any]] | None = None,
        load_state: Callable[[dict[str, Any]], None] | None = None,
        show: tuple[str, ...] | None = None,
    ) -> None:
        self.name, self.label, self.desc = name, label, desc
        self.run_dir, self.checkpoint, self.config_hash = Path(run_dir), checkpoint, config_hash
        self.steps, self.every = steps, every
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.state, self.load_state, self.show = state, load_state, show
        self.main = dist.is_main()
        self.first = 0
        self.seconds = 0.0
        self.last: dict[str, float] = {}

    def resume(self, resume: bool) -> int:
        """Restore the stage from its checkpoint when ``resume`` and one exists; return the
        first step still to run (0 for a fresh start)."""
        if resume and self.checkpoint.is_file():
            state = load_checkpoint(
                self.checkpoint,
                self.config_hash,
                self.label.replace(" ", "-"),
                self.model,
                self.optimizer,
                self.scheduler,
            )
            if self.load_state is not None:
                self.load_state(state)
            self.first, self.seconds = state["step"], state.get("seconds", 0.0)
            if self.main:
                print(
                    f"{self.label}: resuming after step {self.first}/{self.steps} "
                    f"from {self.checkpoint}"
                )
        return self.first

    def run(self, step: Callable[[int, bool], dict[str, float] | None]) -> dict[str, float]:
        """Run the remaining steps; return the last logged scalars."""
        bar = tqdm(
            range(self.first, self.steps),
            initial=self.first,
            total=self.steps,
            desc=self.desc,
            unit="step",
            leave=False,
            disable=not self.main,
        )
        curve = StageLog(self.run_dir, self.name, self.first, enabled=self.main)
        try:
            for i in bar:
                tick = time.perf_counter()
                log = i % LOG_EVERY == 0 or i + 1 == self.steps
                scalars = step(i, log)
                self.seconds += time.perf_counter() - tick
                if log and scalars is not None:
                    self.last = dict(scalars)
                    keys = self.show or tuple(scalars)
                    bar.set_postfix({k: f"{scalars[k]:.3g}" for k in keys if k in scalars})
                    curve.log(i, **scalars)
                if self.main and (i + 1) % self.every == 0 and i + 1 < self.steps:
                    extra = self.state() if self.state is not None else {}
                    save_checkpoint(
                        self.checkpoint,
                        self.config_hash,
                        i + 1,
                        self.model,
                        self.optimizer,
                        self.scheduler,
                        seconds=self.seconds,
                        **extra,
                    )
        finally:
            bar.close()
            curve.close()
        return self.last
