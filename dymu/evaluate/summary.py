"""From evaluated rows to the search report: per budget, hypervolume on one declared
reference point, uniformity, delta_m (plain and preference-weighted), controllability,
FLOPs and budget adherence over many preferences, distinct and extreme trees.

:mod:`dymu.evaluate.search` evaluates the trees; this module only computes the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dymu.config import EvaluateConfig
from dymu.evaluate.metrics import (
    budget_adherence,
    controllability,
    flops_stats,
    hypervolume,
    normalised_losses,
    reference_point,
    uniformity,
)
from dymu.models.anchor import Anchor


@dataclass
class Evaluated:
    """What the evaluation measured: one row per (budget, preference) and the baseline."""

    anchor: Anchor
    budgets: list[float]
    prefs: np.ndarray  # [P, N] the preference sweep
    base_metrics: dict
    base_losses: list[float]
    directions: dict[str, dict[str, bool]]  # task -> metric -> higher is better
    excluded: list[str]  # metrics left out of delta_m
    rows: list[dict[str, Any]]


def summarise(
    ev: Evaluated,
    cfg: EvaluateConfig,
    low: float,
    full: float,
    trees: dict[float, tuple[tuple[list, list], tuple[dict, dict]]],
    split: str = "test",
) -> dict[str, Any]:
    """The report: ``ev``'s rows scored per budget. ``trees``: per budget, the FLOPs
    fractions and params over many preferences and the extreme trees (hashes, JSON)."""
    tasks, names, rows, prefs = ev.anchor.tasks, ev.anchor.task_names, ev.rows, ev.prefs
    primary = [t.primary_metric for t in tasks]
    directions = ev.directions
    norm = normalised_losses(np.array([row["losses"] for row in rows]), np.array(ev.base_losses))
    ref = reference_point(norm)
    report: dict[str, Any] = {
        "tasks": names,
        "budgets": ev.budgets,
        "budgets_skipped": [b for b in cfg.budgets if b not in ev.budgets],
        "min_flops_fraction": low,
        "anchor_flops": full,
        "preferences": prefs.round(6).tolist(),
        "baseline": {"metrics": ev.base_metrics, "losses": ev.base_losses},
        "hypervolume": {"reference_point": ref.tolist(), "objectives": f"{split} loss / anchor's"},
        "uniformity": {},
        "delta_m": {},
        "delta_m_weighted": {},
        "delta_m_excluded": ev.excluded,
        "controllability": {},
        "controllability_excluded": [
            t for t, m in zip(names, primary, strict=True) if m not in directions.get(t, {})
        ],
        "control_range": {},
        "controllability_loss": {},
        "flops": {},
        "budget_adherence": {},
        "distinct_trees": {},
        "extreme_trees": {},
        "rows": rows,
    }
    for b in ev.budgets:
        idx = [i for i, row in enumerate(rows) if row["budget"] == b]
        perf = np.array(
            [
                [rows[i]["metrics"][t.name][m] for t, m in zip(tasks, primary, strict=True)]
                for i in idx
            ]
        )
        # A task whose primary metric has no relative change (a zero baseline) has no
        # direction to rank by: it is listed in controllability_excluded, not scored.
        keep = [k for k, m in enumerate(primary) if m in directions.get(tasks[k].name, {})]
        hib = [directions[tasks[k].name][primary[k]] for k in keep]
        key = f"{b:g}"
        report["hypervolume"][key] = hypervolume(norm[idx], ref)
        # On losses normalised by the single-task ones (metrics.uniformity's contract), so
        # that no task's loss scale dominates.
        report["uniformity"][key] = uniformity(norm[idx], prefs)
        report["delta_m"][key] = float(np.mean([rows[i]["delta_m"] for i in idx]))
        report["delta_m_weighted"][key] = float(np.mean([rows[i]["delta_m_weighted"] for i in idx]))
        scores = controllability(perf[:, keep], prefs[:, keep], hib) if keep else []
        report["controllability"][key] = {
            names[k]: float(v) for k, v in zip(keep, scores, strict=True)
        }
        report["control_range"][key] = control_range(tasks, primary, perf)
        # The same on the test losses, what the hypernetworks were trained on: it shows
        # whether the preference moves a task where its metric's range is too small to rank.
        losses = np.array([rows[i]["losses"] for i in idx])  # [P, N]
        report["controllability_loss"][key] = loss_controllability(names, losses, prefs)
        report["distinct_trees"][key] = len({rows[i]["tree"] for i in idx})
        (fractions, params), (extremes, specs) = trees[b]
        report["flops"][key] = {
            **flops_stats(np.array(fractions)),
            "params_mean": float(np.mean(params)),
        }
        report["budget_adherence"][key] = budget_adherence(np.array(fractions), b)
        report["extreme_trees"][key] = extremes
        report.setdefault("extreme_tree_specs", {})[key] = specs
    return report


def loss_controllability(names: list[str], losses: np.ndarray, prefs: np.ndarray) -> dict:
    """Controllability on the test losses (``losses``, ``prefs`` [P, N]; lower = better),
    task name -> Spearman: whether the preference moves what the hypernetworks were trained
    on, even where a metric's range is too small for its ranks to mean anything."""
    scores = controllability(losses, prefs, [False] * len(names))
    return dict(zip(names, scores.tolist(), strict=True))


def control_range(tasks, primary: list[str], perf: np.ndarray) -> dict[str, dict[str, Any]]:
    """How far the preference moves each task: its primary metric's range over the sweep
    (``perf`` [P, N]); Spearman's controllability alone says nothing about size."""
    return {
        t.name: {"metric": m, "min": float(perf[:, k].min()), "max": float(perf[:, k].max())}
        for k, (t, m) in enumerate(zip(tasks, primary, strict=True))
    }
