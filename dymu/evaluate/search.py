"""Evaluate a trained search (METHOD.md 1.7, DESIGN "Budget"): a preference sweep at every
budget, with hypervolume, uniformity, delta_m, controllability, FLOPs and budget adherence.

Every (preference, budget) gets its derived tree (argmax parents repaired to the budget)
with the weight hypernet's BatchNorm offsets, evaluated on the test split (the figures a
report publishes) and on the validation split (the figures choices are made on). Losses
are normalised by the anchor's own (single-task) losses on the same split before the
hypervolume, whose reference point is declared in the report.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dymu.config import EvaluateConfig
from dymu.evaluate.metrics import preference_sweep
from dymu.evaluate.summary import Evaluated, summarise
from dymu.hypernet.derivation import Derivation
from dymu.hypernet.weight import WeightHypernet
from dymu.models.anchor import Anchor
from dymu.models.streams import TreeStreams
from dymu.space.graph import anchor_flops, min_flops
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.tasks.delta import delta_m, delta_m_per_task
from dymu.train.calibrate import calibrated
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
    streams: TreeStreams | Anchor,
    derive: Derivation,
    weights: WeightHypernet,
    test_ds,
    device: torch.device,
    baseline: Anchor | None = None,
    val_ds=None,
    images: list[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The report's numbers (see ``report.md`` for what each key means), on the test split,
    and with ``val_ds`` the split-dependent ones on the validation split too, under
    ``validation``: validation chooses, test reports.

    ``streams`` holds the weights the trees run (:class:`TreeStreams`); ``derive`` gives
    the configuration of each (preference, budget); ``baseline`` the independent stage-0
    streams whose anchor tree is the single-task yardstick of delta_m and of the normalised
    losses (the tuned streams when None: no joint stage ran); ``images`` calibrate the
    statistics of configurations with widths (:func:`~dymu.train.calibrate.calibrated`).
    Evaluation (this module) gives one row per (budget, preference); :func:`summarise`
    turns the rows into the report.
    """
    streams = TreeStreams.of(streams).to(device)
    derive.edge.to(device).eval()
    weights = weights.to(device)
    space = derive.space
    anchor = streams.tuned
    baseline = anchor if baseline is None else baseline.to(device).eval()
    tasks, n = anchor.tasks, len(anchor.tasks)
    full, low = anchor_flops(space), derive.min_fraction()
    budgets = [b for b in cfg.budgets if b * full >= min_flops(space)]
    if cfg.cheapest and low not in budgets:  # the paper's c = 1: the cheapest budget
        budgets = sorted([low, *budgets])
    prefs = preference_sweep(n, cfg.preferences, cfg.seed)
    derived = {  # (budget, preference index) -> tree: the same trees on every split
        (b, i): derive(r, b) for b in budgets for i, r in enumerate(prefs)
    }
    corners = corner_preferences(n)  # [N + 1, N]: uniform, then 0.9 on each task
    corner_trees = {(b, k): derive(r, b) for b in budgets for k, r in enumerate(corners)}
    sweep = preference_sweep(n, cfg.flops_samples, cfg.seed + 1)
    trees = {  # per budget: FLOPs and params over many preferences, and the extreme trees
        b: (derived_costs(derive, b, sweep), extreme_trees(derive, b, anchor.task_names))
        for b in budgets
    }

    def on(split: str, ds) -> dict[str, Any]:
        """The report's numbers on one split (its own single-task yardstick included).

        A tree no node of which takes the adaptation (the anchor tree under the private-node
        rule, and every configuration with widths: the weight hnet was trained on full-width
        trees) gives the same outputs for every preference: it is evaluated once."""
        fixed: dict[str, tuple[dict, list]] = {}  # tree hash -> (metrics, losses)

        def run(tree, rt, b):
            if tree.widths is None and streams.adapted(tree):
                net = TreeNet(streams, tree)
                return evaluate_net(net, weights(rt, b, tree), ds, tasks, cfg.batch_size, device)
            if tree.hash() not in fixed:
                if tree.widths is not None and images is None:
                    raise ValueError("configurations with widths need calibration images")
                net = calibrated(streams, tree, images or [])
                fixed[tree.hash()] = evaluate_net(net, None, ds, tasks, cfg.batch_size, device)
            return fixed[tree.hash()]

        base_net = TreeNet(baseline, TreeSpec.no_sharing(n, anchor.num_layers))
        base_metrics, base_losses = evaluate_net(base_net, None, ds, tasks, cfg.batch_size, device)
        directions, excluded = delta_m_directions(tasks, base_metrics)
        rows = []
        total = len(derived) + len(corner_trees)
        bar = tqdm(total=total, desc=f"evaluation ({split})", unit="tree", leave=False)
        for (b, i), tree in derived.items():
            r = prefs[i]
            rt = _pref(r, device)
            metrics, losses = run(tree, rt, b)
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
        corner_rows = []
        for (b, k), tree in corner_trees.items():
            metrics, losses = run(tree, _pref(corners[k], device), b)
            row = {"budget": b, "corner": k, "tree": tree.hash(), "losses": losses}
            corner_rows.append({**row, "metrics": metrics})
            bar.update(1)
        bar.close()
        ev = Evaluated(
            anchor, budgets, prefs, base_metrics, base_losses, directions, excluded, rows
        )
        summary = summarise(ev, cfg, low, full, trees, split)
        summary["corner_gain"] = corner_gains(tasks, budgets, corner_rows)
        return {"split": split, **summary, "corner_rows": corner_rows}

    report = on("test", test_ds)
    if derive.slim is not None:
        report["widths"] = {
            "widths": derive.widths,
            "cheapest_tree": min_flops(derive.plain) / full,
            "strength": derive.strength,
            "fill": derive.fill,
            "adaptation": "none for configurations with widths (the weight hnet adapts trees)",
        }
    if val_ds is not None:
        # Choices (defaults, ablation winners, probes) read these; the test figures report.
        report["validation"] = {k: v for k, v in on("val", val_ds).items() if k in SPLIT_KEYS}
    return report


