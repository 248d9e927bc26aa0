"""Search quality against the baselines it must beat, on one shared reference point.

Reads a finished search's ``report.json`` and, optionally, a saved baselines report
(``dymu baselines``' ``report.json``, e.g. ``benchmarks/results/baselines_default_cpu.json``)
trained on the same stage-0 anchor, and prints and saves, per evaluated budget: mean FLOPs (of the
anchor), ``delta_m`` (plain and preference-weighted), the hypervolume of the 20 sweep trees
and its ratio to the static shared models and to PHN-BN, all hypervolumes on one reference
point (1.1 x the worst normalised loss over every set compared, the rule of
``dymu.evaluate.metrics.reference_point``), controllability on the primary metrics (the
report's) and on the test losses, the corner gains, the validation split's delta_m,
hypervolume, controllability and corner gains where the report has them (the figures
choices are made on), the report's widths record, and the issue's targets met or missed.

    python benchmarks/search_quality.py --report runs/default/report.json \
        --baselines benchmarks/results/baselines_default_cpu.json \
        --out benchmarks/results/search_quality_default_cpu.json

The two files must share the single-task baseline (the same stage-0 anchor): the script
refuses them otherwise. Without ``--baselines`` (a search on another anchor, e.g. another
``run.seed``) the hypervolume targets are reported as not measured (``met: null``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dymu.evaluate.metrics import hypervolume, normalised_losses, reference_point
from dymu.evaluate.summary import loss_controllability
from dymu.io import write_json

# The search-quality targets on the default config: budget -> (min mean FLOPs, max mean
# FLOPs, min delta_m %, (baseline, min HV ratio)).
TARGETS = {
    "1": (0.90, 1.0, -3.0, ("static", 1.0)),
    "0.75": (0.65, 0.75, -6.0, ("static", 0.95)),
    "0.5": (0.0, 0.5, -10.0, ("phn_bn", 1.2)),
}
NO_BASELINES = {"points": {}, "methods": {}}
"""What ``--baselines`` left out stands for: no set to compare the hypervolume with."""
CONTROLLED = ("0.5", "0.75")
"""Budgets where every task's controllability must be > 0."""


