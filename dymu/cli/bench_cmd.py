"""``dymu bench``: latency, throughput and peak memory of trees on every available backend."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  dymu bench --run runs/quick                       # budgets 0.5 and 1.0, uniform preference
  dymu bench --bundle export/quick --run runs/quick --out bench.json
  dymu bench --bundle export/quick --backend onnxruntime
  dymu bench --bundle export/aoti                   # exported with --target aoti: + AOTInductor
"""


def add_parser(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "bench",
        parents=[parent],
        help="latency, throughput and peak memory of trees per backend",
        description="Measure every tree of export bundles (or, with only --run, the trees "
        "of the uniform preference at --budgets) on PyTorch eager, compiled PyTorch, ONNX "
        "Runtime CPU, TensorRT where present, and the AOTInductor packages of bundles "
        "exported with --target aoti (aoti; on CUDA also aoti_cudagraph, replayed from "
        "CUDA graphs): latency p50/p90 at batch 1, throughput at "
        "batch 32, peak memory, each in its own process. Writes JSON and a plot of latency "
        "against FLOPs (fvcore, 1 multiply-add = 1 FLOP).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="DIR", help="the search run (needed for PyTorch backends)")
    p.add_argument("--bundle", metavar="DIR", action="append", help="an export bundle (repeat)")
    p.add_argument("--budgets", default="0.5,1.0", help="without --bundle: budgets to export")
    p.add_argument(
        "--backend",
        action="append",
        help="limit to these backends (repeat): eager, compiled, onnxruntime, tensorrt, aoti, "
        "aoti_cudagraph",
    )
    p.add_argument("--iters", type=int, default=50, help="timed calls at batch 1")
    p.add_argument("--out", metavar="FILE", default="bench.json", help="JSON to write")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import tempfile
    from pathlib import Path

    from dymu.cli.search_cmds import parse_budget
    from dymu.compile.bench import bench_bundles
    from dymu.compile.export import export_bundle
    from dymu.errors import UserError
    from dymu.io import picture_path

    out = Path(args.out)
    if out.suffix != ".json":
        raise UserError(f"--out must be a .json file, got {args.out!r}")
    picture_path(out.with_suffix(".png"))  # an unwritable folder fails here, before any work
    if args.iters < 4:
        raise UserError(f"--iters must be >= 4, got {args.iters}")
    run = Path(args.run) if args.run else None
    with tempfile.TemporaryDirectory(prefix="dymu-bench-") as tmp:
        if args.bundle:
            bundles = [Path(b) for b in args.bundle]
        elif run is None:
            raise UserError("give --bundle DIR, or --run DIR to export the trees to measure")
        else:
            budgets = [parse_budget(b) for b in args.budgets.split(",")]
            bundles = []
            for b in budgets:
                bundle = Path(tmp) / f"budget-{b:g}"
                n = len(_tasks(run))
                export_bundle(run, bundle, budget=b, preferences=[[1.0 / n] * n])
                bundles.append(bundle)
        bench_bundles(
            bundles, run=run, backends=args.backend, out=out, iters=args.iters,
            command=_command(args),
        )  # fmt: skip
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command that makes the same measurement, for the JSON it writes."""
    parts = ["dymu bench"]
    parts += [f"--bundle {b}" for b in args.bundle or []]
    if args.run:
        parts.append(f"--run {args.run}")
    if not args.bundle:
        parts.append(f"--budgets {args.budgets}")
    parts += [f"--backend {b}" for b in args.backend or []]
    parts += [f"--iters {args.iters}", f"--out {args.out}"]
    return " ".join(parts)


def _tasks(run) -> list[str]:
    from dymu.space.graph import load_space

    return list(load_space(run / "space.json").graph["tasks"])
