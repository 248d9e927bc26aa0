"""Forward+backward time of the stacked anchor against a Python loop over its streams.

Both run the same weights (the anchor of the default config: 4 synthscenes tasks,
``tiny_resnet`` streams, 64x64, batch 32) in training mode; the stacked one runs each
layer of all streams as one grouped op. Prints and saves JSON. Goal: >= 2x for N = 4 on
2 CPU cores (and on a GPU when one is available: ``--device cuda``).

    python benchmarks/stacked_anchor.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dymu.config import load_config
from dymu.data import get_builder
from dymu.io import write_json
from dymu.models.anchor import StackedAnchor, build_anchor


def _time(step, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/default.yaml")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stacked_anchor.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config)
    info = get_builder(cfg.data.name).info_for(cfg.data)
    specs = info.select(cfg.data.tasks)
    size = tuple(cfg.data.size) if cfg.data.size else info.default_size
    anchor = build_anchor(cfg.model, specs).to(device).train()
    stacked = StackedAnchor(anchor).to(device).train()
    x = torch.rand(args.batch, 3, *size, device=device)

    def step(model):
        def run():
            out = model(x)
            loss = sum(v.float().square().mean() for v in out.values())
            model.zero_grad(set_to_none=True)
            loss.backward()

        return run

    def backbone_step(streams_fn):
        def run():
            feats = streams_fn()
            loss = sum(f.square().mean() for f in feats)
            anchor.zero_grad(set_to_none=True)
            stacked.zero_grad(set_to_none=True)
            loss.backward()

        return run

    results = {}
    cases = {
        "loop_full": step(anchor),
        "stacked_full": step(stacked),
        "loop_backbones": backbone_step(lambda: [f for s in anchor.streams for f in s(x)]),
        "stacked_backbones": backbone_step(lambda: stacked.backbone(x)),
    }
    for name, fn in cases.items():
        times = _time(fn, device, warmup=3, repeats=args.repeats)
        results[name] = {
            "median_ms": round(1000 * statistics.median(times), 2),
            "min_ms": round(1000 * min(times), 2),
        }
    out = {
        "benchmark": "stacked_anchor",
        "config": args.config,
        "tasks": [s.name for s in specs],
        "backbone": cfg.model.backbone,
        "width": cfg.model.width,
        "input": [args.batch, 3, *size],
        "device": str(device),
        "threads": args.threads,
        "results": results,
        "speedup_full": round(
            results["loop_full"]["median_ms"] / results["stacked_full"]["median_ms"], 3
        ),
        "speedup_backbones": round(
            results["loop_backbones"]["median_ms"] / results["stacked_backbones"]["median_ms"], 3
        ),
        "goal_speedup": 2.0,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    print(json.dumps(out, indent=2))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
