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


SEPARATE = ("flops_fraction", "budget_asked")
"""Scalars drawn in a panel of their own, in their own units (stage 1's FLOPs tracking):
beside the loss terms, scaled by their first values, they would read as losses."""

SMOOTH_ABOVE = 30
"""Series with more points than this are drawn smoothed (raw values faintly behind)."""


def smoothed(values: list[float], span: int) -> list[float]:
    """Exponential moving average with the pandas ``span`` convention (alpha = 2 / (span
    + 1)), debiased at the start so the first points are not pulled towards 0."""
    alpha, avg, weight, out = 2.0 / (span + 1.0), 0.0, 0.0, []
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _panels(logs: dict[str, list[dict]]) -> list[tuple[str, list[dict], list[str], bool]]:
    """(title, rows, keys, scaled) per panel: every stage's scalars but :data:`SEPARATE`,
    then those in a panel of their own in their own units."""
    panels = []
    for stage, rows in logs.items():
        keys = list(dict.fromkeys(k for r in rows for k in r if k != "step"))  # in order
        panels.append((stage, rows, [k for k in keys if k not in SEPARATE], True))
        apart = [k for k in keys if k in SEPARATE]
        if apart:
            panels.append((f"{stage}: FLOPs fraction", rows, apart, False))
    return panels


def curves_png(run_dir: Path, out: Path) -> Path | None:
    """One panel per stage that logged: every scalar against the step, each line scaled by
    its own first value where it is positive (so terms of different sizes share an axis;
    the legend gives the first value), long series smoothed with the raw values faintly
    behind; stage 1's FLOPs tracking in a panel of its own. None when no stage logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {s: read_log(Path(run_dir) / LOGS / f"{s}.jsonl") for s in STAGES}
    logs = {s: rows for s, rows in logs.items() if rows}
    if not logs:
        return None
    panels = _panels(logs)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, rows, keys, scaled) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r and math.isfinite(r[key])]
            if not points:
                continue
            steps, values = zip(*points, strict=True)
            first = values[0]
            scale = first if scaled and first > 0 else 1.0
            label = f"{key} (÷{first:.3g})" if scale != 1.0 else key
            ys = [v / scale for v in values]
            if len(points) <= SMOOTH_ABOVE:  # per-epoch logs: show the points
                ax.plot(steps, ys, label=label, linewidth=1.2, marker="o")
                continue
            (line,) = ax.plot(steps, smoothed(ys, max(len(ys) // 20, 5)), label=label, lw=1.4)
            ax.plot(steps, ys, color=line.get_color(), linewidth=0.6, alpha=0.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if scaled:
            ax.set_yscale("symlog", linthresh=1e-2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, out)
    plt.close(fig)
    return path
