"""Evaluation of controllable multi-task models: metrics over a preference sweep.

:mod:`dymu.evaluate.metrics` holds the pure (numpy-in, number-out) metrics of METHOD.md 1.7
and 6: hypervolume, uniformity, controllability and FLOPs statistics. Delta_m lives in
:mod:`dymu.tasks.delta` and is re-exported here.
"""

from __future__ import annotations

from dymu.evaluate.metrics import (
    budget_adherence,
    controllability,
    flops_stats,
    hypervolume,
    normalised_losses,
    preference_sweep,
    reference_point,
    uniformity,
)
from dymu.tasks.delta import delta_m, delta_m_per_task

__all__ = [
    "budget_adherence",
    "controllability",
    "delta_m",
    "delta_m_per_task",
    "flops_stats",
    "hypervolume",
    "normalised_losses",
    "preference_sweep",
    "reference_point",
    "uniformity",
]
