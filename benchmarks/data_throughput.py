"""Is data loading the bottleneck of a training step? Loader alone vs. step alone.

Measures, in images/s, (a) the loader of the embedded default dataset (``synthscenes`` as
the config builds it: in-memory arrays sliced whole by :func:`dymu.data.batches.iterate`),
and (b) a folder dataset in the NYU-v2 ``.npy`` layout at 288x384, written by this script
to a temporary folder (random pixels: reading and decoding cost what real files cost),
read through a DataLoader with 0, 1 and 2 worker processes. Each loader case walks whole
shuffled epochs as stage 0 does and touches every batch; where CUDA is present it runs
with and without pinned memory, and with the upload (:func:`~dymu.data.batches.to_device`).
Stage 0's random flips, which run on the host between loader and step, are timed apart.

The step is stage 0's alone (``StackedAnchor`` forward, every task's loss, backward,
optimizer step) on one fixed batch already on the device, for the default config at its
batch size, and for the NYU-v2 config at ``--nyu-step-batch`` (a full batch at 288x384
takes minutes on a CPU; per-image figures are compared). The loading share of a step is
``loader / (loader + step)`` per batch (per image for NYU-v2): the time a step waits for
data when nothing overlaps them (the in-memory path and ``workers=0``); loading is the
bottleneck when the share passes 1/2, and worth optimising above 1/10. With workers, the
loader runs beside the step and only its rate has to keep up. Prints and saves JSON.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dymu.config import Config, load_config
from dymu.data.base import ArrayDataset
from dymu.data.batches import can_pin, iterate, num_batches, random_hflip, to_device
from dymu.io import write_json
from dymu.models.anchor import StackedAnchor, build_anchor
from dymu.models.towers import build_towers
from dymu.tasks import build_task
from dymu.train.precision import Precision
from dymu.train.stage0 import Stage0Objective, load_splits

NYU_SIZE = (288, 384)


def write_nyu_folder(root: Path, n_train: int, n_val: int = 2, seed: int = 0) -> None:
    """NYU-v2's preprocessed layout (``{train,val}/{image,label,depth,normal}/<i>.npy``,
    float32, 288x384), with random contents of the real value ranges."""
    rng = np.random.default_rng(seed)
    h, w = NYU_SIZE
    for source, n in (("train", n_train), ("val", n_val)):
        for sub in ("image", "label", "depth", "normal"):
            (root / source / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            normal = rng.normal(size=(h, w, 3)).astype(np.float32)
            normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
            arrays = {
                "image": rng.random((h, w, 3), dtype=np.float32),
                "label": rng.integers(-1, 13, (h, w)).astype(np.float32),
                "depth": rng.uniform(0.5, 10.0, (h, w, 1)).astype(np.float32),
                "normal": normal,
            }
            for sub, array in arrays.items():
                np.save(root / source / sub / f"{i}.npy", array)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(
    batches: Callable[[int], object], device: torch.device | None, repeats: int
) -> dict[str, float]:
    """Whole epochs of ``batches(seed)``: every batch touched (and uploaded to ``device``
    if given, the epoch ending when the last upload has landed)."""
    rates, per_batch = [], []
    for rep in range(repeats):
        images, count = 0, 0
        start = time.perf_counter()
        for batch in batches(rep):
            if device is not None:
                batch = to_device(batch, device)
            images += batch["image"].shape[0]
            count += 1
        if device is not None:
            _sync(device)
        seconds = time.perf_counter() - start
        rates.append(images / seconds)
        per_batch.append(seconds / count)
    return {
        "images_per_s": round(statistics.median(rates), 1),
        "ms_per_batch": round(1000 * statistics.median(per_batch), 3),
        "images_per_s_all": [round(r, 1) for r in rates],
    }


def time_hflip(ds, specs, batch_size: int, repeats: int) -> dict[str, float]:
    """Stage 0's random flips over an epoch of batches (host work between loader and step)."""
    tasks = [build_task(s) for s in specs]
    batches = list(iterate(ds, batch_size, shuffle=True, drop_last=True))
    gen = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            random_hflip(batch, tasks, gen)
        times.append((time.perf_counter() - start) / len(batches))
    ms = 1000 * statistics.median(times)
    return {"ms_per_batch": round(ms, 3), "images_per_s": round(1000 * batch_size / ms, 1)}


def time_step(
    cfg: Config, specs, batch: dict, device: torch.device, warmup: int, repeats: int
) -> dict[str, float]:
    """Stage 0's training step (as :func:`~dymu.train.stage0.train_stage0` builds it) on
    one fixed batch already on ``device``."""
    s0 = cfg.stage0
    anchor = build_anchor(cfg.model, specs, seed=cfg.run.seed)
    stacked = StackedAnchor(anchor).to(device)
    towers = build_towers(anchor.tasks, anchor.streams[0], anchor.heads, s0.towers)
    trained = stacked if towers is None else nn.ModuleDict({"anchor": stacked, "towers": towers})
    trained.to(device).train()
    prec = Precision.from_config(cfg.run, device)
    prec.prepare(trained)
    if s0.optimizer == "adam":
        opt = torch.optim.AdamW(trained.parameters(), lr=s0.lr, weight_decay=s0.weight_decay)
    else:
        opt = torch.optim.SGD(trained.parameters(), lr=s0.lr, momentum=0.9)
    objective = Stage0Objective(stacked, towers, prec)
    batch = to_device(batch, device)

    def step() -> None:
        loss = sum(objective(batch).values())
        opt.zero_grad(set_to_none=True)
        prec.backward(loss)
        prec.step(opt)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    n = batch["image"].shape[0]
    ms = 1000 * statistics.median(times)
    return {
        "batch": n,
        "ms_per_batch": round(ms, 2),
        "images_per_s": round(1000 * n / ms, 2),
        "ms_all": [round(1000 * t, 1) for t in times],
    }


