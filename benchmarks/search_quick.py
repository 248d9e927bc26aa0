"""End-to-end wall time of ``dymu search -c configs/quick.yaml`` (goal: under 5 minutes on
2 CPU cores), or of another config (``--config``, ``--goal-s``), from an empty run directory
and an empty dataset cache.

Runs the command as a new user would, in a subprocess, times it and each stage's own record
(``anchor.json``, ``edge_hnet.json``, ``weight_hnet.json``), and prints and saves JSON with
the headline figures of the run's ``report.json``.

    python benchmarks/search_quick.py --out benchmarks/results/search_quick.json
    python benchmarks/search_quick.py --config configs/default.yaml --goal-s 3411 \
        --out benchmarks/results/search_default_time_cpu.json   # 1.5 x 2274 s
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dymu.io import write_json

ROOT = Path(__file__).resolve().parent.parent
GOAL_S = 300


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def one_hot_trees(run: Path, budgets: list[float]) -> dict[str, int]:
    """Per budget, how many distinct trees the N one-hot preferences derive (goal: the
    trees follow the preference, so more than one)."""
    from dymu.search import load_run

    trained = load_run(run)
    n = len(trained.anchor.tasks)
    out = {}
    for b in budgets:
        trees = set()
        for j in range(n):
            r = torch.zeros(n)
            r[j] = 1.0
            trees.add(trained.edge.tree(r, b, trained.space).hash())
        out[f"{b:g}"] = len(trees)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quick.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/search_quick.json")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="copy the run here afterwards")
    parser.add_argument("--goal-s", type=float, default=GOAL_S, help="the goal in seconds")
    args = parser.parse_args()
    if args.keep is not None and args.keep.exists():
        parser.error(f"--keep {args.keep} already exists")
    with tempfile.TemporaryDirectory(prefix="dymu-bench-") as tmp:
        run = Path(tmp) / "run"
        env = {**os.environ, "DYMU_CACHE": str(Path(tmp) / "cache")}  # data generated too
        cmd = [sys.executable, "-m", "dymu", "search", "-c", str(args.config)]
        cmd += ["--run", str(run)]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            print(f"dymu search failed with exit status {proc.returncode}", file=sys.stderr)
            return 1
        report = _read(run / "report.json")
        stages = {
            "stage0_s": _read(run / "anchor.json").get("train", {}).get("seconds"),
            "joint_s": _read(run / "joint.json").get("seconds"),
            "stage1_s": _read(run / "edge_hnet.json").get("seconds"),
            "stage2_s": _read(run / "weight_hnet.json").get("seconds"),
        }
        onehot = one_hot_trees(run, report.get("budgets", []))
        if args.keep is not None:
            shutil.copytree(run, args.keep)
    result = {
        "benchmark": f"search_{args.config.stem}",
        "command": f"dymu search -c configs/{args.config.name} --run RUN (empty run dir and cache)",
        "wall_s": round(wall, 1),
        "goal_s": args.goal_s,
        "meets_goal": wall < args.goal_s,
        **stages,
        "report": {
            key: report.get(key)
            for key in ("budgets", "budget_adherence", "hypervolume", "delta_m", "controllability")
        },
        "flops_mean": {b: s["mean"] for b, s in report.get("flops", {}).items()},
        "one_hot_distinct_trees": onehot,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
