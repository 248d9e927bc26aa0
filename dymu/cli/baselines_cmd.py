"""``dymu baselines``: the comparison methods, trained on the search's data and sweep."""

from __future__ import annotations

import argparse

from dymu.cli.common import add_config_args, config_from_args

EXAMPLES = """examples:
  dymu baselines -c configs/quick.yaml --run runs/quick
  dymu baselines -c configs/quick.yaml --run runs/quick baselines.methods=[static,phn_bn]
  dymu baselines --run runs/default baselines.towers.gamma=0.5 baselines.weightings=[tensioner]
"""


def add_parser(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "baselines",
        parents=[parent],
        help="train the comparison methods and write a report beside DYMU's",
        description="On the data, backbone, heads and preference sweep of a finished "
        "`dymu search` run, train the methods in baselines.methods: static shared models (one "
        "per preference), the Pareto set with parameter transfer, the Pareto hypernetwork and "
        "its BN-only variant, and one shared model per weighting strategy. Finished methods "
        "whose config is unchanged are skipped. Writes RUN/baselines/report.json, report.md "
        "and fronts.png (hypervolume, uniformity, delta_m, FLOPs, params, training time).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="DIR", required=True, help="a finished dymu search run")
    add_config_args(p)
    p.set_defaults(func=run_baselines_cmd)


def run_baselines_cmd(args: argparse.Namespace) -> int:
    from dymu import dist
    from dymu.baselines.run import run_baselines

    cfg = config_from_args(args)
    report = run_baselines(cfg, args.run)
    if not dist.is_main():  # under torchrun rank 0 speaks for all
        return 0
    for method, row in report["methods"].items():
        print(
            f"{method:>12}: HV {row['hypervolume']:.4f}, delta_m {row['delta_m']:+.2f}%, "
            f"FLOPs {row['flops_fraction']:.3f}, training {row['train_seconds']:.0f} s"
        )
    print(f"wrote {args.run}/baselines/report.json and report.md")
    return 0
