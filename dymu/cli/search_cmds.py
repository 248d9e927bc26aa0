"""``dymu search`` (the main job) and ``dymu sample`` (a tree for a preference and budget)."""

from __future__ import annotations

import argparse
import json
import math

from dymu.cli.common import add_config_args, config_from_args

SEARCH_EXAMPLES = """examples:
  dymu search --run runs/default                       # the embedded default config
  dymu search -c configs/quick.yaml --run runs/quick   # a smoke run of minutes
  dymu search -c configs/default.yaml --run runs/default --resume
  torchrun --nproc-per-node 2 -m -- dymu search --run runs/default   # stage 0 data-parallel
"""

SAMPLE_EXAMPLES = """examples:
  dymu sample --run runs/quick --preference 0.6,0.3,0.1 --budget 0.8
  dymu sample --run runs/quick --preference 0.2,0.2,0.6 --budget 1.0 --json
  dymu sample --run runs/default --preference 0.4,0.3,0.2,0.1 --latency-ms 9 \
      --latency latency.json                 # a table of dymu profile
"""


def add_parsers(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "search",
        parents=[parent],
        help="the main job: anchor, affinity, space, both hypernets and the evaluation",
        description="Train the anchor (stage 0), estimate task affinity, build the tree "
        "space, train the edge hypernet (stage 1) and the weight hypernet (stage 2), and "
        "evaluate over a preference sweep and several FLOPs budgets. Stages whose "
        "artifacts match the config are skipped. Writes report.json, report.md and plots.",
        epilog=SEARCH_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="DIR", required=True, help="run directory")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted stage 0, 1 or 2 from its last checkpoint",
    )
    add_config_args(p)
    p.set_defaults(func=run_search_cmd)

    s = subparsers.add_parser(
        "sample",
        parents=[parent],
        help="derive the tree for a preference and a FLOPs budget",
        description="Print the tree the trained edge hypernet derives for a preference "
        "(one weight per task, summing to 1) and a budget (a fraction of the anchor's FLOPs), "
        "with its FLOPs (fvcore, 1 multiply-add = 1 FLOP) and parameters.",
        epilog=SAMPLE_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    s.add_argument("--run", metavar="DIR", required=True, help="a run directory of dymu search")
    s.add_argument("--preference", required=True, help="comma-separated weights, one per task")
    add_budget_args(s)
    s.add_argument("--json", action="store_true", help="print JSON and write trees/<hash>.json")
    s.set_defaults(func=run_sample)


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """--budget, or --latency-ms with the --latency table it is measured by."""
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--budget", help="fraction of the anchor's FLOPs in (0, 1]")
    which.add_argument(
        "--latency-ms",
        metavar="X",
        help="a latency target in milliseconds instead of --budget (needs --latency)",
    )
    p.add_argument(
        "--latency", metavar="FILE", help="the latency table of dymu profile for --latency-ms"
    )


def latency_budget(args: argparse.Namespace, space, input_size):
    """The :class:`~dymu.compile.latency.LatencyBudget` of --latency-ms and --latency (None
    with --budget); one line for a missing, damaged or mismatched table or a target below
    the fastest tree."""
    from dymu.compile.latency import load_budget, parse_target_ms
    from dymu.errors import UserError

    if args.latency_ms is None:
        if args.latency is not None:
            raise UserError("--latency goes with --latency-ms, not with --budget")
        return None
    parse_target_ms(args.latency_ms)  # a bad target is named before a missing table
    if args.latency is None:
        raise UserError("--latency-ms needs --latency FILE, a table made by dymu profile")
    return load_budget(space, args.latency, args.latency_ms, input_size)


def run_search_cmd(args: argparse.Namespace) -> int:
    from dymu import dist
    from dymu.search import run_search

    cfg = config_from_args(args)
    report = run_search(cfg, args.run, resume=args.resume)
    if not dist.is_main():  # under torchrun rank 0 speaks for all
        return 0
    for b in report["budgets"]:
        k = f"{b:g}"
        print(
            f"budget {k}: HV {report['hypervolume'][k]:.4f}, uniformity "
            f"{report['uniformity'][k]:.3f}, delta_m {report['delta_m'][k]:+.2f}%, FLOPs "
            f"{report['flops'][k]['mean']:.3f}, adherence {report['budget_adherence'][k]:.3f}"
        )
    print(f"wrote {args.run}/report.json and report.md (training curves: curves.png)")
    from dymu.train.curves import LOGS, tensorboard_available

    if tensorboard_available():
        print(f"training curves in TensorBoard: tensorboard --logdir {args.run}/{LOGS}")
    return 0


def parse_preference(text: str, tasks: list[str]):
    """A preference on the simplex, or a one-line UserError saying what was given."""
    import torch

    from dymu.errors import UserError

    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--preference must be numbers separated by commas, got {text!r}") from None
    if len(values) != len(tasks):
        raise UserError(
            f"--preference needs {len(tasks)} weights ({', '.join(tasks)}), got {len(values)}: "
            f"{text!r}"
        )
    if any(math.isnan(v) or math.isinf(v) for v in values):
        raise UserError(f"--preference must be finite numbers, got {text!r}")
    if any(v < 0 for v in values):
        raise UserError(f"--preference weights must be >= 0, got {text!r}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise UserError(f"--preference must sum to 1 (within 1e-6), got {text!r} = {sum(values)}")
    return torch.tensor(values, dtype=torch.float32)


def parse_budget(text: str) -> float:
    """A budget in (0, 1], or a one-line UserError saying what was given."""
    from dymu.errors import UserError

    try:
        budget = float(text)
    except ValueError:
        raise UserError(f"--budget must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < budget <= 1.0:  # NaN fails too
        raise UserError(f"--budget must be in (0, 1], got {text!r}")
    return budget


def run_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dymu.io import write_json
    from dymu.space.render import tree_text

    run = Path(args.run)
    tree, record, lat = _sample(args, run)
    if args.json:
        write_json(run / "trees" / f"{tree.hash()}.json", record)
        print(json.dumps(record))
        return 0
    print(tree_text(tree, record["tasks"]))
    full = record["flops"] / record["flops_fraction"]
    print(
        f"FLOPs {record['flops'] / 1e6:.2f} M ({record['flops_fraction']:.3f} of the anchor's "
        f"{full / 1e6:.2f} M; fvcore, 1 multiply-add = 1 FLOP), params "
        f"{record['params'] / 1e6:.3f} M"
    )
    if lat is not None:
        t = lat.table
        print(
            f"latency {record['latency']['predicted_ms']:.3f} ms predicted for a "
            f"{lat.target_ms:g} ms target ({t.backend}, batch {t.batch}, {t.device}; the edge "
            f"hypernet asked at FLOPs budget {record['budget']:.3f})"
        )
    return 0


def _sample(args: argparse.Namespace, run):
    """The tree of ``args`` (preference and budget or latency target) on the finished run
    ``run``: ``(tree, its record, the latency budget or None)``."""

    from dymu.data import input_size
    from dymu.errors import UserError
    from dymu.hypernet.derivation import Derivation
    from dymu.lock import run_lock
    from dymu.run import read_run_config
    from dymu.search import check_artifacts, load_edge, load_slim_space
    from dymu.space.graph import anchor_flops, load_space, space_shape

    for name in ("config.yaml", "space.json"):
        if not (run / name).is_file():
            raise UserError(f"{run} is not a finished search run: {name} is missing")
    with run_lock(run, write=False):  # no search may write into it meanwhile
        cfg = read_run_config(run)
        check_artifacts(run, cfg, ("stage1",))  # the edge hypernet and what it was made from
        space, slim = load_space(run / "space.json"), load_slim_space(run, cfg)
        tasks = list(space.graph["tasks"])
        r = parse_preference(args.preference, tasks)
        lat = latency_budget(args, space, list(input_size(cfg.data)))
        budget = parse_budget(args.budget) if lat is None else lat.flops_budget
        edge = load_edge(run, *space_shape(space), cfg).eval()
        derive = Derivation.of(edge, space, slim, cfg.slim)
        if lat is None:
            tree = derive(r, budget)
            space = derive.space
        else:  # the latency model prices full-width trees
            tree = lat.derive(edge.alpha(r, budget).detach(), edge.trunk_preference(r))
    flops = tree.flops(space)
    record = {
        "hash": tree.hash(),
        "parents": [list(p) for p in tree.canonical().parents],
        **({} if tree.widths is None else {"widths": [list(w) for w in tree.widths]}),
        "flops": flops,
        "flops_fraction": flops / anchor_flops(space),
        "params": tree.params(space),
        "preference": r.tolist(),
        "budget": budget,
        "tasks": tasks,
    }
    if lat is not None:
        t = lat.table
        record["latency"] = {
            "target_ms": lat.target_ms,
            "predicted_ms": lat.predicted_ms(tree),
            "table": {"backend": t.backend, "device": t.device, "batch": t.batch},
        }
    return tree, record, lat
