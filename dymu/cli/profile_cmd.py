"""``dymu profile``: the latency table of a run's space on one backend, device and batch."""

from __future__ import annotations

import argparse

EXAMPLES = """examples:
  dymu profile --run runs/default --backend onnxruntime --batch 8 --out latency.json
  dymu profile --run runs/default --backend eager --batch 1 --device cuda --out lat-gpu.json
  dymu export --run runs/default --latency-ms 9 --latency latency.json --out export/9ms
"""


def add_parser(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "profile",
        parents=[parent],
        help="measure and fit the latency of every node of a run's space on one backend",
        description="Measure trees of the space as they ship (materialized, BatchNorm "
        "folded) on one backend, device, batch and input size; fit latency = c + the sum "
        "of the used nodes' latencies (each >= 0) on --trees random trees plus the anchor "
        "tree and every cheapest tree; check the fit on --validate other random trees "
        "measured whole; write the table with its errors and the measurement noise. "
        "Timing: warm-up, then rounds that visit every tree in a new random order, median "
        "of the per-round medians. dymu sample and dymu export take the table with "
        "--latency-ms.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="DIR", required=True, help="a finished dymu search run")
    p.add_argument(
        "--backend",
        required=True,
        help="onnxruntime, eager, compiled (torch.compile), aoti or tensorrt",
    )
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument(
        "--trees",
        type=int,
        default=60,
        help="random trees to fit, half uniform, half trunk-branching (default 60)",
    )
    p.add_argument(
        "--validate",
        type=int,
        default=50,
        help="other random trees to check, half of each kind (default 50)",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--reps", type=int, default=10, help="timed calls per round (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per tree (default 3)")
    p.add_argument(
        "--trt-version", default="10.3", metavar="V", help="ONNX opset as for dymu export"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the trees and the order")
    p.add_argument("--out", metavar="FILE", default="latency.json", help="the table to write")
    p.set_defaults(func=run_profile)


def run_profile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dymu.compile.latency import BACKENDS, Protocol, profile_run
    from dymu.compile.trt_support import opset_for
    from dymu.errors import UserError
    from dymu.io import ensure_dir, write_json

    if args.backend not in BACKENDS:
        raise UserError(f"unknown backend {args.backend!r}; choose from {', '.join(BACKENDS)}")
    _check_device(args.device, args.backend)
    for name in ("batch", "trees", "rounds", "reps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.validate < 0 or args.warmup < 0:
        raise UserError("--validate and --warmup must be >= 0")
    opset_for(args.trt_version)  # an unknown TensorRT version fails before any work
    out = Path(args.out)
    if out.suffix != ".json":
        raise UserError(f"--out must be a .json file, got {args.out!r}")
    ensure_dir(out.parent if str(out.parent) else Path("."))
    protocol = Protocol(warmup=args.warmup, rounds=args.rounds, reps=args.reps)
    table = profile_run(
        args.run,
        backend=args.backend,
        batch=args.batch,
        device=args.device,
        calibrate=args.trees,
        validate=args.validate,
        protocol=protocol,
        seed=args.seed,
        trt_version=args.trt_version,
    )
    command = f"dymu profile --run {args.run} --backend {args.backend} --batch {args.batch} "
    command += f"--device {args.device} --trees {args.trees} --validate {args.validate} "
    command += f"--rounds {args.rounds} --reps {args.reps} --warmup {args.warmup} "
    command += f"--trt-version {args.trt_version} --seed {args.seed} --out {args.out}"
    obj = {"command": command, **table.to_json()}
    write_json(out, obj)
    _print_summary(obj)
    print(f"wrote {out}")
    return 0


def _check_device(device: str, backend: str) -> None:
    import torch

    from dymu.errors import UserError

    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device must be cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: this machine has no CUDA device")
    if backend == "onnxruntime" and device != "cpu":
        raise UserError("backend onnxruntime runs on the CPU provider: use --device cpu")
    if backend == "tensorrt" and not device.startswith("cuda"):
        raise UserError("backend tensorrt needs --device cuda")


def _print_summary(obj: dict) -> None:
    from dymu.compile.latency import summary_lines

    print("\n".join(summary_lines(obj)))
