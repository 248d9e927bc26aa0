"""How far a weight adaptation could move each task within one tree: a probe of a finished run.

The corner gap a user feels (a task's metric at its own corner minus at another task's
corner) comes from two levers: the tree each preference gets and the weights adapted to it.
This script sizes the second one's ceiling. For each tree the run derives at a task's
corner (``--budget``), it trains a fresh adaptation of the run's kind (stage 2's BatchNorm
offsets and adapters, ``stage2.adapter_rank`` / ``task_rank``) for that one tree at *one
fixed* corner preference, on the training split, with stage 2's steps, batch size,
learning rate and loss scales, and measures every task on the validation split. Per tree,
each task's metric with the adaptation trained for its own corner minus with the ones
trained for the other tasks' corners (their mean; signed so that positive is better) is
what the adaptation could buy on that tree if the hypernetwork fitted every corner as well
as one trained for that corner alone; the run's own weight hypernetwork at the same
corners is shown beside. ``corner_gap`` runs each corner on its own tree, as a user gets
it: the gap the issue's target reads, under the adaptation trained for each corner and
under the hypernetwork.

    python benchmarks/adaptation_ceiling.py --run runs/mf_s0_j45 --budget 0.75 \
        --out benchmarks/results/adaptation_ceiling_multifashion_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dymu.data import get_builder
from dymu.data.batches import check_flips, endless, random_hflip
from dymu.errors import UserError
from dymu.evaluate.search import evaluate_net
from dymu.hypernet.weight import build_weight_hypernet
from dymu.io import write_json
from dymu.losses import task_loss
from dymu.search import load_run
from dymu.space.derive import check_budget
from dymu.space.treenet import TreeNet
from dymu.train.engine import frozen
from dymu.train.scales import loss_scales

CORNER = 0.9
"""The weight a task's corner preference puts on it (the issue's corner)."""


def corner(n: int, k: int) -> np.ndarray:
    """Task k's corner: ``CORNER`` on it, the rest spread evenly."""
    r = np.full(n, (1.0 - CORNER) / (n - 1))
    r[k] = CORNER
    return r


def measure(run, tree, offsets, ds, device) -> dict[str, float]:
    """Every task's primary metric on ``ds`` for ``tree`` under ``offsets``."""
    net = TreeNet(run.streams, tree).eval()
    metrics, _ = evaluate_net(net, offsets, ds, run.anchor.tasks, 256, device)
    return {t.name: float(metrics[t.name][t.PRIMARY]) for t in run.anchor.tasks}


def fit_corner(run, tree, r: np.ndarray, budget: float, train, scales, seed: int, device):
    """A fresh adaptation of the run's kind trained for ``tree`` at the fixed preference ``r``
    (stage 2's steps, batch, optimizer and schedule; no preference drawn, and the loss
    weighted by r itself, without stage 2's task floor, so that it pulls towards the corner
    as hard as the corner asks): its offsets for (r, budget)."""
    s2, tasks = run.cfg.stage2, run.anchor.tasks
    torch.manual_seed(seed)
    hyper = build_weight_hypernet(len(tasks), run.anchor.streams, s2.adapter_rank, s2.task_rank)
    opt = torch.optim.Adam(hyper.parameters(), lr=s2.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s2.lr_every, gamma=s2.lr_decay)
    net = TreeNet(run.streams, tree)
    rt = torch.tensor(r, dtype=torch.float32)
    flips = torch.Generator().manual_seed(seed)
    batches = endless(train, s2.batch_size, seed)  # as stage 2 draws its batches
    for _ in tqdm(range(s2.steps), desc=f"adaptation at r={np.round(r, 2).tolist()}", leave=False):
        batch = next(batches)
        if s2.hflip:
            batch = random_hflip(batch, tasks, flips)
        out = net(batch["image"], hyper(rt, budget, tree))
        losses = torch.stack([t.loss(out[t.name], batch[t.name]) for t in tasks])
        loss = task_loss(losses, rt, scales)
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:  # else every node of the tree is private: nothing to adapt
            loss.backward()
            opt.step()
        sched.step()
    with torch.no_grad():
        return hyper(rt, budget, tree)


def main(argv: list[str] | None = None) -> int:
    try:
        return _probe(argv)
    except UserError as exc:  # a run that is not finished, a budget below the cheapest tree
        print(f"adaptation_ceiling: {exc}", file=sys.stderr)
        return 2


