"""Training curves: every stage's scalars, one JSON line per logged step.

Each training stage writes ``RUN/logs/<stage>.jsonl`` (``{"step": 120, "loss": ...}`` per
line) and, where the optional ``tensorboard`` package is installed, TensorBoard event files
in ``RUN/logs/<stage>/``. A resumed stage keeps the lines of the steps its checkpoint
covers and drops the rest (they are logged again), so a killed and resumed run's log has
every step once, as an uninterrupted run's does. :func:`curves_png` draws one panel per
stage for ``report.md``.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

from dymu.io import ensure_dir, save_figure, write_text

LOGS = "logs"
STAGES = ("stage0", "joint", "stage1", "stage2")
"""The stages that log, in the order they run (the panels of ``curves.png``)."""


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


class StageLog:
    """Appends one stage's scalars to ``RUN/logs/<stage>.jsonl`` (rank 0 only).

    Args:
        run_dir: the run directory.
        stage: ``stage0``, ``joint``, ``stage1`` or ``stage2``.
        first: the first step this process runs: 0 starts a new log; a resumed stage
            passes its checkpoint's step and keeps only the lines before it.
        enabled: False on the other ranks of ``torchrun`` (nothing is written).
    """

    def __init__(self, run_dir: Path, stage: str, first: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self._file = self._tb = None
        if not enabled:
            return
        folder = ensure_dir(Path(run_dir) / LOGS)
        self.path = folder / f"{stage}.jsonl"
        kept = [row for row in read_log(self.path) if row["step"] < first] if first else []
        write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))
        self._file = self.path.open("a", encoding="utf-8")
        if tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(folder / stage), purge_step=first)

    def log(self, step: int, **scalars: float) -> None:
        """Record ``scalars`` (plain numbers) at ``step``; one line, flushed at once so a
        killed run keeps what it logged."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, float(value), int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``.jsonl`` log ([] when absent); a line cut short by a kill is skipped."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def curves_png(run_dir: Path, out: Path) -> Path | None:
    """One panel per stage that logged: every scalar against the step, each line scaled by
    its own first value where it is positive (so terms of different sizes share an axis;
    the legend gives the first value). None when no stage logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {s: read_log(Path(run_dir) / LOGS / f"{s}.jsonl") for s in STAGES}
    logs = {s: rows for s, rows in logs.items() if rows}
    if not logs:
        return None
    fig, axes = plt.subplots(1, len(logs), figsize=(4.2 * len(logs), 3.4), squeeze=False)
    for ax, (stage, rows) in zip(axes[0], logs.items(), strict=True):
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "step"))  # in order
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            first = values[0]
            scale = first if first > 0 else 1.0
            label = f"{key} (÷{first:.3g})" if first > 0 else key
            marker = "o" if len(points) <= 30 else None  # per-epoch logs: show the points
            ax.plot(steps, [v / scale for v in values], label=label, linewidth=1.2, marker=marker)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, out)
    plt.close(fig)
    return path
