"""``dymu export``: the trees that serve a budget as checked ONNX files with a manifest."""

from __future__ import annotations

import argparse

from dymu.cli.search_cmds import add_budget_args

EXAMPLES = """examples:
  dymu export --run runs/quick --budget 0.8 --out export/quick        # a grid of 3 per task
  dymu export --run runs/default --budget 0.5 --preference 0.4,0.3,0.2,0.1 --out export/one
  dymu export --run runs/default --budget 0.75 --grid 4 --trt-version 8.5 --out export/xavier
  dymu export --run runs/quick --budget 0.5 --target aoti --out export/aoti  # + model.pt2
  dymu export --run runs/default --latency-ms 9 --latency latency.json --out export/9ms
"""


def add_parser(subparsers: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser(
        "export",
        parents=[parent],
        help="export the trees serving a budget as ONNX files with a manifest",
        description="Derive the tree of every preference asked for (one, or a grid on the "
        "simplex) at a FLOPs budget, materialize each distinct tree (BatchNorm folded, the "
        "weight hypernet's offsets baked in), export it to one self-contained ONNX file "
        "for the device's TensorRT version, check it (opset, onnx.checker, operators the "
        "TensorRT parser knows, ONNX Runtime against PyTorch) and write OUT/manifest.json "
        "with FLOPs (fvcore, 1 multiply-add = 1 FLOP), parameters, parity errors, test "
        "metrics, sha256 of every file, and golden inputs and outputs. --target trt also "
        "builds TensorRT engines for this GPU; --target aoti also compiles each tree into an "
        "AOTInductor package (model.pt2) for this machine's CUDA GPU, else its CPU, checked "
        "against PyTorch like the ONNX file. --latency-ms X with a dymu profile table made "
        "on this machine replaces the FLOPs budget by a latency target: trees are repaired "
        "by predicted latency, then each is measured on the table's backend and batch and "
        "repaired further while its median exceeds X.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--run", metavar="DIR", required=True, help="a finished dymu search run")
    add_budget_args(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--preference", help="one preference: comma-separated weights")
    which.add_argument(
        "--grid",
        type=int,
        metavar="K",
        help="every preference with weights in steps of 1/K (default: 3)",
    )
    p.add_argument(
        "--target",
        default="onnx",
        help="onnx (default); trt: also TensorRT engines (needs TensorRT and a GPU); aoti: "
        "also AOTInductor packages for this machine (needs a C++ compiler; ~1 min per tree)",
    )
    p.add_argument(
        "--trt-version",
        default="10.3",
        metavar="V",
        help="TensorRT version on the device; picks the ONNX opset (8.5/8.6 -> 17; default 10.3)",
    )
    p.add_argument("--static-batch", action="store_true", help="export batch 1 only")
    p.add_argument("--out", metavar="DIR", required=True, help="bundle folder to create")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dymu.cli.search_cmds import parse_budget, parse_preference
    from dymu.compile.export import check_target, export_bundle, simplex_grid
    from dymu.errors import UserError
    from dymu.space.graph import load_space

    check_target(args.target)
    if args.latency_ms is None and args.latency is not None:
        raise UserError("--latency goes with --latency-ms, not with --budget")
    budget = parse_budget(args.budget) if args.latency_ms is None else None
    if not (Path(args.run) / "space.json").is_file():
        raise UserError(f"{args.run} is not a finished search run: space.json is missing")
    tasks = list(load_space(Path(args.run) / "space.json").graph["tasks"])
    if args.preference is not None:
        prefs = [parse_preference(args.preference, tasks).tolist()]
    else:
        prefs = simplex_grid(len(tasks), 3 if args.grid is None else args.grid)
    manifest = export_bundle(
        args.run,
        args.out,
        budget=budget,
        preferences=prefs,
        target=args.target,
        trt_version=args.trt_version,
        dynamic_batch=not args.static_batch,
        latency_ms=args.latency_ms,
        latency_table=args.latency,
    )
    _print_trees(manifest)
    print(f"wrote {args.out}/manifest.json")
    return 0


def _print_trees(manifest: dict) -> None:
    """One block per exported tree: FLOPs, params, parity, what it serves, latency."""
    budget = manifest["budget"]
    full = manifest["anchor_flops"]
    count = len({t["tree"] for t in manifest["trees"]})
    models = len(manifest["trees"])
    asked = f"budget {budget:g}"
    if "latency" in manifest:
        lat = manifest["latency"]
        asked = f"latency target {lat['target_ms']:g} ms ({lat['table']['backend']}, batch "
        asked += f"{lat['table']['batch']}; FLOPs budget asked {lat['flops_budget_asked']:.3f})"
    print(
        f"{count} tree{'s' if count != 1 else ''} for {asked}, {models} model"
        f"{'s' if models != 1 else ''} (one per preference, its adaptation folded in):"
    )
    for t in manifest["trees"]:
        print(
            f"  {t['hash']}  FLOPs {t['flops_counted'] / 1e6:.2f} M "
            f"({t['flops_counted'] / full:.3f} of the anchor; fvcore)  params "
            f"{t['params'] / 1e6:.3f} M  parity {t['parity']['overall']:.1e}  preference "
            f"{', '.join(f'{x:.2f}' for x in t['preferences'][0])}"
        )
        if "latency" in t:
            lat = t["latency"]
            print(
                f"    latency {lat['measured_ms']:.3f} ms measured (spread "
                f"{100 * lat['spread']:.0f}%), {lat['predicted_ms']:.3f} ms predicted, target "
                f"{lat['target_ms']:g} ms"
            )
        if "aoti" in t:
            a = t["aoti"]
            print(
                f"    AOTInductor {a['device_name']}: parity {a['parity']['overall']:.1e}, "
                f"compiled in {a['compile_s']:.0f} s"
            )