def _probe(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished dymu search run")
    parser.add_argument("--budget", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0, help="the fresh adaptations' seed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    run = load_run(args.run)
    budget = check_budget(args.budget, run.space)
    builder = get_builder(run.cfg.data.name)
    train = builder.load(run.cfg.data, "train")
    val = builder.load(run.cfg.data, "val")
    check_flips(train.info, {"stage2.hflip": run.cfg.stage2.hflip})
    device, names = torch.device("cpu"), run.anchor.task_names
    n = len(names)
    # +1 where the primary metric is better higher (accuracy), -1 where lower (an error)
    signs = {t.name: 1.0 if t.metric_directions[t.PRIMARY] else -1.0 for t in run.anchor.tasks}
    for m in run.streams.modules():
        frozen(m, device)
    scales = loss_scales(run.baseline, val, device)  # [N] w_i, as stage 2's
    corners = [corner(n, k) for k in range(n)]
    trees, at_corner = {}, {}
    for k, r in enumerate(corners):  # the trees the run derives at the corners, each once
        tree = run.edge.tree(torch.tensor(r, dtype=torch.float32), budget, run.space)
        trees.setdefault(tree.hash(), tree)
        at_corner[names[k]] = tree.hash()
    out = {
        "command": "python benchmarks/adaptation_ceiling.py "
        + " ".join(sys.argv[1:] if argv is None else argv)
    }
    out.update(run=str(args.run), budget=budget, corner=CORNER, split="val")
    out.update(tree_at_corner=at_corner, trees=[])
    for h, tree in trees.items():
        row = {"tree": h, "trained_for_corner": {}, "hypernet_at_corner": {}}
        for k, r in enumerate(corners):
            offsets = fit_corner(run, tree, r, budget, train, scales, args.seed, device)
            with torch.no_grad():
                row["trained_for_corner"][names[k]] = measure(run, tree, offsets, val, device)
                rt = torch.tensor(r, dtype=torch.float32)
                own = run.weights(rt, budget, tree)
                row["hypernet_at_corner"][names[k]] = measure(run, tree, own, val, device)
        row["ceiling"] = _gaps(row["trained_for_corner"], signs)
        row["hypernet"] = _gaps(row["hypernet_at_corner"], signs)
        out["trees"].append(row)
    out["corner_gap"] = corner_gaps(out, signs)
    out["seconds"] = time.perf_counter() - start
    for row in out["trees"]:
        cells = ", ".join(
            f"{t} {row['ceiling'][t]:+.2f} (hypernet {row['hypernet'][t]:+.2f})" for t in names
        )
        print(f"tree {row['tree']}: own corner - other corners, val, trained for each: {cells}")
    cells = ", ".join(
        f"{t} {g['trained_for_corner']:+.2f} (hypernet {g['hypernet_at_corner']:+.2f})"
        for t, g in out["corner_gap"].items()
    )
    print(f"each corner on its own tree: own corner - other corners, val: {cells}")
    if args.out is not None:
        write_json(args.out, out)
    return 0


def corner_gaps(out: dict, signs: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per task, the corner gap a user would see if each corner ran its own tree (the one the
    run derives there) with the adaptation trained for that corner alone, and with the weight
    hypernetwork's: its metric at its own corner minus the mean over the other corners,
    signed so that positive is better."""
    rows = {row["tree"]: row for row in out["trees"]}
    at = out["tree_at_corner"]  # corner task -> the tree derived there
    gaps = {}
    for t, sign in signs.items():
        gaps[t] = {}
        for kind in ("trained_for_corner", "hypernet_at_corner"):
            own = rows[at[t]][kind][t][t]
            others = [rows[at[o]][kind][o][t] for o in signs if o != t]
            gaps[t][kind] = sign * (own - float(np.mean(others)))
    return gaps


def _gaps(at_corner: dict[str, dict[str, float]], signs: dict[str, float]) -> dict[str, float]:
    """Per task: its metric at its own corner minus the mean over the other corners,
    signed so that positive is better."""
    return {
        t: sign * (at_corner[t][t] - float(np.mean([at_corner[o][t] for o in signs if o != t])))
        for t, sign in signs.items()
    }


if __name__ == "__main__":
    raise SystemExit(main())
