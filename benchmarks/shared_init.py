"""What a cross-task edge costs with and without a shared stream initialisation.

Trains the default anchor (``configs/default.yaml``, ``stage0.epochs`` shortened to 4) twice,
with ``model.shared_init`` true and false, then runs every all-sharing tree (all tasks on
stream k's trunk) and reports each task's validation loss relative to its own stream's.
Prints and saves JSON. About 15 minutes on 2 CPU cores.

    python benchmarks/shared_init.py --out benchmarks/results/shared_init.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from dymu.config import load_config
from dymu.evaluate.search import evaluate_net
from dymu.io import write_json
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.train.stage0 import load_splits, train_stage0

ROOT = Path(__file__).resolve().parent.parent


def trunk_losses(shared: bool, epochs: int, run: Path) -> dict:
    """Relative val losses [trunk k][task j] = loss of task j on stream k's trunk / own."""
    cfg = load_config(
        str(ROOT / "configs" / "default.yaml"),
        [f"stage0.epochs={epochs}", f"model.shared_init={str(shared).lower()}"],
    )
    anchor, record = train_stage0(cfg, run)
    anchor.eval()
    _, splits = load_splits(cfg)
    n, num_layers = len(anchor.tasks), anchor.num_layers
    cpu = torch.device("cpu")

    def losses(tree: TreeSpec) -> list[float]:
        return evaluate_net(TreeNet(anchor, tree), None, splits.val, anchor.tasks, 64, cpu)[1]

    own = losses(TreeSpec.no_sharing(n, num_layers))
    rel = []
    for k in range(n):
        trunk = losses(TreeSpec.all_sharing(n, num_layers, k))
        rel.append([round(t / o, 3) for t, o in zip(trunk, own, strict=True)])
    off = [rel[k][j] for k in range(n) for j in range(n) if j != k]
    return {
        "tasks": anchor.task_names,
        "relative_val_loss": rel,
        "off_trunk_min": min(off),
        "off_trunk_max": max(off),
        "off_trunk_mean": round(sum(off) / len(off), 3),
        "anchor_val_metrics": record["metrics"]["val"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/shared_init.json")
    args = parser.parse_args()
    result: dict = {"benchmark": "shared_init", "config": "configs/default.yaml"}
    result["stage0_epochs"] = args.epochs
    with tempfile.TemporaryDirectory(prefix="dymu-bench-") as tmp:
        for shared in (True, False):
            key = "shared_init" if shared else "separate_init"
            result[key] = trunk_losses(shared, args.epochs, Path(tmp) / key)
    print(json.dumps(result, indent=2))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
