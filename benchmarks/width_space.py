"""A slimmable space (METHOD.md 1.11): how far widths reach, and whether what is priced runs.

For a config's anchor (or a finished run's trained one, ``--run``) this builds the space at
``--widths`` and reports:

- the cheapest configuration's FLOPs as a fraction of the anchor's, beside the cheapest
  tree's at full width;
- for each budget of ``--budgets``, the FLOPs a simple greedy widening reaches without
  passing it (from the narrowest configuration of the no-sharing and of the cheapest
  tree, widen one node a step at a time, the largest step that still fits): a lower bound
  on what a derivation could spend there, where trees alone leave budgets unspent;
- for ``--samples`` random (tree, widths) configurations: fvcore's count of the
  materialized network (BatchNorm folded) against the space's price, and the largest
  absolute difference between ONNX Runtime and PyTorch on the exported file.

    python benchmarks/width_space.py --out benchmarks/results/width_space_default_cpu.json
    python benchmarks/width_space.py -c configs/multimnist.yaml data.root=../shared/data \\
        --out benchmarks/results/width_space_multimnist_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from dymu.compile.materialize import materialize
from dymu.compile.onnx_export import export_onnx, ort_parity
from dymu.config import load_config
from dymu.data import get_builder, input_size
from dymu.errors import UserError
from dymu.io import write_json
from dymu.models.anchor import build_anchor
from dymu.models.flops import count_flops
from dymu.run import read_run_config
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import anchor_flops, min_flops, space_widths
from dymu.space.tree import TreeSpec
from dymu.train.stage0 import load_trained_anchor

DEFAULT_BUDGETS = (0.15, 0.2, 0.3, 0.5, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


def greedy_spend(space, tree: TreeSpec, budget: float) -> tuple[float, TreeSpec | None]:
    """(FLOPs fraction, configuration) reached by widening ``tree``'s nodes from the
    narrowest, one step at a time, always the largest step that keeps the price within
    ``budget``; (NaN, None) when even the narrowest ``tree`` does not fit."""
    widths = space_widths(space)
    full = anchor_flops(space)
    n, num_layers = tree.num_tasks, tree.num_layers
    level = np.zeros((num_layers, n), dtype=int)  # index into widths per node

    def config(lv: np.ndarray) -> TreeSpec:
        return TreeSpec(tree.parents, [[widths[i] for i in row] for row in lv])

    def price(lv: np.ndarray) -> int:
        return config(lv).flops(space)

    current = price(level)
    if current > budget * full:
        return float("nan"), None
    used = tree.used_nodes()
    while True:
        best = None
        for layer, j in used:
            if level[layer, j] + 1 >= len(widths):
                continue
            level[layer, j] += 1
            cost = price(level)
            level[layer, j] -= 1
            if cost <= budget * full and (best is None or cost > best[0]):
                best = (cost, layer, j)
        if best is None:
            return current / full, config(level)
        current, layer, j = best
        level[layer, j] += 1


def main(argv: list[str] | None = None) -> int:
    try:
        return _run(argv)
    except UserError as exc:
        print(f"width_space: {exc}", file=sys.stderr)
        return 2


def _run(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", default=None, help="a config file (default: built in)")
    parser.add_argument("--run", default=None, help="a finished run: its config and anchor")
    parser.add_argument("--widths", default="0.25,0.5,0.75,1.0")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in DEFAULT_BUDGETS))
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args(argv)
    try:
        widths = [float(w) for w in args.widths.split(",")]
        budgets = [float(b) for b in args.budgets.split(",")]
    except ValueError as exc:
        raise UserError(f"--widths and --budgets take comma-separated numbers: {exc}") from exc

    if args.run is not None:
        cfg = read_run_config(Path(args.run))
    else:
        cfg = load_config(args.config, args.overrides)
    if args.run is not None:
        anchor = load_trained_anchor(cfg, Path(args.run))[0]
    else:
        info = get_builder(cfg.data.name).info_for(cfg.data)
        anchor = build_anchor(cfg.model, info.select(cfg.data.tasks), seed=cfg.run.seed)
    anchor.eval()
    size = input_size(cfg.data)

    space = anchor_space(anchor, size, widths)
    plain = anchor_space(anchor, size)
    full = anchor_flops(space)
    n, num_layers = len(anchor.tasks), anchor.num_layers
    trees = {"no_sharing": TreeSpec.no_sharing(n, num_layers), "cheapest": TreeSpec.cheapest(plain)}
    spend = {}
    for b in budgets:
        reached = {k: greedy_spend(space, t, b)[0] for k, t in trees.items()}
        finite = [v for v in reached.values() if np.isfinite(v)]
        spend[f"{b:g}"] = {
            "per_tree": reached,
            "best": max(finite) if finite else None,
            "best_over_budget": max(finite) / b if finite else None,
        }

    rng = np.random.default_rng(args.seed)
    image = torch.zeros(1, 3, *size)
    checks = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in tqdm(range(args.samples), desc="configurations", unit="config"):
            tree = TreeSpec.random(n, num_layers, rng)
            w = rng.choice(space_widths(space), size=(num_layers, n)).tolist()
            tree = TreeSpec(tree.parents, w).canonical()
            net = materialize(anchor, tree)
            path = Path(tmp) / f"{i}.onnx"
            export_onnx(net, path, input_shape=(1, 3, *size))
            parity = ort_parity(net, path, batch_sizes=(2,))
            checks.append(
                {
                    "tree": tree.to_json(),
                    "price": tree.flops(space),
                    "fvcore": count_flops(net, image),
                    "flops_fraction": tree.flops(space) / full,
                    "onnx_max_abs_diff": parity["overall"],
                }
            )
    out = {
        "command": "python benchmarks/width_space.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "config": args.config,
        "run": args.run,
        "input_size": list(size),
        "widths": list(space_widths(space)),
        "anchor_flops": full,
        "cheapest_configuration": min_flops(space) / full,
        "cheapest_tree_full_width": min_flops(plain) / full,
        "greedy_spend": spend,
        "configurations": checks,
        "price_equals_fvcore": all(c["price"] == c["fvcore"] for c in checks),
        "onnx_max_abs_diff": max((c["onnx_max_abs_diff"] for c in checks), default=None),
    }
    print(
        f"cheapest configuration {out['cheapest_configuration']:.3f} of the anchor "
        f"(cheapest full-width tree {out['cheapest_tree_full_width']:.3f}; fvcore counts)"
    )
    for b, s in spend.items():
        best = (
            "none fits" if s["best"] is None else f"{s['best']:.3f} ({s['best_over_budget']:.2f} b)"
        )
        print(f"budget {b}: greedy widening reaches {best}")
    print(
        f"{len(checks)} random configurations: price == fvcore for all: "
        f"{out['price_equals_fvcore']}; ONNX max abs diff {out['onnx_max_abs_diff']:.2e}"
    )
    if args.out is not None:
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
