"""What shipping one model per preference costs: bundle size, switch time and latency.

Exports the grid's preferences at one budget with :func:`dymu.compile.export.export_bundle`
(one model per preference, its adaptation folded in), then, with the bundle's own
``dymu_runtime.Controller`` on ONNX Runtime (CPU): the bundle's size against what one model
per distinct tree would take (the export before per-preference models), the time of a
switch to a preference whose model is not loaded yet (a session is created) and to one
already loaded (a lookup), and each model's latency at batch 1 (the table protocol's
interleaved medians). It also records how far the models of one tree differ on the golden
input (the adaptation the bundle now ships) and the largest difference of any model from
the search's evaluation of its preference (``parity_evaluated``, checked by the export).

    python benchmarks/bundle_switch.py --run runs/mm_s0 --budget 0.75 --grid 10 \
        --out benchmarks/results/bundle_switch_multimnist_cpu.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dymu.compile.export import export_bundle, simplex_grid
from dymu.compile.latency import Protocol, measure
from dymu.io import write_json


def _runtime(bundle: Path):
    """The bundle's own ``dymu_runtime`` module, imported by path as a device would."""
    spec = importlib.util.spec_from_file_location("bundle_runtime", bundle / "dymu_runtime.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True)
    ap.add_argument("--budget", type=float, required=True)
    ap.add_argument("--grid", type=int, default=10, help="preferences in steps of 1/K")
    ap.add_argument("--out", help="write the figures here as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dymu-bundle-") as tmp:
        bundle = Path(tmp) / "bundle"
        t0 = time.perf_counter()
        manifest = export_bundle(
            args.run,
            bundle,
            budget=args.budget,
            preferences=simplex_grid(
                len(json.loads((Path(args.run) / "report.json").read_text())["tasks"]), args.grid
            ),
        )
        export_s = time.perf_counter() - t0
        models = manifest["trees"]
        sizes = {m["hash"]: (bundle / m["hash"] / "model.onnx").stat().st_size for m in models}
        per_tree = {}
        for m in models:
            per_tree.setdefault(m["tree"], []).append(m["hash"])
        total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
        one_per_tree = total - sum(sizes.values()) + sum(sizes[h[0]] for h in per_tree.values())

        runtime = _runtime(bundle)
        ctl = runtime.Controller(bundle, backend="onnxruntime")
        cold, warm = [], []
        for m in models:  # every model loaded once: a cold switch each
            ctl.set(m["preferences"][0])
            cold.append(ctl.last_switch_seconds)
        for m in models:  # all loaded: a switch is a lookup
            ctl.set(m["preferences"][0])
            warm.append(ctl.last_switch_seconds)
        image = np.load(bundle / "golden_input.npy")[:1]  # [1, 3, H, W]
        calls = {m["hash"]: (lambda h=m["hash"]: ctl._models[h](image)) for m in models}
        timed = measure(calls, Protocol())
        golden = {m["hash"]: np.load(bundle / m["hash"] / "golden_outputs.npz") for m in models}
        spread = {}
        for tree, hashes in per_tree.items():
            first = golden[hashes[0]]
            spread[tree] = max(
                (
                    float(np.abs(golden[h][t] - first[t]).max())
                    for h in hashes[1:]
                    for t in first.files
                ),
                default=0.0,
            )
    ms = [timed[m["hash"]]["ms"] for m in models]
    lat_by_tree = {tree: [timed[h]["ms"] for h in hashes] for tree, hashes in per_tree.items()}
    out = {
        "command": "python benchmarks/bundle_switch.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "budget": args.budget,
        "preferences": len(models),
        "trees": len(per_tree),
        "models_per_tree": {t: len(h) for t, h in per_tree.items()},
        "export_s": export_s,
        "bundle_bytes": total,
        "bundle_bytes_one_model_per_tree": one_per_tree,
        "model_bytes": {"min": min(sizes.values()), "max": max(sizes.values())},
        "switch_cold_ms": {"median": 1e3 * float(np.median(cold)), "max": 1e3 * max(cold)},
        "switch_warm_ms": {"median": 1e3 * float(np.median(warm)), "max": 1e3 * max(warm)},
        "latency_b1_ms": {"median": float(np.median(ms)), "min": min(ms), "max": max(ms)},
        "latency_b1_ms_by_tree": lat_by_tree,
        "golden_output_spread_within_tree": spread,
        "parity_evaluated_max": max(m["parity_evaluated"] for m in models),
        "parity_onnxruntime_max": max(m["parity"]["overall"] for m in models),
        "backend": "onnxruntime (CPU)",
    }
    print(
        f"{len(models)} models on {len(per_tree)} trees: bundle {total / 1e6:.2f} MB "
        f"({one_per_tree / 1e6:.2f} MB with one model per tree); switch cold "
        f"{out['switch_cold_ms']['median']:.1f} ms, warm {out['switch_warm_ms']['median']:.3f} ms; "
        f"latency b1 {out['latency_b1_ms']['median']:.3f} ms "
        f"({out['latency_b1_ms']['min']:.3f}-{out['latency_b1_ms']['max']:.3f})"
    )
    if args.out:
        write_json(Path(args.out), out)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
