"""``dymu affinity`` and ``dymu space``: the anchor's task affinity and its tree space."""

from __future__ import annotations

import argparse

from dymu.cli.common import add_config_args, config_from_args

AFFINITY_EXAMPLES = """examples:
  dymu affinity -c configs/quick.yaml --run runs/quick
  dymu affinity -c configs/default.yaml --run runs/default affinity.method=grad_cosine
  dymu affinity -c configs/default.yaml --run runs/default --resume   # continue stage 0
"""

SPACE_EXAMPLES = """examples:
  dymu space -c configs/quick.yaml --run runs/quick
  dymu space -c configs/default.yaml --run runs/default model.backbone=resnet18
"""


def add_parsers(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "affinity",
        parents=[parent],
        help="train (or load) the anchor and measure how related its tasks are",
        description="Train every task's own stream (stage 0) unless the run directory already "
        "holds an anchor trained with the same config, then estimate the task affinity "
        "(affinity.method: rsa, grad_cosine or lookahead). Writes config.yaml, env.json, "
        "anchor.safetensors, anchor.json, affinity.json and affinity.png into --run.",
        epilog=AFFINITY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="DIR", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted stage 0")
    add_config_args(p)
    p.set_defaults(func=run_affinity)

    s = subparsers.add_parser(
        "space",
        parents=[parent],
        help="write the anchor's tree space (space.json) and its FLOPs range",
        description="Count every node's FLOPs and parameters with fvcore (one multiply-add = "
        "one FLOP) at the config's input size and write space.json into --run.",
        epilog=SPACE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--run", metavar="DIR", required=True, help="run directory")
    add_config_args(s)
    s.set_defaults(func=run_space)


def run_affinity(args: argparse.Namespace) -> int:
    from dymu import dist
    from dymu.affinity.estimate import estimate_affinity
    from dymu.affinity.plot import affinity_png
    from dymu.data import get_builder
    from dymu.run import resolve_device, start_run
    from dymu.search import affinity_hash
    from dymu.train.stage0 import ensure_anchor

    cfg = config_from_args(args)
    run = start_run(cfg, args.run)
    anchor, _ = ensure_anchor(cfg, run, resume=args.resume)
    if not dist.is_main():  # under torchrun stage 0 is shared out; the estimate is rank 0's
        return 0
    device = resolve_device(cfg.run.device)
    train = get_builder(cfg.data.name).load(cfg.data, "train")
    result = estimate_affinity(anchor.to(device), train, cfg.affinity, device, cfg.run.seed)
    result.meta["config_hash"] = affinity_hash(cfg)  # lets dymu search reuse it
    result.save(run / "affinity.json")
    affinity_png(result, run / "affinity.png")
    width = max(len(t) for t in result.tasks)
    layers = f"mean over {len(result.per_layer)} layers" if result.per_layer else "shared trunk"
    print(f"affinity ({result.method}, {layers}):")
    print(" " * (width + 2) + "  ".join(f"{t[:8]:>8}" for t in result.tasks))
    for name, row in zip(result.tasks, result.mean, strict=True):
        print(f"{name:>{width}}  " + "  ".join(f"{v:8.3f}" for v in row))
    print(f"wrote {run / 'affinity.json'} and {run / 'affinity.png'}")
    return 0


def run_space(args: argparse.Namespace) -> int:
    from dymu.data import get_builder, input_size
    from dymu.models.anchor import build_anchor
    from dymu.run import start_run
    from dymu.space.anchor_space import anchor_space
    from dymu.space.graph import anchor_flops, max_flops, min_flops, save_space
    from dymu.space.render import tree_text
    from dymu.space.tree import TreeSpec

    cfg = config_from_args(args)
    run = start_run(cfg, args.run)
    builder = get_builder(cfg.data.name)
    info = builder.info_for(cfg.data)
    specs = info.select(cfg.data.tasks)
    size = input_size(cfg.data)
    anchor = build_anchor(cfg.model, specs, seed=cfg.run.seed)
    space = anchor_space(anchor, size)
    save_space(space, run / "space.json")
    n, num_layers = len(specs), anchor.num_layers
    full = anchor_flops(space)
    print(
        f"space: {n} tasks x {num_layers} layers at {size[0]}x{size[1]} "
        "(FLOPs by fvcore, 1 multiply-add = 1 FLOP)"
    )
    low, high = min_flops(space), max_flops(space)
    print(
        f"  anchor (no sharing) {full / 1e6:.2f} MFLOPs; cheapest tree {low / 1e6:.2f} MFLOPs "
        f"({low / full:.2f} of the anchor); largest {high / 1e6:.2f} MFLOPs"
    )
    sharing = TreeSpec.all_sharing(n, num_layers)
    print(f"all-sharing tree ({sharing.flops(space) / full:.2f} of the anchor):")
    print(tree_text(sharing, [s.name for s in specs]))
    print(f"wrote {run / 'space.json'}")
    return 0
