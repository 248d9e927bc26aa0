"""Tasks: what each output is (spec), how it is trained (loss) and scored (metrics).

:func:`build_task` turns a dataset's :class:`TaskSpec` into a :class:`Task` of the kind
registered in :data:`TASK_KINDS`; :func:`delta_m` compares a multi-task model with its
single-task baselines.
"""

from __future__ import annotations

from dymu.tasks.base import IGNORE_INDEX, TaskSpec
from dymu.tasks.delta import delta_m, delta_m_per_task
from dymu.tasks.kinds import TASK_KINDS, Task, build_task
from dymu.tasks.metrics import MetricAccumulator

__all__ = [
    "IGNORE_INDEX",
    "TASK_KINDS",
    "MetricAccumulator",
    "Task",
    "TaskSpec",
    "build_task",
    "delta_m",
    "delta_m_per_task",
]
