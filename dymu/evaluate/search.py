"""Evaluate a trained search (METHOD.md 1.7, DESIGN "Budget"): a preference sweep at every
budget, with hypervolume, uniformity, delta_m, controllability, FLOPs and budget adherence.

Every (preference, budget) gets its derived tree (argmax parents repaired to the budget)
with the weight hypernet's BatchNorm offsets, evaluated on the test split. Losses are
normalised by the anchor's own (single-task) test losses before the hypervolume, whose
reference point is declared in the report.
"""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np
import torch
from tqdm.auto import tqdm

from dymu.config import EvaluateConfig
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
from dymu.hypernet.edge import EdgeHypernet
from dymu.hypernet.weight import WeightHypernet
from dymu.models.anchor import Anchor
from dymu.space.derive import derive_tree
from dymu.space.graph import anchor_flops, min_flops
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.tasks.delta import delta_m, delta_m_per_task
from dymu.train.loop import evaluate_model


def evaluate_net(net: TreeNet, offsets, ds, tasks, batch_size: int, device) -> tuple[dict, list]:
    """(metrics per task, mean loss per task) of one tree over a whole split."""
    return evaluate_model(lambda image: net(image, offsets), ds, tasks, batch_size, device)


def delta_m_directions(tasks, base_metrics: dict) -> tuple[dict[str, dict[str, bool]], list[str]]:
    """(task -> metric -> higher is better, metrics left out of delta_m).

    A baseline metric of 0 (a weak anchor scoring nothing within 11.25 degrees, say) has no
    relative change: such metrics leave delta_m, and the report lists them.
    """
    directions, excluded = {}, []
    for t in tasks:
        keep = {}
        for metric, higher in t.metric_directions.items():
            value = base_metrics[t.name].get(metric, float("nan"))
            if np.isfinite(value) and value != 0:
                keep[metric] = higher
            else:
                excluded.append(f"{t.name}/{metric}")
        if keep:
            directions[t.name] = keep
    return directions, excluded


def weighted_delta_m(
    metrics: dict, base_metrics: dict, directions: dict, r, task_names: list[str]
) -> float:
    """Preference-weighted delta_m: sum_t r_t delta_t over the tasks in ``directions``, with
    r (ordered as ``task_names``) renormalised over them; what a user who asked for r gains
    or loses."""
    per_task = delta_m_per_task(metrics, base_metrics, directions)
    names = list(directions)
    weights = np.array([r[task_names.index(t)] for t in names], dtype=np.float64)
    weights = weights / weights.sum() if weights.sum() > 0 else np.full(len(names), 1 / len(names))
    return float(sum(w * per_task[t] for w, t in zip(weights, names, strict=True)))


