"""Preference control as a user feels it, over seeds: the targets of the preference issue.

Reads finished searches (one per ``run.seed``, same config) and, optionally, each run's
``dymu baselines`` report, and prints and saves per budget and seed: Spearman
controllability on the primary metrics, the number of distinct trees over the 20 sweep
preferences, every task's corner gain (its metric at its own corner, 0.9 on it, minus at
the uniform preference; its loss lowered there; its metric at its own corner against the
other tasks' corners), delta_m, and the hypervolume against the static shared models and
PHN-BN on the baselines report's shared reference point; then the spread of the corner
gains over the seeds and each target met or missed.

    python benchmarks/preference_control.py --kind two_task --run runs/mm_s0 --run runs/mm_s1 \
        --against runs/mm_other --out benchmarks/results/preference_control_multimnist_cpu.json

``--kind two_task`` checks the MultiMNIST-family targets, ``--kind default`` those of the
default config. A run's ``baselines/report.json`` is read when it exists.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dymu.io import write_json

TWO_TASK = {
    "spearman": 0.6,  # every evaluated budget below 1, every task
    "trees": 2,  # distinct trees over the sweep, every evaluated budget below 1
    "vs_others": 1.5,  # points, at the cheapest budget and 0.75
}
DEFAULT = {
    "trees": 3,  # at 0.5 and 0.75
    "delta_m": {"0.5": -4.0, "0.75": -4.0, "1": -0.5},
}


def _run(run: Path) -> dict:
    """The figures of one run, per budget."""
    report = json.loads((run / "report.json").read_text())
    seed = None
    cfg = run / "config.yaml"
    if cfg.is_file():
        import yaml

        seed = yaml.safe_load(cfg.read_text())["run"]["seed"]
    base_path = run / "baselines" / "report.json"
    methods = json.loads(base_path.read_text())["methods"] if base_path.is_file() else {}
    budgets = {}
    for b in report["budgets"]:
        k = f"{b:g}"
        row = {
            "budget": b,
            "flops_mean": report["flops"][k]["mean"],
            "delta_m": report["delta_m"][k],
            "distinct_trees": report["distinct_trees"][k],
            "spearman": report["controllability"][k],
            "spearman_loss": report["controllability_loss"][k],
            "control_range": report.get("control_range", {}).get(k),
            "corner_gain": report["corner_gain"][k],
            "hypervolume": report["hypervolume"][k],
        }
        mine = methods.get(f"dymu@{k}")
        if mine is not None:
            row["hv_shared_reference"] = {
                "dymu": mine["hypervolume"],
                **{m: methods[m]["hypervolume"] for m in ("static", "phn_bn") if m in methods},
            }
            row["baseline_labels"] = {
                m: methods[m]["label"] for m in ("static", "phn_bn") if m in methods
            }
            row["baseline_delta_m"] = {
                m: methods[m]["delta_m"] for m in ("static", "phn_bn") if m in methods
            }
        budgets[k] = row
    out = {
        "run": str(run),
        "seed": seed,
        "wall_s": _wall_s(run),
        "min_flops": report["min_flops_fraction"],
        "budgets": budgets,
    }
    static = run / "baselines" / "static.json"
    if static.is_file():
        first = next(iter(budgets.values()))["corner_gain"]["tasks"]
        out["static_span"] = _static_span(json.loads(static.read_text())["points"], first)
    return out


def _static_span(points: list[dict], gains: dict) -> dict:
    """Per task, the static shared models' own lever: the task's metric under the model
    trained with the most weight on it minus under the one with the least (test split).
    What per-preference training buys a task on this data, beside DYMU's corner gaps."""
    out = {}
    for k, (task, gain) in enumerate(gains.items()):
        metric = gain["metric"]
        hi = max(points, key=lambda p: p["preference"][k])
        lo = min(points, key=lambda p: p["preference"][k])
        top, low = hi["metrics"][task][metric], lo["metrics"][task][metric]
        out[task] = {
            "metric": metric,
            "most_weight": hi["preference"][k],
            "least_weight": lo["preference"][k],
            "at_most": top,
            "at_least": low,
            "gap": (top - low) if gain["higher_is_better"] else (low - top),
        }
    return out


def _wall_s(run: Path) -> float | None:
    """Seconds from the run's start (``env.json``'s ``created``) to its report: the whole
    search where it ran in one go; None where its stage-0 anchor is older than its start
    (reused, so not a whole search) or unknown (a run kept as its report and config)."""
    from datetime import datetime

    env = run / "env.json"
    if not env.is_file() or not (run / "anchor.json").is_file():
        return None
    start = datetime.fromisoformat(json.loads(env.read_text())["created"]).timestamp()
    if (run / "anchor.json").stat().st_mtime < start:
        return None
    return (run / "report.json").stat().st_mtime - start