SPLIT_KEYS = (
    "split",
    "baseline",
    "hypervolume",
    "uniformity",
    "delta_m",
    "delta_m_weighted",
    "controllability",
    "control_range",
    "controllability_loss",
    "corner_gain",
    "rows",
    "corner_rows",
)
"""The report's keys that depend on the split evaluated (the trees and FLOPs do not)."""


CORNER = 0.9
"""The weight a task gets at its own corner; the other tasks share the rest evenly."""


def corner_preferences(n: int) -> np.ndarray:
    """[N + 1, N]: the uniform preference, then each task's corner (0.9 on it)."""
    corners = np.full((n, n), (1.0 - CORNER) / max(n - 1, 1))
    np.fill_diagonal(corners, CORNER if n > 1 else 1.0)
    return np.vstack([np.full((1, n), 1.0 / n), corners])


def corner_gains(tasks, budgets: list[float], corner_rows: list[dict]) -> dict[str, dict]:
    """Control as a user feels it (METHOD.md 1.10), per budget and task: its primary metric
    at its own corner (0.9 on it) and at the uniform preference, ``gain`` = own corner -
    uniform in the better direction (+ = asking for the task helps it), ``loss_gain`` =
    uniform - own corner on its loss (+ = lower loss at its corner), and ``vs_others`` =
    own corner - the mean over the other tasks' corners, in the better direction."""
    out: dict[str, dict] = {}
    for b in budgets:
        at = {row["corner"]: row for row in corner_rows if row["budget"] == b}  # 0 = uniform
        per_task = {}
        for j, t in enumerate(tasks):
            metric = t.primary_metric
            higher = t.metric_directions.get(metric, True)
            sign = 1.0 if higher else -1.0
            own, uniform = at[j + 1], at[0]
            others = [at[k + 1]["metrics"][t.name][metric] for k in range(len(tasks)) if k != j]
            value = own["metrics"][t.name][metric]
            per_task[t.name] = {
                "metric": metric,
                "higher_is_better": higher,
                "own_corner": value,
                "uniform": uniform["metrics"][t.name][metric],
                "gain": sign * (value - uniform["metrics"][t.name][metric]),
                "loss_gain": uniform["losses"][j] - own["losses"][j],
                "vs_others": sign * (value - float(np.mean(others))) if others else 0.0,
            }
        out[f"{b:g}"] = {
            "tasks": per_task,
            "trees": len({row["tree"] for row in at.values()}),
        }
    return out


def _pref(r, device) -> torch.Tensor:
    return torch.tensor(r, dtype=torch.float32, device=device)


def derived_costs(derive: Derivation, b: float, sweep: np.ndarray) -> tuple[list, list]:
    """(FLOPs fraction, params) of the configurations derived for every preference of
    ``sweep`` at budget ``b``: derivations only, no evaluation needed."""
    space = derive.space
    full = anchor_flops(space)
    fractions, params = [], []
    for r in sweep:
        tree = derive(r, b)
        fractions.append(tree.flops(space) / full)
        params.append(tree.params(space))
    return fractions, params


def extreme_trees(derive: Derivation, b: float, task_names: list[str]) -> tuple[dict, dict]:
    """(task -> tree hash, task -> tree JSON) of the configurations for preference 0.98 on
    one task."""
    n = len(task_names)
    extremes, specs = {}, {}
    for j, name in enumerate(task_names):
        r = np.full(n, 0.02 / max(n - 1, 1))
        r[j] = 0.98
        tree = derive(r, b)
        extremes[name], specs[name] = tree.hash(), tree.to_json()
    return extremes, specs
