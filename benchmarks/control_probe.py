"""Why a task does or does not follow the preference at one budget: a probe of a finished run.

Controllability (``report.json``) says *whether* a task gets better as it gets more weight;
this script shows *where the lever is* at one budget: the two things that can follow a
preference there, and how hard each task pulls on the adaptation:

1. **The weights.** For the uniform preference and each task's corner (0.95 on the task,
   the rest spread evenly), the derived tree with the weight hypernet's adaptation, on the
   validation split (``--split test`` to report) and on a subset of the training split:
   every task's loss and primary metric. A task whose loss is not lowest at its own corner,
   even on the training images, has nothing to gain from the adaptation on that tree.
2. **The tree.** For each task, the tree that gives it its own node one layer lower than
   the tree derived for the uniform preference (its path leaves the shared part one layer
   earlier), if that fits the budget: every task's change in loss and primary metric at
   the uniform preference and at the task's corner. This is what a preference-dependent
   tree could buy the task at this budget.
3. **The pull.** Each task's gradient norm on the weight hypernetwork, of its scaled loss
   ``w_i L_i`` (stage 2's scales) on one training batch at the uniform preference: a task
   with a much smaller norm than the others would be drowned out in stage 2.

    python benchmarks/control_probe.py --run runs/default --budget 0.5 \
        --out benchmarks/results/control_probe_default_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dymu.data import get_builder
from dymu.data.batches import iterate
from dymu.errors import UserError
from dymu.evaluate.search import evaluate_net
from dymu.io import write_json
from dymu.search import load_run
from dymu.space.derive import check_budget
from dymu.space.graph import anchor_flops
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.train.scales import loss_scales

CORNER = 0.95
"""The weight a task's corner preference puts on it."""


def corner(n: int, k: int | None) -> np.ndarray:
    """The uniform preference (``k`` None) or task k's corner."""
    if k is None:
        return np.full(n, 1.0 / n)
    r = np.full(n, (1.0 - CORNER) / (n - 1))
    r[k] = CORNER
    return r


def split_earlier(tree: TreeSpec, k: int) -> TreeSpec | None:
    """``tree`` with task k's path on its own node one layer lower, or None.

    Let ``l`` be the last layer where task k's path runs a node another task also runs.
    The new tree runs ``(l, k)`` instead for task k, fed by the shared node below it, so k
    leaves the shared part one layer earlier and the other tasks keep their paths. None when
    k shares nothing, or when ``(l, k)`` is already used (k's own stream carries the
    shared part: splitting k off would move the others instead).
    """
    n, num_layers = tree.num_tasks, tree.num_layers
    paths = [tree.path(j) for j in range(n)]
    shared = [
        layer
        for layer in range(num_layers - 1)
        if any(paths[j][layer] == paths[k][layer] for j in range(n) if j != k)
    ]
    if not shared:
        return None
    layer = shared[-1]
    if tree.used()[layer][k]:
        return None
    rows = [list(row) for row in tree.parents]  # [L-1][N]: rows[l - 1][j] = parent of (l, j)
    rows[layer][paths[k][layer + 1]] = k  # the first node k runs alone now reads (layer, k)
    if layer >= 1:
        rows[layer - 1][k] = paths[k][layer - 1]  # (layer, k) reads the shared node below
    return TreeSpec(rows).canonical()


def measure(run, tree: TreeSpec, r: np.ndarray, budget: float, ds, device) -> dict:
    """Every task's loss and primary metric on ``ds`` for ``tree`` adapted to (r, budget)."""
    rt = torch.tensor(r, dtype=torch.float32)
    net = TreeNet(run.streams, tree).eval()
    metrics, losses = evaluate_net(
        net, run.weights(rt, budget, tree), ds, run.anchor.tasks, 64, device
    )
    return {
        "losses": dict(zip(run.anchor.task_names, losses, strict=True)),
        "metrics": {t.name: metrics[t.name][t.PRIMARY] for t in run.anchor.tasks},
    }


def gradient_norms(run, tree: TreeSpec, budget: float, batch: dict, scales) -> dict:
    """Per task, the norm of d(w_i L_i)/d(weight hypernet) at the uniform preference."""
    tasks = run.anchor.tasks
    r = torch.full((len(tasks),), 1.0 / len(tasks))
    params = [p for p in run.weights.parameters() if p.requires_grad]
    net = TreeNet(run.streams, tree).eval()
    out = net(batch["image"], run.weights(r, budget, tree))
    norms = {}
    for k, t in enumerate(tasks):
        grads = torch.autograd.grad(
            scales[k] * t.loss(out[t.name], batch[t.name]), params, retain_graph=True,
            allow_unused=True,
        )  # fmt: skip
        norms[t.name] = float(torch.sqrt(sum((g * g).sum() for g in grads if g is not None)))
    return norms


