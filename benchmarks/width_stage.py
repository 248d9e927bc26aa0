"""What the width stage buys narrow configurations (METHOD.md 1.11), on a finished run.

This script measures the width stage alone, on fixed configurations rather than derived
ones (``dymu search`` with ``model.widths`` trains it too): on a finished run's stage-0
anchor and joint stage it trains the width stage with ``--widths`` (``slim`` settings of
the run's config, ``--steps`` to change them) into ``--work``, then measures a fixed
family of configurations on the validation split: the cheapest tree (on the joint
stage's trunk) and the no-sharing tree, each with every node at one width of the set.
Each configuration runs on the width stage's copy and, beside it, on the run's own joint
weights sliced; full-width trees run the run's weights either way (the copy serves
narrowed contexts only). Narrowed nodes' statistics are calibrated on the training
split's first images every time (:mod:`dymu.train.calibrate`). delta_m is against the
run's single-task anchor on the same split; the static shared model of ``dymu
baselines`` (its FLOPs and delta_m, test split) is shown beside where ``--baselines``
names its results.

    python benchmarks/width_stage.py --run runs/def_s0 --work runs/def_s0_slim \\
        --out benchmarks/results/width_stage_default_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from dymu.artifacts import read_json, rerun_fix
from dymu.data import get_builder, input_size
from dymu.errors import UserError
from dymu.evaluate.search import delta_m_directions
from dymu.io import write_json
from dymu.models.slim import check_widths
from dymu.run import read_run_config
from dymu.search import tree_streams
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import anchor_flops
from dymu.space.tree import TreeSpec
from dymu.tasks.delta import delta_m
from dymu.train.calibrate import calibrated, calibration_images
from dymu.train.joint import JOINT_JSON, JOINT_WEIGHTS, load_joint
from dymu.train.loop import evaluate_model
from dymu.train.scales import loss_scales
from dymu.train.slim_stage import SLIM_JSON, ensure_slim
from dymu.train.stage0 import load_trained_anchor


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except UserError as exc:
        print(f"width_stage: {exc}", file=sys.stderr)
        return 2


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished dymu search run")
    parser.add_argument("--work", required=True, type=Path, help="where the width stage goes")
    parser.add_argument("--widths", default="0.25,0.5,0.75,1.0")
    parser.add_argument("--steps", type=int, default=None, help="slim.steps (default: run's)")
    parser.add_argument("--baselines", type=Path, default=None, help="dymu baselines JSON")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run = Path(args.run)
    base = read_run_config(run)
    if base.joint.steps == 0:
        raise UserError(f"{run} ran no joint stage, whose trunk and weights this builds on")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be >= 1, got {args.steps}")
    try:
        widths = list(check_widths(float(w) for w in args.widths.split(",")))
    except ValueError as exc:
        raise UserError(f"--widths takes comma-separated numbers: {exc}") from exc
    if widths == [1.0]:
        raise UserError("--widths must hold more than full width")
    slim = base.slim if args.steps is None else replace(base.slim, steps=args.steps)
    cfg = replace(base, model=replace(base.model, widths=widths), slim=slim)

    device = torch.device("cpu")
    builder = get_builder(cfg.data.name)
    anchor = load_trained_anchor(cfg, run)[0].eval()
    train, val = builder.load(cfg.data, "train"), builder.load(cfg.data, "val")
    scales = loss_scales(anchor, val, device)
    record = read_json(run / JOINT_JSON, "joint-stage record", rerun_fix(run))
    trunk_name = record.get("trunk", anchor.task_names[0])
    trunk = anchor.task_names.index(trunk_name)
    run_streams = tree_streams(cfg, anchor, load_joint(anchor, run / JOINT_WEIGHTS))
    args.work.mkdir(parents=True, exist_ok=True)
    with_copy = ensure_slim(cfg, args.work, run_streams, train, val, scales=scales, trunk=trunk)
    slim_seconds = time.perf_counter() - start
    weights = {"width stage": with_copy, "joint, sliced (the run's)": run_streams}

    space = anchor_space(anchor, input_size(cfg.data), widths)
    full = anchor_flops(space)
    n, num_layers = len(anchor.tasks), anchor.num_layers
    tasks, batch = anchor.tasks, cfg.evaluate.batch_size
    base_metrics, _ = evaluate_model(
        calibrated(anchor, TreeSpec.no_sharing(n, num_layers), []), val, tasks, batch, device
    )
    directions, _ = delta_m_directions(tasks, base_metrics)
    images = calibration_images(train, device)
    rows = []
    for tree_name, tree in (
        ("cheapest", TreeSpec.all_sharing(n, num_layers, trunk)),
        ("no sharing", TreeSpec.no_sharing(n, num_layers)),
    ):
        for w in widths:
            config = TreeSpec(tree.parents, [[w] * n for _ in range(num_layers)])
            row = {"tree": tree_name, "width": w, "flops_fraction": config.flops(space) / full}
            for name, streams in weights.items():
                net = calibrated(streams, config, images)
                metrics, losses = evaluate_model(net, val, tasks, batch, device)
                row[name] = {
                    "delta_m": delta_m(metrics, base_metrics, directions),
                    "metrics": {t.name: metrics[t.name][t.primary_metric] for t in tasks},
                    "losses": losses,
                }
            rows.append(row)
            cells = ", ".join(f"{k} {row[k]['delta_m']:+.2f}" for k in weights)
            print(f"{tree_name} at width {w:g} ({row['flops_fraction']:.3f}): delta_m % {cells}")
    out = {
        "command": "python benchmarks/width_stage.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "run": str(run),
        "split": "val",
        "widths": widths,
        "trunk": trunk_name,
        "slim_steps": cfg.slim.steps,
        "slim_seconds": slim_seconds,
        "slim_record": read_json(
            args.work / SLIM_JSON, "width-stage record", f"remove {args.work} and run again"
        ).get("val_losses"),
        "configurations": rows,
    }
    if args.baselines is not None:
        fix = "give the JSON dymu baselines wrote"
        out["static"] = _static(read_json(args.baselines, "baselines report", fix))
    out["seconds"] = time.perf_counter() - start
    if args.out is not None:
        write_json(args.out, out)
    return 0


def _static(baselines: dict) -> dict:
    """The static shared model's FLOPs fraction and delta_m from ``dymu baselines``."""
    static = baselines.get("methods", {}).get("static", {})
    return {k: static[k] for k in ("flops_fraction", "delta_m") if k in static}


if __name__ == "__main__":
    sys.exit(main())
