"""Write a search's report: ``report.json`` (numbers), ``report.md`` (for a reader), plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx

from dymu.io import save_figure, write_json, write_text
from dymu.space.render import tree_png
from dymu.space.tree import TreeSpec
from dymu.train.curves import curves_png

EXPLAIN = """\
## What the numbers mean

- **budget**: a fraction of the anchor's FLOPs (all N streams and heads; fvcore, one fused
  multiply-add = one FLOP). Budgets below the space's cheapest configuration are skipped.
  With widths (`model.widths`), the budgets below the cheapest full-width tree run
  configurations that narrow nodes, widths following the preference (no weight adaptation).
- **hypervolume**: exact (moocore) hypervolume of the test losses of the 20 sweep trees,
  each loss divided by the anchor's own loss on that task (1.0 = single-task quality), with
  the declared reference point (1.1 x the worst normalised loss over all budgets). Larger
  is better; comparable only under the same reference point.
- **uniformity**: mean over the sweep of 1 - KL(Lhat || uniform), Lhat_j = r_j L_j /
  sum_i r_i L_i with L_j the loss divided by the anchor's own (natural log); 1 = normalised
  losses exactly in proportion to the preference.
- **delta_m**: mean relative change (%) of every task's metrics against the single-task
  anchor (the independent stage-0 streams), averaged per task first; positive = better
  than single-task. **weighted**: the per-task changes weighted by the preference, i.e.
  what the user who asked for that preference gets. The budget equal to the cheapest
  configuration's FLOPs (the paper's c = 1) is evaluated beside the configured ones.
- **controllability**: per task, Spearman correlation between the weight the task is given
  and its (normalised) primary metric over the sweep; positive = more weight, better task.
  Spearman ranks, so it says nothing about size: the bracket gives the metric's range.
  **loss**: the same on the task's test loss (lower = better), what the hypernetworks were
  trained on; where a metric moves by hundredths of a point, its rank order is noise and
  the loss shows whether the preference moves the task at all.
- **corner gain**: per task, its primary metric at its own corner (0.9 on it, the rest
  spread evenly) minus at the uniform preference (+ = better): the size of the lever a
  user pulls, where Spearman only ranks. `control.png` shows every task's metric against
  its weight.
- **flops**: statistics of the derived trees' FLOPs fraction over many preferences;
  **budget adherence**: the share of those trees within the budget (1.0 = always).