def share(loader_ms: float, step_ms: float) -> dict[str, object]:
    """The part of a serial (loader, step) cycle spent loading, and the verdict."""
    value = loader_ms / (loader_ms + step_ms)
    return {"share": round(value, 4), "bottleneck": value >= 0.5, "noticeable": value >= 0.1}


def loader_cases(
    ds, batch_size: int, device: torch.device, worker_counts: list[int], repeats: int
) -> dict[str, dict]:
    """Every (workers, pin_memory, upload) combination that applies here, timed."""
    pins = [False, True] if can_pin() else [False]
    out = {}
    for workers in worker_counts:
        for pin in pins:
            uploads = [None] if device.type == "cpu" else [None, device]
            for upload in uploads:
                name = f"workers={workers}" + (",pinned" if pin else "")
                name += ",to_device" if upload is not None else ""

                def batches(seed: int, workers=workers, pin=pin):
                    return iterate(
                        ds,
                        batch_size,
                        shuffle=True,
                        seed=seed,
                        drop_last=True,
                        workers=workers,
                        pin_memory=pin,
                    )

                out[name] = time_loader(batches, upload, repeats)
                print(f"  loader {name}: {out[name]['images_per_s']} images/s", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="configs/default.yaml")
    parser.add_argument("--batch", type=int, default=None, help="default: stage0.batch_size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="epochs per loader case")
    parser.add_argument("--step-repeats", type=int, default=5)
    parser.add_argument("--nyu-images", type=int, default=256, help="0 skips the folder set")
    parser.add_argument("--nyu-step-batch", type=int, default=4)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = load_config(args.config)
    batch_size = args.batch or cfg.stage0.batch_size
    results: dict[str, dict] = {}

    # (a) the embedded default dataset, as the stages load it
    specs, splits = load_splits(cfg)
    ds = splits.train
    print(f"{cfg.data.name}: {len(ds)} train images, batch {batch_size}", flush=True)
    # Worker processes serve folder datasets only: in-memory splits are sliced in place.
    workers = [0] if isinstance(ds, ArrayDataset) else args.workers
    loader = loader_cases(ds, batch_size, device, workers, args.repeats)
    flips = time_hflip(ds, specs, batch_size, args.repeats)
    step = time_step(
        cfg, specs, next(iterate(ds, batch_size, shuffle=True)), device, 2, args.step_repeats
    )
    print(f"  step: {step['images_per_s']} images/s ({step['ms_per_batch']} ms/batch)")
    base = loader["workers=0"]["ms_per_batch"]
    results[cfg.data.name] = {
        "size": list(ds[0]["image"].shape[-2:]),
        "train_images": len(ds),
        "batches_per_epoch": num_batches(ds, batch_size, drop_last=True),
        "batch": batch_size,
        "loader": loader,
        "hflip": flips,
        "step": step,
        "loader_share": share(base, step["ms_per_batch"]),
        "loader_and_hflip_share": share(base + flips["ms_per_batch"], step["ms_per_batch"]),
    }

    # (b) a folder dataset in the NYU-v2 .npy layout, read through a DataLoader
    if args.nyu_images:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_nyu_folder(Path(tmp), args.nyu_images)
            written = time.perf_counter() - start
            nyu_cfg = load_config("configs/nyuv2.yaml", [f"data.root={tmp}"])
            nyu_specs, nyu_splits = load_splits(nyu_cfg)
            nyu = nyu_splits.train
            print(f"nyuv2 npy: {len(nyu)} train images at 288x384 ({written:.0f} s to write)")
            loader = loader_cases(nyu, batch_size, device, args.workers, args.repeats)
            fixed = next(iterate(nyu, args.nyu_step_batch, shuffle=True))
            step = time_step(nyu_cfg, nyu_specs, fixed, device, 1, max(2, args.step_repeats // 2))
            print(f"  step: {step['images_per_s']} images/s (batch {step['batch']})")
        per_image_step = 1000 / step["images_per_s"]
        results["nyuv2_npy"] = {
            "size": list(NYU_SIZE),
            "train_images": len(nyu),
            "batch": batch_size,
            "files": "written just before reading (in the page cache): a cold disk is slower",
            "loader": loader,
            "step": step,
            "loader_share": {
                name: share(1000 / case["images_per_s"], per_image_step)
                for name, case in loader.items()
            },
        }

    out = {
        "benchmark": "data_throughput",
        "config": args.config,
        "results": results,
        "env": {
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "threads": args.threads,
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "pinned_memory": can_pin(),
        },
    }
    print(json.dumps(out, indent=2))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
