"""The joint stage alone, under several settings, judged on validation: what a setting buys
the trees tight budgets derive.

Takes a finished search (its stage-0 anchor and config), retrains only the joint stage
(METHOD.md 1.9) for each ``--set`` of overrides in a folder of its own under ``--work``,
and evaluates every stream's cheapest tree (every task on that stream's trunk, what the
tightest budget derives) on the validation split, under the private-node rule as the
search runs it. A folder whose joint weights already match the setting's config is
reused (:func:`dymu.train.joint.ensure_joint`), so a sweep can be extended run by run.

    python benchmarks/joint_sweep.py --run runs/mm_s0 --work runs/joint_sweep \
        --set "" --set joint.lr=0.002 --set joint.lr=0.003 \
        --out benchmarks/results/joint_sweep_multimnist_cpu.json

The empty setting is the run's own config. Per setting: the validation loss of every task
on every trunk's cheapest tree, the weighted loss sum_i w_i L_i per trunk (w_i = 1 / the
anchor's validation loss, :func:`~dymu.train.scales.loss_scales`) and its mean over the
trunks (what a preference that picks its trunk meets on average) and its minimum (what
the best trunk alone serves), the lower the better; and the joint stage's seconds.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

import torch

from dymu.config import load_config, to_dict
from dymu.data import get_builder
from dymu.errors import UserError
from dymu.io import write_json
from dymu.models.streams import TreeStreams
from dymu.train.joint import JOINT_JSON, JOINT_WEIGHTS, cheapest_trees, ensure_joint
from dymu.train.scales import loss_scales
from dymu.train.stage0 import ANCHOR_JSON, ANCHOR_WEIGHTS, ensure_anchor


def _slug(overrides: list[str]) -> str:
    return "_".join(o.replace("=", "-").replace(".", "_") for o in overrides) or "run_config"


def _setting(run: Path, work: Path, overrides: list[str], data_split) -> dict:
    """Train (or reuse) the joint stage under ``overrides`` and evaluate its trunks."""
    cfg = load_config(run / "config.yaml", overrides)
    folder = work / _slug(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (ANCHOR_WEIGHTS, ANCHOR_JSON, JOINT_WEIGHTS, JOINT_JSON):
        # the run's own joint stage is reused where the setting leaves it unchanged
        if (run / name).is_file() and not (folder / name).is_file():
            shutil.copy(run / name, folder / name)
    device = torch.device("cpu")
    anchor, _ = ensure_anchor(cfg, folder)
    train, val = data_split(cfg, "train"), data_split(cfg, "val")
    scales = loss_scales(anchor, val, device)  # [N] w_i
    tuned = ensure_joint(cfg, folder, anchor, train, val, scales=scales)
    streams = TreeStreams(tuned, anchor if cfg.joint.private_nodes else None)
    trees = cheapest_trees(streams, scales, val, cfg.evaluate.batch_size, device)
    trunks = {
        name: {
            "val_losses": dict(zip(anchor.task_names, t["losses"], strict=True)),
            "weighted": t["weighted"],
            "val_metrics": t["metrics"],
        }
        for name, t in trees.items()
    }
    record = json.loads((folder / JOINT_JSON).read_text())
    return {
        "overrides": overrides,
        "joint": to_dict(cfg)["joint"],
        "seconds": record.get("seconds"),
        "loss_scales": scales.tolist(),
        "trunks": trunks,
        "mean_weighted": sum(t["weighted"] for t in trunks.values()) / len(trunks),
        "best_weighted": min(t["weighted"] for t in trunks.values()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, required=True, help="a finished search's folder")
    ap.add_argument("--work", type=Path, required=True, help="one folder per setting here")
    ap.add_argument(
        "--set", action="append", default=[], help='overrides, e.g. "joint.lr=0.002" ("": as run)'
    )
    ap.add_argument("--out", type=Path, help="JSON to write")
    args = ap.parse_args(argv)
    if not (args.run / "config.yaml").is_file() or not (args.run / ANCHOR_WEIGHTS).is_file():
        print(
            f"joint_sweep: {args.run} holds no finished stage 0 (config.yaml, {ANCHOR_WEIGHTS})",
            file=sys.stderr,
        )
        return 2
    settings = [shlex.split(s) for s in (args.set or [""])]
    cache: dict = {}

    def data_split(cfg, split):
        key = (cfg.data.name, str(cfg.data.root), split)
        if key not in cache:
            cache[key] = get_builder(cfg.data.name).load(cfg.data, split)
        return cache[key]

    try:
        rows = [_setting(args.run, args.work, s, data_split) for s in settings]
    except UserError as exc:  # an override the config refuses
        print(f"joint_sweep: {exc}", file=sys.stderr)
        return 2
    names = list(rows[0]["trunks"])
    print(
        f"{'setting':<40} "
        + " ".join(f"{n + ' trunk':>22}" for n in names)
        + "  mean / best w.loss"
    )
    for r in rows:
        cells = " ".join(
            f"{'/'.join(f'{v:.4f}' for v in r['trunks'][n]['val_losses'].values()):>22}"
            for n in names
        )
        scores = f"{r['mean_weighted']:.3f} / {r['best_weighted']:.3f}"
        print(f"{' '.join(r['overrides']) or '(run config)':<40} {cells}  {scores}")
    label = {id(r): " ".join(r["overrides"]) or "(run config)" for r in rows}
    by_mean = min(rows, key=lambda r: r["mean_weighted"])
    by_best = min(rows, key=lambda r: r["best_weighted"])
    print(f"lowest mean over the trunks: {label[id(by_mean)]}; best trunk: {label[id(by_best)]}")
    if args.out:
        write_json(
            args.out,
            {
                "command": "python benchmarks/joint_sweep.py "
                + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
                "run": str(args.run),
                "split": "val",
                "settings": rows,
                "lowest_mean": by_mean["overrides"],
                "lowest_best_trunk": by_best["overrides"],
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