"""


def _plots(run_dir: Path, report: dict[str, Any], space: nx.DiGraph) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    budgets = report["budgets"]
    keys = [f"{b:g}" for b in budgets]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="FLOPs = budget")
    mean = [report["flops"][k]["mean"] for k in keys]
    lo = [report["flops"][k]["q05"] for k in keys]
    hi = [report["flops"][k]["q95"] for k in keys]
    ax.fill_between(budgets, lo, hi, alpha=0.3, label="5-95% of trees")
    ax.plot(budgets, mean, "o-", label="mean")
    ax.axhline(report["min_flops_fraction"], color="grey", lw=0.8, label="cheapest configuration")
    ax.set_xlabel("budget (fraction of the anchor's FLOPs)")
    ax.set_ylabel("derived tree's FLOPs / anchor's")
    ax.set_title("FLOPs against budget (fvcore)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, run_dir / "flops_vs_budget.png")
    plt.close(fig)
    written.append("flops_vs_budget.png")

    tasks = report["tasks"]
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))][:6]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.2 * len(pairs), 3.2), squeeze=False)
    base = report["baseline"]["losses"]
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        for k, b in zip(keys, budgets, strict=True):
            rows = [r for r in report["rows"] if f"{r['budget']:g}" == k]
            ax.scatter(
                [r["losses"][i] / base[i] for r in rows],
                [r["losses"][j] / base[j] for r in rows],
                s=12,
                label=f"b={b:g}",
            )
        ax.set_xlabel(f"{tasks[i]} loss / anchor's", fontsize=8)
        ax.set_ylabel(f"{tasks[j]} loss / anchor's", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("trade-off fronts over the preference sweep (lower is better)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # room for the title above the panels
    save_figure(fig, run_dir / "fronts.png")
    plt.close(fig)
    written.append("fronts.png")
    written.append(_control_png(run_dir, report, plt))

    lowest = keys[0]
    for name, tree_json in report.get("extreme_tree_specs", {}).get(lowest, {}).items():
        tree = TreeSpec.from_json(tree_json)
        out = run_dir / f"tree_{name}.png"
        tree_png(tree, tasks, out, G=space, title=f"preference 0.98 on {name}, budget {lowest}")
        written.append(out.name)
    return written


def _relative(value: float, base: float, higher: bool) -> float:
    """``value`` against the single-task ``base`` in %, + = better."""
    change = 100.0 * (value - base) / abs(base) if base else 0.0
    return change if higher else -change


def _control_png(run_dir: Path, report: dict[str, Any], plt) -> str:
    """``control.png``: one panel per budget, each task's primary metric (relative to the
    single-task anchor) against the weight the sweep gives it; the uniform preference and
    the corners (0.9 on a task) drawn larger. What a user who moves the preference gets."""
    tasks, budgets = report["tasks"], report["budgets"]
    fig, axes = plt.subplots(
        1, len(budgets), figsize=(3.2 * len(budgets), 3.2), squeeze=False, sharey=True
    )
    base = report["baseline"]["metrics"]
    for ax, b in zip(axes[0], budgets, strict=True):
        k = f"{b:g}"
        rows = [r for r in report["rows"] if f"{r['budget']:g}" == k]
        corners = report.get("corner_gain", {}).get(k, {}).get("tasks", {})
        for j, t in enumerate(tasks):
            c = corners.get(t)
            metric, higher = (
                (c["metric"], c["higher_is_better"]) if c else (next(iter(base[t])), True)
            )
            ys = [_relative(r["metrics"][t][metric], base[t][metric], higher) for r in rows]
            dots = ax.scatter([r["preference"][j] for r in rows], ys, s=10, label=t)
            if c:  # the uniform preference and the task's corner
                ends = [
                    _relative(c[key], base[t][metric], higher) for key in ("uniform", "own_corner")
                ]
                ax.plot(
                    [1.0 / len(tasks), 0.9], ends, "D-", color=dots.get_facecolor()[0], ms=5, lw=0.8
                )
        ax.axhline(0.0, color="grey", lw=0.6)
        ax.set_title(f"budget {b:.3g}", fontsize=9)
        ax.set_xlabel("the task's weight in the preference", fontsize=8)
    axes[0][0].set_ylabel("primary metric vs single-task (%, + = better)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    title = "control: each task's metric against its weight (diamonds: uniform, 0.9)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    save_figure(fig, run_dir / "control.png")
    plt.close(fig)
    return "control.png"


def _header(*cells: str) -> list[str]:
    """A markdown table's header row and rule."""
    return ["| " + " | ".join(cells) + " |", "|" + " --- |" * len(cells)]


def _corner_lines(report: dict[str, Any]) -> list[str]:
    """The corner gains: each task's primary metric at its own corner against uniform."""
    gains = report.get("corner_gain")
    if not gains:
        return []
    lines = [
        "",
        "Corner gain (what a user feels): each task's primary metric at its own corner (0.9 "
        "on it, the rest spread evenly) minus at the uniform preference, + = better; then "
        "its loss lowered by the corner, and its metric at its own corner against the other "
        "tasks' corners:",
        "",
        *_header("budget", "trees", *report["tasks"]),
    ]
    for b in report["budgets"]:
        k = f"{b:g}"
        cells = [
            f"{c['gain']:+.3g} {c['metric']}, loss {c['loss_gain']:+.3g}, vs others "
            f"{c['vs_others']:+.3g}"
            for c in (gains[k]["tasks"][t] for t in report["tasks"])
        ]
        lines.append(f"| {k} | {gains[k]['trees']} | " + " | ".join(cells) + " |")
    return lines


def _control_cell(
    score: float | None, span: dict[str, Any] | None, on_loss: float | None = None
) -> str:
    """``+0.64 (91.84-91.87 miou), loss +0.70``: a task's controllability, its metric's
    range and its controllability on the loss."""
    cell = "-" if score is None else f"{score:+.2f}"
    if span is not None:
        cell += f" ({span['min']:.4g}-{span['max']:.4g} {span['metric']})"
    if on_loss is not None:
        cell += f", loss {on_loss:+.2f}"
    return cell


