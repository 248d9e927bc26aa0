"""``dymu config``: print the resolved configuration (and optionally start a run dir)."""

from __future__ import annotations

import argparse

from dymu.cli.common import add_config_args, config_from_args

EXAMPLES = """examples:
  dymu config                                   # all defaults
  dymu config -c configs/quick.yaml data.size=[32,32]
  dymu config -c configs/default.yaml --run runs/r1   # writes config.yaml and env.json
"""


def add_parser(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "config",
        parents=[parent],
        help="print the resolved config; with --run, write it and env.json to a run dir",
        description="Resolve defaults, a YAML file and KEY=VALUE overrides, and print the "
        "result as YAML. Unknown keys and wrong types are reported with the valid keys.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="DIR", help="also write config.yaml and env.json into DIR")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dymu.config import to_yaml
    from dymu.run import check_names

    cfg = config_from_args(args)
    check_names(cfg, need_data=False)
    print(to_yaml(cfg), end="")
    if args.run:
        from dymu.run import start_run

        path = start_run(cfg, args.run)
        print(f"# wrote {path / 'config.yaml'} and {path / 'env.json'}")
    return 0
