"""``dymu datasets list|show|prepare``: see what data dymu knows and look at it."""

from __future__ import annotations

import argparse

from dymu.cli.common import add_config_args, config_from_args

EXAMPLES = """examples:
  dymu datasets list
  dymu datasets show synthscenes --out synthscenes.png
  dymu datasets show synthscenes -c configs/quick.yaml data.tasks=[semseg,material] --out x.png
  dymu datasets prepare synthscenes
  dymu datasets show nyuv2 --root /data/nyuv2 --split test -n 6 --out nyu.png
"""


def add_parser(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "datasets",
        parents=[parent],
        help="list, preview and prepare datasets",
        description="List the datasets dymu can read, draw samples with every task's "
        "target, and generate or validate a dataset ahead of training.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = sub.add_parser(
        "list",
        parents=[parent],
        help="list known datasets and their tasks",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ls.set_defaults(func=run_list)

    show = sub.add_parser(
        "show",
        parents=[parent],
        help="draw samples next to every task's target",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument("name", help="dataset name (see 'dymu datasets list')")
    show.add_argument("--out", metavar="FILE.png", help="picture to write (default NAME-SPLIT.png)")
    show.add_argument("--split", default="train", help="train, val or test (default train)")
    show.add_argument("-n", "--num", type=int, default=4, help="number of samples (default 4)")
    show.add_argument("--root", help="dataset folder (same as data.root=PATH)")
    add_config_args(show)
    show.set_defaults(func=run_show)

    prep = sub.add_parser(
        "prepare",
        parents=[parent],
        help="generate the cache or validate the folder of a dataset",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prep.add_argument("name", help="dataset name (see 'dymu datasets list')")
    prep.add_argument("--root", help="dataset folder (same as data.root=PATH)")
    add_config_args(prep)
    prep.set_defaults(func=run_prepare)


def _data_config(args: argparse.Namespace):
    extra = [f"data.name={args.name}"]
    if args.root is not None:
        extra.append(f"data.root={args.root}")
    return config_from_args(args, *extra).data


def run_list(args: argparse.Namespace) -> int:
    from dymu.data import DATASETS

    rows = [("name", "tasks (* = default)", "size", "source")]
    for name in DATASETS.names():
        info = DATASETS.get(name).info
        tasks = " ".join(t.name + ("*" if t.name in info.default_tasks else "") for t in info.tasks)
        if len(tasks) > 60:
            tasks = f"{len(info.tasks)} tasks ({info.tasks[0].name}, ...)"
        size = "x".join(str(v) for v in info.default_size)
        source = "embedded (generated)" if not info.needs_root else f"data.root: {info.source}"
        rows.append((name, tasks, size, source))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    import numpy as np

    from dymu.data import check_split, get_builder
    from dymu.data.preview import draw_samples
    from dymu.errors import UserError
    from dymu.io import picture_path

    cfg = _data_config(args)
    split = check_split(args.split)
    if args.num < 1:
        raise UserError(f"-n must be >= 1, got {args.num}")
    out = picture_path(args.out or f"{cfg.name}-{split}.png")  # fail before any slow work
    builder = get_builder(cfg.name)
    builder.prepare(cfg, progress=True)  # generation/validation with a progress bar
    ds = builder.load(cfg, split)
    if len(ds) == 0:
        raise UserError(f"dataset {cfg.name} has no {split} samples")
    count = min(args.num, len(ds))
    rng = np.random.default_rng(0)  # the same samples every time, spread over the split
    indices = sorted(int(i) for i in rng.choice(len(ds), count, replace=False))
    draw_samples(ds, indices, out)
    print(f"wrote {out} ({count} {split} samples of {cfg.name}; tasks: {', '.join(ds.task_names)})")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from dymu.data import get_builder

    cfg = _data_config(args)
    summary = get_builder(cfg.name).prepare(cfg, progress=True)
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    where = summary.get("cache") or summary.get("root")
    print(f"{cfg.name}: {splits} samples; {where}")
    return 0