def _validation_lines(report: dict[str, Any]) -> list[str]:
    """The validation split's figures (what choices are made on), beside the test ones."""
    val = report.get("validation")
    if not val:
        return []
    lines = [
        "",
        "Validation split (choices are made on these; the tables above are on the test split):",
        "",
        *_header(
            "budget", "hypervolume", "uniformity", "delta_m %", "controllability", "on losses"
        ),
    ]
    for b in report["budgets"]:
        k = f"{b:g}"
        ctrl = ", ".join(f"{t} {v:+.2f}" for t, v in val["controllability"][k].items())
        loss = ", ".join(f"{t} {v:+.2f}" for t, v in val["controllability_loss"][k].items())
        lines.append(
            f"| {k} | {val['hypervolume'][k]:.4f} | {val['uniformity'][k]:.3f} | "
            f"{val['delta_m'][k]:+.2f} | {ctrl} | {loss} |"
        )
    return lines


def write_report(run_dir: Path, report: dict[str, Any], space: nx.DiGraph) -> None:
    """``report.json``, ``report.md`` and the plots into ``run_dir``."""
    run_dir = Path(run_dir)
    plots = _plots(run_dir, report, space)
    write_json(run_dir / "report.json", report)
    lines = ["# dymu search report", "", f"Tasks: {', '.join(report['tasks'])}.", ""]
    if report["budgets_skipped"]:
        lines += [
            f"Budgets {report['budgets_skipped']} are below the cheapest configuration "
            f"({report['min_flops_fraction']:.3f} of the anchor) and were skipped.",
            "",
        ]
    if report.get("widths"):
        w = report["widths"]
        fill = w.get("fill", 0.0)
        gap = (
            f", and so does a budget whose full-width tree would spend less than {fill:g} of "
            "it (where narrowed nodes spend more)"
            if fill > 0
            else ""
        )
        lines += [
            f"Widths {w['widths']}: budgets below the cheapest full-width tree "
            f"({w['cheapest_tree']:.3f} of the anchor) run configurations that narrow nodes, "
            f"widths following the preference (strength {w['strength']:g}), without weight "
            f"adaptation{gap}; every other budget runs the full-width tree it would without "
            "widths.",
            "",
        ]
    if report.get("delta_m_excluded"):
        lines += [
            f"Left out of delta_m (single-task baseline 0, so no relative change): "
            f"{', '.join(report['delta_m_excluded'])}.",
            "",
        ]
    lines += _header(
        "budget",
        "hypervolume",
        "uniformity",
        "delta_m %",
        "weighted %",
        "FLOPs mean",
        "adherence",
        "trees",
    )
    for b in report["budgets"]:
        k = f"{b:g}"
        lines.append(
            f"| {k} | {report['hypervolume'][k]:.4f} | {report['uniformity'][k]:.3f} | "
            f"{report['delta_m'][k]:+.2f} | {report['delta_m_weighted'][k]:+.2f} | "
            f"{report['flops'][k]['mean']:.3f} | "
            f"{report['budget_adherence'][k]:.3f} | {report['distinct_trees'][k]} |"
        )
    lines += [
        "",
        "Controllability (Spearman, per task), with the range of the task's primary metric "
        "over the sweep in brackets (how far the preference moves it) and the same Spearman "
        "on the task's test loss:",
        "",
        *_header("budget", *report["tasks"]),
    ]
    for b in report["budgets"]:
        k = f"{b:g}"
        scores, ranges = report["controllability"][k], report.get("control_range", {}).get(k, {})
        on_loss = report.get("controllability_loss", {}).get(k, {})
        vals = " | ".join(
            _control_cell(scores.get(t), ranges.get(t), on_loss.get(t)) for t in report["tasks"]
        )
        lines.append(f"| {k} | {vals} |")
    lines += _corner_lines(report)
    lines += _validation_lines(report)
    lines += [
        "",
        f"Reference point of the hypervolume: {report['hypervolume']['reference_point']}",
        "",
        EXPLAIN,
        "Plots: "
        + ", ".join(plots)
        + (", affinity.png" if (run_dir / "affinity.png").is_file() else ""),
        "",
    ]
    if curves_png(run_dir, run_dir / "curves.png") is not None:
        lines += [
            "## Training curves",
            "",
            "Every logged scalar of each stage against the step (from `logs/<stage>.jsonl`), "
            "each divided by its first value where that is positive; symlog axis; long series "
            "smoothed, the raw values faintly behind; stage 1's FLOPs tracking apart.",
            "",
            "![training curves](curves.png)",
            "",
        ]
    write_text(run_dir / "report.md", "\n".join(lines))
