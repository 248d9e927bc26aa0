"""Delta_m: the average relative gain of a multi-task model over single-task baselines.

METHOD.md 6 writes Delta_m = (1/T) sum_t (1/M_t) sum_m (-1)^{h_tm} (M_tm - B_tm) / B_tm x 100
with h = 1 when higher is better; taken literally that makes an improvement of a
higher-is-better metric *negative*. dymu follows the convention of the papers that report
it (Maninis et al. 2019, Vandenhende et al. 2021): **positive = better**, i.e. each term is

    (-1)^{l_tm} (M_tm - B_tm) / B_tm x 100,   l_tm = 1 when lower is better.

Which metrics enter is the caller's choice through ``directions`` (one primary metric per
task, or all of them), and METHOD.md 6 asks result files to name it; ``pooled`` picks
between a mean over tasks of per-task means (the paper convention) and a mean over all
(task, metric) pairs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from dymu.errors import UserError

Table = Mapping[str, Mapping[str, float]]
"""``{task: {metric: value}}``."""


def _terms(
    results: Table, baselines: Table, directions: Mapping[str, Mapping[str, bool]]
) -> dict[str, list[float]]:
    """Relative gains in percent, positive = better, per task and metric of ``directions``."""
    if not directions:
        raise UserError("delta_m: no tasks given in directions")
    terms: dict[str, list[float]] = {}
    for task, metrics in directions.items():
        if not metrics:
            raise UserError(f"delta_m: task {task!r} has no metrics in directions")
        terms[task] = []
        for metric, higher_is_better in metrics.items():
            values = []
            for what, table in (("results", results), ("baselines", baselines)):
                try:
                    value = float(table[task][metric])
                except KeyError:
                    raise UserError(f"delta_m: {what} lack {task}/{metric}") from None
                if not math.isfinite(value):
                    raise UserError(f"delta_m: {what} have non-finite {task}/{metric}: {value}")
                values.append(value)
            m, b = values
            if b == 0:
                raise UserError(f"delta_m: baseline {task}/{metric} is 0, relative gain undefined")
            sign = 1.0 if higher_is_better else -1.0
            # |B| equals B for dymu's nonnegative metrics and keeps "positive = better" otherwise
            terms[task].append(sign * (m - b) / abs(b) * 100.0)
    return terms


def delta_m_per_task(
    results: Table, baselines: Table, directions: Mapping[str, Mapping[str, bool]]
) -> dict[str, float]:
    """Per task, the mean relative gain (percent, positive = better) over its metrics.

    Args:
        results: ``{task: {metric: value}}`` of the model under test.
        baselines: the same for the single-task baselines.
        directions: ``{task: {metric: higher_is_better}}``; exactly these metrics enter.

    Raises:
        UserError: a metric missing from results or baselines, non-finite, or a zero
            baseline (the message names task/metric).
    """
    return {t: sum(v) / len(v) for t, v in _terms(results, baselines, directions).items()}


def delta_m(
    results: Table,
    baselines: Table,
    directions: Mapping[str, Mapping[str, bool]],
    pooled: bool = False,
) -> float:
    """Delta_m in percent, positive = better than the single-task baselines.

    Delta_m = (1/T) sum_t (1/M_t) sum_m (-1)^{l_tm} (M_tm - B_tm) / B_tm x 100, with
    l_tm = 1 when metric m of task t is lower-is-better (see the module docstring for why
    this is the sign of the literature and not the literal one of METHOD.md 6).

    Args:
        results: ``{task: {metric: value}}`` of the model under test.
        baselines: the same for the single-task baselines.
        directions: ``{task: {metric: higher_is_better}}`` (e.g. ``Task.metric_directions``
            per task, or only the primary metric); exactly these metrics enter.
        pooled: average over all (task, metric) pairs at once instead of per task first,
            which weighs a task by its number of metrics.

    Raises:
        UserError: see :func:`delta_m_per_task`.
    """
    terms = _terms(results, baselines, directions)
    if pooled:
        flat = [x for values in terms.values() for x in values]
        return sum(flat) / len(flat)
    per_task = [sum(v) / len(v) for v in terms.values()]
    return sum(per_task) / len(per_task)
