"""Generation throughput of the embedded ``synthscenes`` dataset (goal: >= 1000 images/s
at 64x64 on one core).

Renders ``--images`` scenes ``--repeats`` times in one process pinned to one thread
(numpy and torch), and prints and saves JSON with the median and best rates.

    python benchmarks/synthscenes_throughput.py --out benchmarks/results/synthscenes_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # one core: set before numpy/torch load their thread pools

import torch  # noqa: E402

from dymu.config import SynthConfig  # noqa: E402
from dymu.data.synthscenes import generate  # noqa: E402
from dymu.io import write_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/synthscenes_throughput.json")
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    synth = SynthConfig()
    height, width = args.size
    generate(64, height, width, synth, seed=0)  # warm-up: imports, allocator
    rates = []
    for rep in range(args.repeats):
        start = time.perf_counter()
        generate(args.images, height, width, synth, seed=rep)
        rates.append(args.images / (time.perf_counter() - start))
    result = {
        "benchmark": "synthscenes_throughput",
        "images": args.images,
        "size": [height, width],
        "threads": 1,
        "objects_per_image": [synth.min_objects, synth.max_objects],
        "images_per_s_median": round(statistics.median(rates), 1),
        "images_per_s_best": round(max(rates), 1),
        "images_per_s_all": [round(r, 1) for r in rates],
        "goal_images_per_s": 1000,
        "python": sys.version.split()[0],
        "numpy": __import__("numpy").__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
