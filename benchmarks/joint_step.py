"""The joint stage's step with and without shared nodes: what running the sandwich's
common trunk once saves.

Builds the configured anchor (random weights: the time of a step does not depend on them),
the joint stage's step exactly as ``dymu search`` runs it (:class:`dymu.train.joint.JointStep`:
the sandwich of a cheapest tree and ``joint.random_trees`` random trees on one batch, label
and distillation losses, backward, optimizer step), and times blocks of steps in turn with
``share`` on (the default: a node or head two trees share runs once) and off (each tree
on its own), on the same batches. Prints and saves the median milliseconds per step of
each and their ratio.

    python benchmarks/joint_step.py -c configs/multimnist.yaml data.root=../shared/data \\
        --out benchmarks/results/joint_step_multimnist_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from dymu.config import load_config, to_dict
from dymu.data.batches import endless
from dymu.errors import UserError
from dymu.io import write_json
from dymu.models.anchor import build_anchor
from dymu.train.engine import frozen
from dymu.train.joint import JointStep
from dymu.train.stage0 import load_splits


def _step(cfg, anchor, train) -> JointStep:
    """The joint stage's step as ``train_joint`` builds it (every trunk drawn at random
    when ``joint.trunk`` is random, else the first stream's: timing does not depend on it)."""
    js = cfg.joint
    cpu = torch.device("cpu")
    trunk = None if js.trunk == "random" else 0
    step = JointStep.build(js, frozen(anchor, cpu), torch.ones(len(anchor.tasks)), trunk, 0, cpu)
    step.batches = endless(train, js.batch_size, seed=0)
    return step


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--config", help="a config file (default: the built-in default)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed block")
    ap.add_argument("--blocks", type=int, default=5, help="timed blocks per mode")
    ap.add_argument("--out", type=Path, help="JSON to write")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        specs, splits = load_splits(cfg)
    except UserError as exc:
        print(f"joint_step: {exc}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    anchor = build_anchor(cfg.model, specs, seed=cfg.run.seed).eval()
    step = _step(cfg, anchor, splits.train)
    for i in range(3):  # warm-up
        step(i, log=False)
    times: dict[str, list[float]] = {"shared": [], "separate": []}
    for _ in range(args.blocks):
        for mode in times:
            step.share = mode == "shared"
            start = time.perf_counter()
            for i in range(args.steps):
                step(i, log=False)
            times[mode].append(1e3 * (time.perf_counter() - start) / args.steps)
    ms = {mode: statistics.median(v) for mode, v in times.items()}
    out = {
        "command": "python benchmarks/joint_step.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": args.config or "built-in default",
        "joint": to_dict(cfg)["joint"],
        "batch_size": cfg.joint.batch_size,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "ms_per_step_blocks": times,
        "ms_per_step": ms,
        "speedup": ms["separate"] / ms["shared"],
    }
    print(
        f"joint step, {cfg.joint.batch_size} images: shared nodes {ms['shared']:.1f} ms, "
        f"each tree on its own {ms['separate']:.1f} ms (x{out['speedup']:.2f})"
    )
    if args.out:
        write_json(args.out, out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