def _targets(kind: str, runs: list[dict]) -> dict:
    """Each target, per seed: wanted, got, met."""
    out = {}
    for r in runs:
        seed, rows = f"seed {r['seed']}", r["budgets"]
        low = min(rows, key=float)
        checks = {}
        if kind == "two_task":
            for k, row in rows.items():
                if float(k) >= 1:
                    continue
                worst = min(row["spearman"].values())
                checks[f"{k} spearman"] = {"want": TWO_TASK["spearman"], "got": worst}
                checks[f"{k} trees"] = {"want": TWO_TASK["trees"], "got": row["distinct_trees"]}
            for k in dict.fromkeys([low, "0.75"]):
                if k in rows:
                    gains = rows[k]["corner_gain"]["tasks"].values()
                    worst = min(g["vs_others"] for g in gains)
                    checks[f"{k} own corner vs other"] = {
                        "want": TWO_TASK["vs_others"],
                        "got": worst,
                    }
            hv = rows.get("0.75", {}).get("hv_shared_reference") or {}
            for m in ("static", "phn_bn"):
                if m in hv:
                    checks[f"0.75 HV vs {m}"] = {"want": hv[m], "got": hv["dymu"]}
                else:  # no `dymu baselines` report in the run
                    checks[f"0.75 HV vs {m}"] = {"want": "a baselines run", "got": None}
        else:
            for k in ("0.5", "0.75"):
                if k in rows:
                    checks[f"{k} trees"] = {
                        "want": DEFAULT["trees"],
                        "got": rows[k]["distinct_trees"],
                    }
                    gains = rows[k]["corner_gain"]["tasks"].values()
                    checks[f"{k} corner loss gain"] = {
                        "want": "> 0",
                        "got": min(g["loss_gain"] for g in gains),
                    }
            for k, want in DEFAULT["delta_m"].items():
                if k in rows:
                    checks[f"{k} delta_m"] = {"want": want, "got": rows[k]["delta_m"]}
        for c in checks.values():
            if c["got"] is None:
                c["met"] = None  # not measured
            else:
                c["met"] = c["got"] > 0 if c["want"] == "> 0" else c["got"] >= c["want"]
        out[seed] = checks
    return out


def _spread(runs: list[dict]) -> dict:
    """Per budget and task: the corner gains' mean, standard deviation and range over seeds."""
    out = {}
    for k in runs[0]["budgets"]:
        if not all(k in r["budgets"] for r in runs):
            continue
        per_task = {}
        for t in runs[0]["budgets"][k]["corner_gain"]["tasks"]:
            entry = {}
            for key in ("gain", "loss_gain", "vs_others"):
                values = np.array([r["budgets"][k]["corner_gain"]["tasks"][t][key] for r in runs])
                entry[key] = {
                    "mean": float(values.mean()),
                    "std": float(values.std(ddof=1)) if len(values) > 1 else None,
                    "min": float(values.min()),
                    "max": float(values.max()),
                }
            per_task[t] = entry
        out[k] = per_task
    return out


def _flat(tree: dict, prefix: str = "") -> dict:
    """A nested config as ``{"section.key": value}``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _setting(run: Path, first: Path) -> dict:
    """The config keys where ``run`` differs from ``first``, the seed and data location
    aside: what a choice between them is a choice of. A key a run's version did not have
    takes today's built-in default, which keeps what that version did."""
    import dataclasses

    import yaml

    from dymu.config import Config

    defaults = _flat(dataclasses.asdict(Config()))
    mine, theirs = (
        {**defaults, **_flat(yaml.safe_load((p / "config.yaml").read_text()))} for p in (run, first)
    )
    skip = {"run.seed", "data.root"}
    return {k: mine[k] for k in sorted(mine) if k not in skip and mine[k] != theirs.get(k)}


