"""The comparison of DYMU with every baseline: ``baselines/report.json``, ``report.md``, a plot.

All methods are scored the same way: each point's test losses are divided by the anchor's
own (single-task) test losses, and one reference point, 1.1 x the worst normalised loss over
**every method's points**, serves every hypervolume, so the hypervolumes can be compared.
DYMU's points are the search evaluation's sweep at each budget (``report.json`` of the run);
single-task is the anchor (one point). Training time is the sum of the stages a method
needs: DYMU counts stage 0 (its anchor) as well as stages 1 and 2.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dymu.artifacts import read_json, rerun_fix
from dymu.config import BASELINE_METHODS
from dymu.evaluate.metrics import hypervolume, normalised_losses, reference_point, uniformity
from dymu.io import save_figure, write_json, write_text
from dymu.tasks.delta import delta_m
from dymu.train.joint import JOINT_JSON
from dymu.train.stage0 import ANCHOR_JSON
from dymu.train.stage1 import EDGE_JSON
from dymu.train.stage2 import WEIGHT_JSON

FOLDER = "baselines"

LABELS = {
    "single_task": "single-task (anchor)",
    "static": "static shared models, one per preference",
    "transfer": "Pareto set with parameter transfer",
    "phn": "Pareto hypernetwork (all parameters)",
    "phn_bn": "Pareto hypernetwork, BN only (PHN-BN)",
    "weighting": "shared model per weighting strategy",
    "ecmt": "ECMT-style slimmable encoder and decoders",
}


def _entries(run: Path, search: dict[str, Any], hashes: dict[str, str]) -> list[dict[str, Any]]:
    """Every method's points and costs, DYMU (one entry per budget, from the search's
    ``report.json``: ``search``) first.

    Baselines are those in ``RUN/baselines/`` whose settings match this config (``hashes``:
    method -> hash), whichever call trained them.
    """
    fix = rerun_fix(run)
    anchor = read_json(run / ANCHOR_JSON, "stage-0 record", fix)
    stage_seconds = [
        anchor["train"]["seconds"],
        read_json(run / EDGE_JSON, "stage-1 record", fix)["seconds"],
        read_json(run / WEIGHT_JSON, "stage-2 record", fix)["seconds"],
    ]
    if (run / JOINT_JSON).is_file():  # the joint stage, where it ran
        stage_seconds.insert(1, read_json(run / JOINT_JSON, "joint record", fix)["seconds"])
    anchor_params = _stored_params(run, "anchor.safetensors")
    stored = anchor_params + _stored_params(run, "edge_hnet.safetensors", "weight_hnet.safetensors")
    entries = []
    for b in search["budgets"]:
        key = f"{b:g}"
        rows = [r for r in search["rows"] if f"{r['budget']:g}" == key]
        entries.append(
            {
                "method": f"dymu@{key}",
                "label": f"DYMU, budget {key}",
                "points": [{**r, "label": r["tree"]} for r in rows],
                "flops_fraction": search["flops"][key]["mean"],
                "params": search["flops"][key]["params_mean"],
                "params_stored": stored,
                "train_seconds": float(sum(stage_seconds)),
                "controllable": True,
            }
        )
    base = search["baseline"]
    entries.append(
        {
            "method": "single_task",
            "label": LABELS["single_task"],
            "points": [{"label": "anchor", "preference": None, **base}],
            "flops_fraction": 1.0,
            "params": anchor_params,
            "params_stored": anchor_params,
            "train_seconds": stage_seconds[0],
            "controllable": False,
        }
    )
    for method in BASELINE_METHODS:
        path = run / FOLDER / f"{method}.json"
        if not path.is_file():
            continue
        result = read_json(path, "baseline result", "delete it and rerun dymu baselines")
        if result.get("config_hash") != hashes[method]:
            continue
        subset = None  # a stacked set trained on part of the sweep (baselines.stacked_models)
        if result.get("models", 0) < result.get("sweep", 0):
            subset = {k: result[k] for k in ("models", "sweep", "train_seconds_sweep")}
        label = LABELS[method]
        if subset:
            label += f" ({subset['models']} of the sweep's {subset['sweep']})"
        if method == "ecmt":  # one entry per budget, as DYMU's
            for key, at in result["budgets"].items():
                entries.append(
                    {
                        "method": f"ecmt@{key}",
                        "label": f"{label}, budget {key}",
                        "points": at["points"],
                        "flops_fraction": at["flops_fraction"],
                        "params": at["params"],
                        "params_stored": result.get("params_stored"),
                        "train_seconds": result["train_seconds"],
                        "controllable": True,
                    }
                )
            continue
        entries.append(
            {
                "method": method,
                "label": label,
                "points": result["points"],
                "flops_fraction": result["flops_fraction"],
                "params": result["params"],
                "params_stored": result.get("params_stored"),
                "train_seconds": result["train_seconds"],
                "subset": subset,
                "controllable": method != "weighting",
                "log": result["log"],
            }
        )
    return entries


def _stored_params(run: Path, *files: str) -> int:
    """Parameters in the run's safetensors ``files`` (BatchNorm running statistics and other
    buffers not counted): what a method keeps to serve every preference."""
    from safetensors import safe_open

    buffers = ("running_mean", "running_var", "num_batches_tracked", "min_budget")
    total = 0
    for name in files:
        with safe_open(run / name, framework="pt") as f:
            total += sum(
                math.prod(f.get_slice(key).get_shape())
                for key in f.keys()  # noqa: SIM118 (a safe_open handle is not iterable)
                if not key.endswith(buffers)
            )
    return total


def build_report(run: Path, hashes: dict[str, str]) -> dict[str, Any]:
    """Score every method on one reference point; write report.json, report.md, fronts.png."""
    search = read_json(run / "report.json", "search report", f"rerun dymu search --run {run}")
    tasks = search["tasks"]
    base = search["baseline"]
    entries = _entries(run, search, hashes)
    directions, excluded = _directions(run, base["metrics"])
    base_losses = np.array(base["losses"])
    for e in entries:
        e["normalised"] = normalised_losses(
            np.array([p["losses"] for p in e["points"]]), base_losses
        )  # [P, T]
    ref = reference_point(np.concatenate([e["normalised"] for e in entries]))
    summary = {}
    for e in entries:
        prefs = [p["preference"] for p in e["points"]]
        row = {
            "label": e["label"],
            "points": len(e["points"]),
            "hypervolume": hypervolume(e["normalised"], ref),
            "uniformity": (
                uniformity(e["normalised"], np.array(prefs))
                if e["controllable"] and None not in prefs
                else None
            ),
            "delta_m": float(
                np.mean([delta_m(p["metrics"], base["metrics"], directions) for p in e["points"]])
            ),
            "flops_fraction": e["flops_fraction"],
            "params": e["params"],
            "params_stored": e.get("params_stored"),
            "train_seconds": round(e["train_seconds"], 2),
        }
        if e.get("subset"):
            row["subset"] = e["subset"]
        if e["method"] == "weighting":
            row["per_strategy"] = {
                p["label"]: {
                    "hypervolume": hypervolume(n[None], ref),
                    "delta_m": delta_m(p["metrics"], base["metrics"], directions),
                }
                for p, n in zip(e["points"], e["normalised"], strict=True)
            }
        summary[e["method"]] = row
    report = {
        "tasks": tasks,
        "reference_point": ref.tolist(),
        "objectives": "test loss / anchor's test loss, per task",
        "delta_m_excluded": excluded,
        "methods": summary,
        "comparison": _comparison(summary, search["budgets"]),
        "transfer_speed": _transfer_speed(entries),
        "points": {
            e["method"]: [
                {k: p.get(k) for k in ("label", "preference", "losses")} for p in e["points"]
            ]
            for e in entries
        },
    }
    folder = run / FOLDER
    _plot(entries, tasks, folder / "fronts.png")
    write_json(folder / "report.json", report)
    write_text(folder / "report.md", _markdown(report))
    return report


def _directions(run: Path, base_metrics: dict) -> tuple[dict, list[str]]:
    """delta_m's metric directions, from the tasks of the run's own config."""
    from dymu.config import load_config
    from dymu.data import get_builder
    from dymu.evaluate.search import delta_m_directions
    from dymu.tasks import build_task

    cfg = load_config(run / "config.yaml")
    specs = get_builder(cfg.data.name).info_for(cfg.data).select(cfg.data.tasks)
    return delta_m_directions([build_task(s) for s in specs], base_metrics)


def _comparison(summary: dict[str, Any], budgets: list[float]) -> dict[str, Any]:
    """DYMU at its largest budget against the static models and PHN-BN (the issue's goals).

    Against a stacked set trained on part of the sweep (``baselines.stacked_models``), the
    hypervolume ratio is an upper bound of the ratio against the whole sweep's models, and
    the time ratio is also given against the whole sweep's time where it follows from the
    part's (models run in turn).
    """
    dymu = summary[f"dymu@{max(budgets):g}"]
    out: dict[str, Any] = {"dymu": f"dymu@{max(budgets):g}"}
    for other in ("static", "phn_bn", "phn", "transfer"):
        if other in summary and summary[other]["hypervolume"] > 0:
            row = summary[other]
            out[other] = {
                "hv_ratio": dymu["hypervolume"] / row["hypervolume"],
                "time_ratio": dymu["train_seconds"] / max(row["train_seconds"], 1e-9),
            }
            subset = row.get("subset")
            if subset:
                sweep_s = subset["train_seconds_sweep"]
                out[other]["hv_ratio_is_upper_bound"] = True
                out[other]["time_ratio_sweep"] = (
                    None if sweep_s is None else dymu["train_seconds"] / max(sweep_s, 1e-9)
                )
    return out


def _transfer_speed(entries: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Time to 90% of the final validation HV: the transfer set against the static set
    (K independent models, same batches and steps), each against its own final HV and
    against the better of the two (METHOD.md 3's measure)."""
    from dymu.pareto.transfer import time_to_fraction

    histories = {
        e["method"]: e["log"]["history"] for e in entries if e["method"] in ("static", "transfer")
    }
    if len(histories) < 2:
        return None
    best = max(h[-1]["hv"] for h in histories.values())
    return {
        method: {
            "final_hv": history[-1]["hv"],
            "own_final": time_to_fraction(history, 0.9),
            "better_final": time_to_fraction(history, 0.9, target=best),
        }
        for method, history in histories.items()
    }


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        "# DYMU against the baselines",
        "",
        f"Tasks: {', '.join(report['tasks'])}. Objectives: {report['objectives']}; one reference "
        f"point for every hypervolume: {[round(x, 4) for x in report['reference_point']]} "
        "(1.1 x the worst normalised loss over all methods' points).",
        "",
        "| method | points | hypervolume | uniformity | delta_m % | FLOPs / anchor | params "
        "(one model) | params stored | training s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["methods"].values():
        uni = "-" if row["uniformity"] is None else f"{row['uniformity']:.3f}"
        params = "-" if row["params"] is None else f"{row['params']:,.0f}"
        stored = "-" if row.get("params_stored") is None else f"{row['params_stored']:,.0f}"
        lines.append(
            f"| {row['label']} | {row['points']} | {row['hypervolume']:.4f} | {uni} | "
            f"{row['delta_m']:+.2f} | {row['flops_fraction']:.3f} | {params} | {stored} | "
            f"{row['train_seconds']:.0f} |"
        )
    weighting = report["methods"].get("weighting")
    if weighting:
        lines += ["", "Shared model per weighting strategy (one point each):", ""]
        lines += ["| strategy | hypervolume | delta_m % |", "| --- | --- | --- |"]
        for name, s in weighting["per_strategy"].items():
            lines.append(f"| {name} | {s['hypervolume']:.4f} | {s['delta_m']:+.2f} |")
    comp = report["comparison"]
    if len(comp) > 1:
        lines += ["", f"{comp['dymu']} against:", ""]
        for other, c in comp.items():
            if other == "dymu":
                continue
            line = f"- {other}: hypervolume x{c['hv_ratio']:.3f}"
            if c.get("hv_ratio_is_upper_bound"):
                line += " (at most; these models are part of the sweep)"
            line += f", training time x{c['time_ratio']:.3f}"
            if c.get("time_ratio_sweep") is not None:
                line += f" (x{c['time_ratio_sweep']:.3f} against the whole sweep's models)"
            lines.append(line)
    speed = report.get("transfer_speed")
    if speed:
        lines += [
            "",
            "Time to 90% of the final validation hypervolume (stacked sets, same batches and "
            "steps; training time only):",
            "",
            "| set | final HV | epoch (own final) | s | epoch (better final) | s |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for method, t in speed.items():
            own, better = t["own_final"], t["better_final"]
            lines.append(
                f"| {method} | {t['final_hv']:.4f} | {own['epoch']} | {_secs(own)} | "
                f"{better['epoch']} | {_secs(better)} |"
            )
    if report["delta_m_excluded"]:
        lines += ["", f"Left out of delta_m (baseline 0): {', '.join(report['delta_m_excluded'])}."]
    lines += [
        "",
        "FLOPs: fvcore, one fused multiply-add = one FLOP, BatchNorm folded; DYMU's is the mean "
        "over many preferences at that budget. Training time: DYMU counts stages 0, 1 and 2; "
        "single-task counts stage 0. `fronts.png` shows every pair of tasks.",
        "",
    ]
    return "\n".join(lines)


def _secs(reached: dict[str, Any]) -> str:
    return "-" if reached["elapsed_s"] is None else f"{reached['elapsed_s']:.0f}"


def _plot(entries: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))][:6]
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.4 * len(pairs), 3.4), squeeze=False)
    markers = "os^vD<>ph*"
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        for k, e in enumerate(entries):
            n = e["normalised"]
            ax.scatter(n[:, i], n[:, j], s=14, marker=markers[k % len(markers)], label=e["label"])
        ax.set_xlabel(f"{tasks[i]} loss / anchor's", fontsize=8)
        ax.set_ylabel(f"{tasks[j]} loss / anchor's", fontsize=8)
    # One legend below the panels, where it hides no point.
    handles, labels = axes[0][0].get_legend_handles_labels()
    rows = math.ceil(len(labels) / 4)
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4, frameon=False)
    fig.suptitle("every method's points on the test split (lower is better)", fontsize=9)
    fig.tight_layout(rect=(0, 0.06 * rows, 1, 1))
    save_figure(fig, path)
    plt.close(fig)