@torch.no_grad()
def evaluate_search(
    cfg: EvaluateConfig,
    anchor: Anchor,
    space: nx.DiGraph,
    edge: EdgeHypernet,
    weights: WeightHypernet,
    test_ds,
    device: torch.device,
    baseline: Anchor | None = None,
    private: Anchor | None = None,
) -> dict[str, Any]:
    """The report's numbers (see ``report.md`` for what each key means).

    ``anchor`` holds the streams the trees run on; ``baseline`` the independent stage-0
    streams whose anchor tree is the single-task yardstick of delta_m and of the normalised
    losses (``anchor`` itself when None: no joint stage ran); ``private`` the streams the
    trees' private nodes run (:class:`~dymu.space.treenet.TreeNet`), if any.
    """
    anchor, edge, weights = anchor.to(device).eval(), edge.to(device).eval(), weights.to(device)
    baseline = anchor if baseline is None else baseline.to(device).eval()
    private = None if private is None else private.to(device).eval()
    tasks, n = anchor.tasks, len(anchor.tasks)
    full, low = anchor_flops(space), min_flops(space) / anchor_flops(space)
    budgets = [b for b in cfg.budgets if b * full >= min_flops(space)]
    if cfg.cheapest and low not in budgets:  # the paper's c = 1: the cheapest tree's budget
        budgets = sorted([low, *budgets])
    prefs = preference_sweep(n, cfg.preferences, cfg.seed)
    base_net = TreeNet(baseline, TreeSpec.no_sharing(n, anchor.num_layers))
    base_metrics, base_losses = evaluate_net(base_net, None, test_ds, tasks, cfg.batch_size, device)
    directions, excluded = delta_m_directions(tasks, base_metrics)
    primary = [t.primary_metric for t in tasks]

    rows = []
    bar = tqdm(total=len(budgets) * len(prefs), desc="evaluation", unit="tree", leave=False)
    for b in budgets:
        for r in prefs:
            rt = torch.tensor(r, dtype=torch.float32, device=device)
            tree = derive_tree(edge.alpha(rt, b).cpu(), space, b)
            metrics, losses = evaluate_net(
                TreeNet(anchor, tree, private),
                weights(rt, b, tree),
                test_ds,
                tasks,
                cfg.batch_size,
                device,
            )
            rows.append(
                {
                    "budget": b,
                    "preference": [round(float(x), 6) for x in r],
                    "tree": tree.hash(),
                    "flops_fraction": tree.flops(space) / full,
                    "params": tree.params(space),
                    "losses": losses,
                    "metrics": metrics,
                    "delta_m": delta_m(metrics, base_metrics, directions),
                    "delta_m_weighted": weighted_delta_m(
                        metrics, base_metrics, directions, r, anchor.task_names
                    ),
                }
            )
            bar.update(1)
    bar.close()

    norm = normalised_losses(np.array([row["losses"] for row in rows]), np.array(base_losses))
    ref = reference_point(norm)
    report: dict[str, Any] = {
        "tasks": anchor.task_names,
        "budgets": budgets,
        "budgets_skipped": [b for b in cfg.budgets if b not in budgets],
        "min_flops_fraction": low,
        "anchor_flops": full,
        "preferences": prefs.round(6).tolist(),
        "baseline": {"metrics": base_metrics, "losses": base_losses},
        "hypervolume": {"reference_point": ref.tolist(), "objectives": "test loss / anchor's"},
        "uniformity": {},
        "delta_m": {},
        "delta_m_weighted": {},
        "delta_m_excluded": excluded,
        "controllability": {},
        "controllability_excluded": [
            t
            for t, m in zip(anchor.task_names, primary, strict=True)
            if m not in directions.get(t, {})
        ],
        "flops": {},
        "budget_adherence": {},
        "distinct_trees": {},
        "extreme_trees": {},
        "rows": rows,
    }
    for b in budgets:
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
            anchor.task_names[k]: float(v) for k, v in zip(keep, scores, strict=True)
        }
        report["distinct_trees"][key] = len({rows[i]["tree"] for i in idx})
        # FLOPs over many preferences: trees only, no evaluation needed.
        many = preference_sweep(n, cfg.flops_samples, cfg.seed + 1)
        fractions, params = [], []
        for r in many:
            tree = derive_tree(
                edge.alpha(torch.tensor(r, dtype=torch.float32, device=device), b).cpu(), space, b
            )
            fractions.append(tree.flops(space) / full)
            params.append(tree.params(space))
        report["flops"][key] = {
            **flops_stats(np.array(fractions)),
            "params_mean": float(np.mean(params)),
        }
        report["budget_adherence"][key] = budget_adherence(np.array(fractions), b)
        extremes, specs = {}, {}
        for j, name in enumerate(anchor.task_names):
            r = torch.full((n,), 0.02 / max(n - 1, 1), device=device)
            r[j] = 0.98
            tree = derive_tree(edge.alpha(r, b).cpu(), space, b)
            extremes[name], specs[name] = tree.hash(), tree.to_json()
        report["extreme_trees"][key] = extremes
        report.setdefault("extreme_tree_specs", {})[key] = specs
    return report