def _loss_controllability(search: dict, budget: float) -> dict[str, float]:
    """The report's ``controllability_loss`` at ``budget``, computed from its rows, so that
    reports written before the key existed get it too."""
    rows = [r for r in search["rows"] if r["budget"] == budget]
    losses = np.array([r["losses"] for r in rows])  # [P, N]
    prefs = np.array([r["preference"] for r in rows])  # [P, N]
    return loss_controllability(search["tasks"], losses, prefs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", required=True, help="a search's report.json")
    ap.add_argument(
        "--baselines",
        help="a baselines report.json (same anchor); without it no hypervolume is compared",
    )
    ap.add_argument("--label", default="dymu", help="name of the search in the output")
    ap.add_argument("--out", help="write the figures here as JSON")
    args = ap.parse_args(argv)
    try:
        search = json.loads(Path(args.report).read_text())
        base = json.loads(Path(args.baselines).read_text()) if args.baselines else NO_BASELINES
    except (OSError, ValueError) as exc:
        print(f"search_quality: cannot read the inputs: {exc}", file=sys.stderr)
        return 2
    single = np.array(search["baseline"]["losses"])
    if args.baselines and not np.allclose(
        base["points"]["single_task"][0]["losses"], single, rtol=1e-6
    ):
        print(
            "search_quality: the two files have different single-task baselines "
            f"({base['points']['single_task'][0]['losses']} vs {single.tolist()}); use one "
            "stage-0 anchor",
            file=sys.stderr,
        )
        return 2
    sets = {
        f"{args.label}@{b:g}": [
            {"preference": r["preference"], "losses": r["losses"]}
            for r in search["rows"]
            if r["budget"] == b
        ]
        for b in search["budgets"]
    }
    for name in ("static", "phn_bn", "phn"):
        if name in base["points"]:
            sets[name] = base["points"][name]
    for name, points in base["points"].items():  # the earlier search, for the record
        if name.startswith("dymu@"):
            sets[f"before:{name}"] = points
    norm = {
        k: normalised_losses(np.array([p["losses"] for p in v]), single) for k, v in sets.items()
    }
    ref = reference_point(np.concatenate(list(norm.values())))
    hv = {k: hypervolume(v, ref) for k, v in norm.items()}
    rows = {}
    for b in search["budgets"]:
        key = f"{b:g}"
        name = f"{args.label}@{key}"
        row = {
            "flops_mean": search["flops"][key]["mean"],
            "delta_m": search["delta_m"][key],
            "delta_m_weighted": search.get("delta_m_weighted", {}).get(key),
            "hypervolume": hv[name],
            "hv_ratio_static": hv[name] / hv["static"] if "static" in hv else None,
            "hv_ratio_phn_bn": hv[name] / hv["phn_bn"] if "phn_bn" in hv else None,
            "budget_adherence": search["budget_adherence"][key],
            "distinct_trees": search["distinct_trees"][key],
            "controllability": search["controllability"][key],
            "controllability_loss": _loss_controllability(search, b),
            "control_range": search.get("control_range", {}).get(key),
            "corner_gain": search.get("corner_gain", {}).get(key),
        }
        val = search.get("validation")
        if val is not None:  # what choices are made on (the report's own reference point)
            row["validation"] = {
                "delta_m": val["delta_m"][key],
                "hypervolume": val["hypervolume"][key],
                "controllability": val["controllability"][key],
                "controllability_loss": val["controllability_loss"][key],
                "corner_gain": val.get("corner_gain", {}).get(key),
            }
        if key in TARGETS:
            lo, hi, dm, (other, ratio) = TARGETS[key]
            got = row[f"hv_ratio_{other}"]
            row["targets"] = {
                "flops": {"want": [lo, hi], "met": lo <= row["flops_mean"] <= hi},
                "delta_m": {"want": dm, "met": row["delta_m"] >= dm},
                # None: not measured (no baselines given)
                f"hv_vs_{other}": {"want": ratio, "met": None if got is None else got >= ratio},
            }
            if key in CONTROLLED:
                scores = row["controllability"].values()
                met = bool(scores) and all(v > 0 for v in scores)
                row["targets"]["controllability"] = {"want": "> 0 for every task", "met": met}
        rows[key] = row
    out = {
        "command": "python benchmarks/search_quality.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "reference_point": ref.tolist(),
        "objectives": "test loss / single-task (stage-0) test loss, per task",
        "hypervolume": hv,
        "static_label": base["methods"].get("static", {}).get("label"),
        "widths": search.get("widths"),  # where the search has them: what they serve
        "budgets": rows,
    }
    heads = ("budget", "FLOPs", "delta_m", "weighted", "HV", "/static", "/PHN-BN")
    print(" ".join(f"{h:>8}" for h in heads), " controllability (primary metric / loss)")
    for key, row in rows.items():
        w = row["delta_m_weighted"]
        control = " ".join(
            f"{t}:{v:+.2f}/{row['controllability_loss'][t]:+.2f}"
            for t, v in row["controllability"].items()
        )
        print(
            f"{key:>8} {row['flops_mean']:8.3f} {row['delta_m']:+8.2f} "
            f"{'-' if w is None else f'{w:+.2f}':>8} {row['hypervolume']:8.2f} "
            f"{row['hv_ratio_static'] or float('nan'):8.3f} "
            f"{row['hv_ratio_phn_bn'] or float('nan'):8.3f}  {control}"
        )
    for k in ("static", "phn_bn", "phn"):
        if k in hv:
            print(f"{k}: HV {hv[k]:.2f}")
    if args.out:
        write_json(Path(args.out), out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
