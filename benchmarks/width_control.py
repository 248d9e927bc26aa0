"""Width as the preference's capacity lever (METHOD.md 1.11), on a run and its width stage.

Stages 1 and 2 do not predict widths yet. This script measures the control widths give
at any budget, with the rule ``dymu search`` applies below the cheapest tree
(:class:`~dymu.hypernet.derivation.Derivation`), here at every budget asked: for each
(preference, budget) the run's edge hypernetwork gives parent probabilities, and
:func:`preference_omega` a width distribution in which each step wider is worth
``--strength`` times the summed weight of the tasks a node serves;
:func:`derive_configuration` repairs the argmax to the budget on both axes, spends what
is left and, under ``stage1.trunk: preference``, moves shared nodes to the preferred
task's stream as the run's trees do. Each configuration runs on the run's weights with
the width stage's copy for its narrowed contexts (``--slim``, from
``benchmarks/width_stage.py``), its statistics calibrated on the training split's first
images, without any weight adaptation. Beside it, the run's own full-width tree for the
same (preference, budget) on the run's weights, also without adaptation, so the two
differ by the width axis alone.

Per budget and split: each task's primary metric at the uniform preference and at every
task's corner (0.9 on it), the corner gap (own corner minus the other corners' mean,
signed so that positive is better), FLOPs fractions, and Spearman(r_i, metric_i) over a
sweep of ``--preferences`` preferences. ``--start anchor`` repairs from the anchor tree's
parents instead of the edge hypernetwork's: every task on its own stream, so that the
budget is met by narrowing first and merging only where narrowing cannot fit.

    python benchmarks/width_control.py --run runs/mm --slim runs/mm_slim \\
        --out benchmarks/results/width_control_multimnist_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from dymu.artifacts import read_json
from dymu.data import get_builder, input_size
from dymu.errors import UserError
from dymu.evaluate.metrics import preference_sweep
from dymu.evaluate.search import corner_preferences
from dymu.io import write_json
from dymu.models.streams import TreeStreams
from dymu.search import load_run
from dymu.space.anchor_space import anchor_space
from dymu.space.derive import argmax_tree
from dymu.space.derive_widths import derive_configuration, preference_omega
from dymu.space.graph import anchor_flops, min_flops
from dymu.train.calibrate import calibrated, calibration_images
from dymu.train.loop import evaluate_model
from dymu.train.slim_stage import SLIM_JSON, SLIM_WEIGHTS, load_slim


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except UserError as exc:
        print(f"width_control: {exc}", file=sys.stderr)
        return 2


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished dymu search run")
    parser.add_argument("--slim", required=True, type=Path, help="width_stage.py's --work")
    parser.add_argument("--budgets", default="0.3,0.5,0.75")
    parser.add_argument("--strength", type=float, default=10.0)
    parser.add_argument(
        "--start",
        choices=("edge", "anchor"),
        default="edge",
        help="parents to repair from: the edge hypernetwork's for (r, b), or the anchor "
        "tree's (every task on its own stream, merged only where narrowing cannot fit)",
    )
    parser.add_argument("--preferences", type=int, default=11)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run = Path(args.run)
    fix = "run benchmarks/width_stage.py with --work there first"
    record = read_json(args.slim / SLIM_JSON, "width-stage record", fix)
    widths = record.get("spec", {}).get("widths")
    if not widths:
        raise UserError(f"{args.slim} holds no width stage")
    try:
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError as exc:
        raise UserError(f"--budgets takes comma-separated numbers: {exc}") from exc

    device = torch.device("cpu")
    trained = load_run(run)  # the run's config, streams, edge hypernetwork and tree space
    cfg, anchor, trees_only = trained.cfg, trained.baseline, trained.streams
    edge, plain = trained.edge, trained.space
    builder = get_builder(cfg.data.name)
    narrow = load_slim(trees_only.tuned, args.slim / SLIM_WEIGHTS)
    with_widths = TreeStreams(trees_only.tuned, trees_only.stage0, narrow)
    space = anchor_space(anchor, input_size(cfg.data), widths)
    full = anchor_flops(space)
    tasks, names, n = anchor.tasks, anchor.task_names, len(anchor.tasks)
    train = builder.load(cfg.data, "train")
    images = calibration_images(train, device)
    splits = {s: builder.load(cfg.data, s) for s in ("val", "test")}
    batch = cfg.evaluate.batch_size
    corners = corner_preferences(n)  # [N + 1, N]: uniform, then each task's corner
    sweep = preference_sweep(n, args.preferences, cfg.evaluate.seed)
    signs = {t.name: 1.0 if t.metric_directions[t.primary_metric] else -1.0 for t in tasks}

    def measure(streams, config) -> dict[str, dict[str, float]]:
        net = calibrated(streams, config, images)
        out = {}
        for split, ds in splits.items():
            metrics, _ = evaluate_model(net, ds, tasks, batch, device)
            out[split] = {t.name: metrics[t.name][t.primary_metric] for t in tasks}
        return out

    result = {}
    for b in budgets:
        per = {"widths": {}, "trees only": {}}
        for k, r in enumerate([*corners, *sweep]):
            rt = torch.tensor(r, dtype=torch.float32)
            alpha = edge.alpha(rt, b).detach().cpu().double().numpy()
            if args.start == "anchor":  # [L-1, N, N]: almost surely each node's own stream
                alpha = np.broadcast_to(np.eye(n) * 0.98 + 0.01, alpha.shape).copy()
            omega = preference_omega(argmax_tree(alpha), r, len(widths), args.strength)
            trunk = edge.trunk_preference(rt)  # stage1.trunk: preference, as for trees
            config = derive_configuration(alpha, omega, space, b, preference=trunk)
            key = "uniform" if k == 0 else names[k - 1] if k <= n else f"sweep {k - n - 1}"
            per["widths"][key] = {
                "preference": [float(x) for x in r],
                "config": config.to_json(),
                "flops_fraction": config.flops(space) / full,
                **measure(with_widths, config),
            }
            if b * full >= min_flops(plain):
                tree = edge.tree(rt, b, plain)
                per["trees only"][key] = {
                    "preference": [float(x) for x in r],
                    "config": tree.to_json(),
                    "flops_fraction": tree.flops(plain) / full,
                    **measure(trees_only, tree),
                }
            print(f"budget {b:g} {key}: {per['widths'][key]['val']}", flush=True)
        result[f"{b:g}"] = {k: _summary(v, names, n, signs) for k, v in per.items() if v}
    out = {
        "command": "python benchmarks/width_control.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "run": str(run),
        "slim": str(args.slim),
        "widths": widths,
        "strength": args.strength,
        "start": args.start,
        "adaptation": "none (no weight hypernetwork on either side)",
        "budgets": result,
        "seconds": time.perf_counter() - start,
    }
    if args.out is not None:
        write_json(args.out, out)
    return 0


def _summary(rows: dict, names: list[str], n: int, signs: dict[str, float]) -> dict:
    """Corner gaps and sweep Spearmans per split, beside the rows themselves."""
    out = {"rows": rows}
    for split in ("val", "test"):
        gaps, spearman = {}, {}
        for j, t in enumerate(names):
            own = rows[t][split][t]
            others = [rows[names[k]][split][t] for k in range(n) if k != j]
            gaps[t] = signs[t] * (own - float(np.mean(others)))
            sweep = [v for k, v in rows.items() if k.startswith("sweep")]
            weights = [v["preference"][j] for v in sweep]
            values = [signs[t] * v[split][t] for v in sweep]
            rho = float(spearmanr(weights, values).statistic) if len(sweep) > 2 else float("nan")
            spearman[t] = rho if np.isfinite(rho) else None  # constant metrics: undefined
        out[split] = {"corner_gap": gaps, "spearman": spearman}
    fractions = [v["flops_fraction"] for v in rows.values()]
    out["flops_fraction"] = {"min": min(fractions), "mean": float(np.mean(fractions))}
    out["configurations"] = len({v["config"]["hash"] for v in rows.values()})
    return out


if __name__ == "__main__":
    sys.exit(main())