def _choice(run: Path, others: list[Path]) -> dict:
    """The validation split's figures of runs of one anchor side by side, per budget: what a
    choice between their settings is made on. Hypervolumes on one reference point (1.1 x
    the worst normalised validation loss over all the runs' sweeps); each run's ``setting``
    is how its config differs from the first run's. The ``test_*`` figures are there to
    report what the choice gave, not to make it."""
    from dymu.evaluate.metrics import hypervolume, normalised_losses, reference_point

    paths = [run, *others]
    full = {str(p): json.loads((p / "report.json").read_text()) for p in paths}
    reports = {name: report["validation"] for name, report in full.items()}
    bases = [np.array(v["baseline"]["losses"]) for v in reports.values()]
    for p, base in zip(paths[1:], bases[1:], strict=True):
        if not np.allclose(bases[0], base, rtol=1e-6):
            raise ValueError(f"{run} and {p} have different single-task anchors")
    settings = {str(p): _setting(p, run) for p in paths}
    out = {}
    for key in reports[str(run)]["delta_m"]:
        norm = {}
        for name, v in reports.items():
            rows = [r for r in v["rows"] if f"{r['budget']:g}" == key]
            norm[name] = normalised_losses(np.array([r["losses"] for r in rows]), bases[0])
        ref = reference_point(np.concatenate(list(norm.values())))
        out[key] = {
            name: {
                "setting": settings[name],
                "hypervolume": hypervolume(norm[name], ref),
                "delta_m": v["delta_m"][key],
                # the test split's figures, reported beside, never chosen on
                "test_delta_m": full[name]["delta_m"][key],
                "test_spearman": full[name]["controllability"][key],
                "test_vs_others": _vs_others(full[name], key),
                "spearman": v["controllability"][key],
                "vs_others": _vs_others(v, key),
                "distinct_trees": len({r["tree"] for r in v["rows"] if f"{r['budget']:g}" == key}),
            }
            for name, v in reports.items()
        }
        out[key]["reference_point"] = ref.tolist()
    return out


def _vs_others(report: dict, key: str) -> dict | None:
    """Per task, its metric at its own corner minus at the other corners (None in a report
    written before corner gains existed)."""
    if "corner_gain" not in report:
        return None
    return {t: g["vs_others"] for t, g in report["corner_gain"][key]["tasks"].items()}


def _want(check: dict) -> str:
    want = check["want"]
    return want if isinstance(want, str) else f">= {want:.3g}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", required=True, help="a finished search (repeat)")
    ap.add_argument("--kind", choices=("two_task", "default"), required=True)
    ap.add_argument(
        "--against",
        action="append",
        default=[],
        help="another run of the first run's anchor (repeat): the validation figures side by "
        "side (the split a choice between their settings is made on)",
    )
    ap.add_argument("--out", help="write the figures here as JSON")
    args = ap.parse_args(argv)
    try:
        runs = [_run(Path(r)) for r in args.run]
    except (OSError, ValueError, KeyError) as exc:
        print(f"preference_control: cannot read a run: {exc}", file=sys.stderr)
        return 2
    out = {
        "command": "python benchmarks/preference_control.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "kind": args.kind,
        "runs": runs,
        "corner_gain_over_seeds": _spread(runs),
        "targets": _targets(args.kind, runs),
    }
    if args.against:
        try:
            out["validation_choice"] = _choice(Path(args.run[0]), [Path(a) for a in args.against])
        except (OSError, ValueError, KeyError) as exc:
            print(f"preference_control: cannot compare with {args.against}: {exc}", file=sys.stderr)
            return 2
        for key, row in out["validation_choice"].items():
            for name, v in row.items():
                if name != "reference_point":
                    print(
                        f"validation, budget {key}, {name} {v['setting']}: HV "
                        f"{v['hypervolume']:.4f}, delta_m "
                        f"{v['delta_m']:+.2f}, trees {v['distinct_trees']}, Spearman "
                        f"{v['spearman']}, own vs other corner {v['vs_others']}"
                    )
    for r in runs:
        took = "" if r["wall_s"] is None else f", {r['wall_s'] / 60:.1f} min"
        print(f"{r['run']} (seed {r['seed']}{took}):")
        for k, row in r["budgets"].items():
            gains = ", ".join(
                f"{t} {g['gain']:+.2f} (vs others {g['vs_others']:+.2f}, "
                f"loss {g['loss_gain']:+.4f})"
                for t, g in row["corner_gain"]["tasks"].items()
            )
            spear = ", ".join(f"{t} {v:+.2f}" for t, v in row["spearman"].items())
            print(
                f"  budget {k}: trees {row['distinct_trees']}, delta_m {row['delta_m']:+.2f}, "
                f"Spearman {spear}; corner gain {gains}"
            )
        for t, v in r.get("static_span", {}).items():
            print(
                f"  static models, {t}: {v['at_most']:.2f} at weight {v['most_weight']:.2f}, "
                f"{v['at_least']:.2f} at {v['least_weight']:.2f} ({v['gap']:+.2f})"
            )
    for seed, checks in out["targets"].items():
        missed = [
            f"{name} (got {c['got']:.3g}, want {_want(c)})"
            for name, c in checks.items()
            if c["met"] is False
        ]
        unmeasured = [name for name, c in checks.items() if c["met"] is None]
        met = sum(c["met"] is True for c in checks.values())
        tail = f"; missed: {'; '.join(missed)}" if missed else ""
        tail += f"; not measured: {', '.join(unmeasured)}" if unmeasured else ""
        print(f"{seed}: {met}/{len(checks)} targets met{tail}")
    if args.out:
        write_json(Path(args.out), out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