def main(argv: list[str] | None = None) -> int:
    try:
        return _probe(argv)
    except UserError as exc:  # a run that is not finished, a budget below the cheapest tree
        print(f"control_probe: {exc}", file=sys.stderr)
        return 2


def _probe(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished dymu search run")
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="the split the probe reads (default val: a probe that motivates a change is a "
        "choice, and choices are made on validation)",
    )
    parser.add_argument("--train-images", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run = load_run(args.run)
    budget = check_budget(args.budget, run.space)
    builder = get_builder(run.cfg.data.name)
    held = builder.load(run.cfg.data, args.split)  # the held-out split the probe reads
    train_all = builder.load(run.cfg.data, "train")
    every = max(1, len(train_all) // args.train_images)
    train = torch.utils.data.Subset(train_all, range(0, len(train_all), every))
    device, names, full = torch.device("cpu"), run.anchor.task_names, anchor_flops(run.space)
    n = len(names)

    def tree_for(r: np.ndarray) -> TreeSpec:
        return run.edge.tree(torch.tensor(r, dtype=torch.float32), budget, run.space)

    out = {"command": "python " + " ".join(sys.argv), "run": str(args.run), "budget": budget}
    out["split"] = args.split
    with torch.no_grad():
        out["corners"] = []
        for k in [None, *range(n)]:
            r = corner(n, k)
            tree = tree_for(r)
            out["corners"].append(
                {
                    "corner": "uniform" if k is None else names[k],
                    "preference": r.tolist(),
                    "tree": tree.hash(),
                    "flops_fraction": tree.flops(run.space) / full,
                    args.split: measure(run, tree, r, budget, held, device),
                    "train": measure(run, tree, r, budget, train, device),
                }
            )
        base = tree_for(corner(n, None))
        out["splits"] = []
        for k in range(n):
            tree = split_earlier(base, k)
            row = {"task": names[k], "tree": None if tree is None else tree.hash()}
            if tree is not None:
                row["flops_fraction"] = tree.flops(run.space) / full
                row["fits"] = row["flops_fraction"] <= budget
                for label, r in (("uniform", corner(n, None)), ("corner", corner(n, k))):
                    row[label] = {
                        "base": measure(run, base, r, budget, held, device),
                        "split": measure(run, tree, r, budget, held, device),
                    }
            out["splits"].append(row)
    scales = loss_scales(run.baseline, builder.load(run.cfg.data, "val"), device)
    batch = next(iterate(train_all, 64, shuffle=False))
    out["gradient_norms"] = gradient_norms(run, base, budget, batch, scales)
    out["seconds"] = time.perf_counter() - start
    _print(out, names)
    if args.out is not None:
        write_json(args.out, out)
    return 0


def _print(out: dict, names: list[str]) -> None:
    split = out["split"]
    print(f"budget {out['budget']}: the derived tree at each corner ({split} | train)")
    for c in out["corners"]:
        cells = "  ".join(
            f"{t} {c[split]['losses'][t]:.5f} {c[split]['metrics'][t]:.4f} | "
            f"{c['train']['losses'][t]:.5f} {c['train']['metrics'][t]:.4f}"
            for t in names
        )
        print(f"  {c['corner']:8s} {c['tree']} {c['flops_fraction']:.3f}  {cells}")
    norms = "  ".join(f"{t} {v:.3f}" for t, v in out["gradient_norms"].items())
    print(f"gradient norm of w_i L_i on the weight hypernet (uniform preference): {norms}")
    print(f"one layer more of its own for each task ({split}; change of loss, of metric)")
    for s in out["splits"]:
        if s["tree"] is None:
            print(f"  {s['task']:8s} no split (it shares nothing, or its stream carries the trunk)")
            continue
        for label in ("uniform", "corner"):
            base, split = s[label]["base"], s[label]["split"]
            cells = "  ".join(
                f"{t} {split['losses'][t] - base['losses'][t]:+.5f} "
                f"{split['metrics'][t] - base['metrics'][t]:+.4f}"
                for t in names
            )
            print(
                f"  {s['task']:8s} {s['tree']} {s['flops_fraction']:.3f} "
                f"{'fits' if s['fits'] else 'over'} at {label:7s}: {cells}"
            )


if __name__ == "__main__":
    sys.exit(main())
