"""Pareto sets on MultiMNIST: parameter transfer (METHOD.md 3) against independent models.

K LeNet-style networks (BatchNorm after each convolution, two 10-way heads), one per spread
preference w_k = ((k + 0.5) / K, 1 - (k + 0.5) / K), are trained on F_k = w_k1 CE_left +
w_k2 CE_right twice with the same initial weights, batches and optimizer: once with
parameter transfer between neighbouring subproblems (``dymu.pareto.transfer``, mixing
weights scaled by the learning rate) and once independently (M = I). After every epoch
the K models' test cross-entropies give the hypervolume with reference (2, 2) (exact,
moocore); the time to 90% of the final HV is reported against each run's own final HV
and against the better of the two final HVs. Wall times count training only.

A second part times one training step (forward, backward, SGD) of K = 20 such networks
on one batch: the stacked set run by ``torch.vmap`` and by its per-model loop, against a
Python loop over 20 separate ``nn.Module`` models with 20 optimizers.

ROOT is a folder holding mnist/ with the four original idx files. Single-threaded and
seeded; prints a table and saves JSON:

    python benchmarks/transfer_pareto.py --root ROOT --threads 1
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dymu.config import DataConfig
from dymu.data import get_builder
from dymu.io import write_json
from dymu.pareto.stacked import ParetoSet
from dymu.pareto.transfer import (
    evaluate_losses,
    pareto_step,
    time_to_fraction,
    train_pareto_set,
)

TASKS = ("left", "right")
REFERENCE = (2.0, 2.0)


class LeNet(nn.Module):
    """LeNet-style two-task network (as in Sener & Koltun's MultiMNIST setup) with BN."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 10, 5),  # [B, 1, 28, 28] -> [B, 10, 24, 24]
            nn.BatchNorm2d(10),
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> [B, 10, 12, 12]
            nn.Conv2d(10, 20, 5),  # -> [B, 20, 8, 8]
            nn.BatchNorm2d(20),
            nn.ReLU(),
            nn.MaxPool2d(2),  # -> [B, 20, 4, 4]
            nn.Flatten(),  # -> [B, 320]
            nn.Linear(320, 50),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({t: nn.Linear(50, 10) for t in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {t: head(h) for t, head in self.heads.items()}


def task_losses(out: dict[str, Tensor], y: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy of each task: [T]."""
    return torch.stack([F.cross_entropy(out[t], y[t]) for t in TASKS])


def load(root: str, split: str, size: int, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """``size`` seeded samples of a MultiMNIST split: images [N, 1, 28, 28], labels [N]."""
    builder = get_builder("multimnist")
    cfg = DataConfig(name="multimnist", root=root, seed=seed)
    builder.prepare(cfg)
    ds = builder.load(cfg, split)
    rows = np.sort(np.random.default_rng([seed, len(split)]).permutation(len(ds))[:size])
    batch = ds.batch(rows)
    image = batch["image"][:, :1].contiguous()  # [N, 3, 28, 28] (grey x3) -> [N, 1, 28, 28]
    return image, {t: batch[t] for t in TASKS}


def spread_preferences(count: int) -> Tensor:
    """K two-task preferences at the midpoints of K equal bins of the simplex: [K, 2]."""
    first = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    return torch.stack([first, 1.0 - first], dim=1)


def run_mode(args: argparse.Namespace, transfer: bool, data: dict) -> dict:
    x_train, y_train, x_test, y_test = data["train"] + data["test"]
    n = len(x_train)

    def batches(epoch: int):
        order = torch.from_numpy(np.random.default_rng([args.seed, epoch]).permutation(n))
        for start in range(0, n - args.batch + 1, args.batch):  # drop the last partial batch
            idx = order[start : start + args.batch]
            yield x_train[idx], {t: y_train[t][idx] for t in TASKS}

    test_batches = [
        (x_test[i : i + 1000], {t: y_test[t][i : i + 1000] for t in TASKS})
        for i in range(0, len(x_test), 1000)
    ]

    def eval_fn(pset: ParetoSet) -> np.ndarray:
        return evaluate_losses(pset, test_batches, task_losses, vmap_loss=True)

    def log(entry: dict) -> None:
        hv = entry["hv"]
        print(
            f"  {'transfer' if transfer else 'independent':<11} epoch {entry['epoch']:>2}  "
            f"HV {hv:.4f}  train {entry['elapsed_s']:7.1f} s",
            flush=True,
        )

    torch.manual_seed(args.seed)
    pset = ParetoSet(LeNet(), args.models, init=args.init, seed=args.seed, execution=args.execution)
    return train_pareto_set(
        pset,
        spread_preferences(args.models),
        batches,
        task_losses,
        epochs=args.epochs,
        lr=args.lr,
        optimizer="sgd",
        momentum=args.momentum,
        schedule=args.schedule,
        steps_per_epoch=n // args.batch,
        transfer=transfer,
        neighbours=args.neighbours,
        strength=args.strength,
        vmap_loss=True,
        eval_fn=eval_fn,
        reference=REFERENCE,
        log=log,
    )


def time_steps(args: argparse.Namespace) -> dict:
    """Median step time of K models: stacked (vmap, loop) vs K separate models."""
    k, b = args.speed_models, args.speed_batch
    torch.manual_seed(args.seed)
    x = torch.rand(b, 1, 28, 28)
    y = {t: torch.randint(0, 10, (b,)) for t in TASKS}
    prefs = spread_preferences(k).float()
    sets = {
        e: ParetoSet(LeNet(), k, init="seeded", seed=args.seed, execution=e)
        for e in ("vmap", "loop")
    }
    set_opts = {e: torch.optim.SGD(s.parameters(), lr=0.01) for e, s in sets.items()}
    models = [sets["loop"].model(i) for i in range(k)]
    model_opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in models]

    def stacked(execution: str):
        def step() -> None:
            pareto_step(
                sets[execution],
                set_opts[execution],
                x,
                y,
                preferences=prefs,
                loss_fn=task_losses,
                vmap_loss=True,
            )

        return step

    def separate() -> None:
        for model, opt, w in zip(models, model_opts, prefs, strict=True):
            opt.zero_grad(set_to_none=True)
            (w * task_losses(model(x), y)).sum().backward()
            opt.step()

    steps = {"vmap": stacked("vmap"), "stacked_loop": stacked("loop"), "separate": separate}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(args.speed_repeats):  # interleaved, so load changes hit all alike
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return {
        "models": k,
        "batch": b,
        "repeats": args.speed_repeats,
        "median_ms": {name: round(v, 2) for name, v in ms.items()},
        "min_ms": {name: round(1000 * min(t), 2) for name, t in times.items()},
        "speedup_vmap_vs_separate": round(ms["separate"] / ms["vmap"], 3),
        "speedup_stacked_loop_vs_separate": round(ms["separate"] / ms["stacked_loop"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder holding mnist/ (idx files)")
    parser.add_argument("--models", type=int, default=6, help="K preferences / models")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--schedule", default="cosine")
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--strength", type=float, default=0.05)
    parser.add_argument("--init", default="same")
    parser.add_argument("--execution", default="vmap")
    parser.add_argument("--fraction", type=float, default=0.9)
    parser.add_argument("--speed-models", type=int, default=20)
    parser.add_argument("--speed-batch", type=int, default=64)
    parser.add_argument("--speed-repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/transfer_pareto.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    train = load(args.root, "train", args.train_size, args.seed)
    test = load(args.root, "test", args.test_size, args.seed)
    mean, std = train[0].mean(), train[0].std()  # normalise with training statistics
    data = {
        "train": ((train[0] - mean) / std, train[1]),
        "test": ((test[0] - mean) / std, test[1]),
    }

    runs = {}
    for name, transfer in (("independent", False), ("transfer", True)):
        runs[name] = run_mode(args, transfer, data)
    best = max(r["final_hv"] for r in runs.values())
    summary = {}
    for name, r in runs.items():
        own = r["final_hv"]  # an HV of 0 (no model inside the reference box) has no fraction
        summary[name] = {
            "final_hv": own,
            "train_s": r["history"][-1]["elapsed_s"],
            "to_own_final": time_to_fraction(r["history"], args.fraction) if own > 0 else None,
            "to_best_final": (
                time_to_fraction(r["history"], args.fraction, target=best) if best > 0 else None
            ),
        }
    speed = time_steps(args)

    result = {
        "benchmark": "transfer_pareto",
        "dataset": "multimnist",
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "root"
        },
        "reference": list(REFERENCE),
        "hv": "exact (moocore) of the K models' test cross-entropies (left, right)",
        "wall_time": "training only (forward, backward, mix, optimizer step), not evaluation",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "runs": {
            name: {
                "history": r["history"],
                "matrix": r["matrix"],
                "train_settings": r["settings"],
            }
            for name, r in runs.items()
        },
        "summary": summary,
        "step_speed": speed,
    }
    write_json(args.out, result)

    frac = f"{round(100 * args.fraction)}%"
    print(f"\nMultiMNIST, K={args.models}, {args.epochs} epochs, HV ref {REFERENCE}")
    print(f"{'epoch':>5} | {'HV indep.':>10} {'time s':>7} | {'HV transfer':>11} {'time s':>7}")
    for a, b in zip(runs["independent"]["history"], runs["transfer"]["history"], strict=True):
        print(
            f"{a['epoch']:>5} | {a['hv']:>10.4f} {a['elapsed_s']:>7.1f} | "
            f"{b['hv']:>11.4f} {b['elapsed_s']:>7.1f}"
        )

    def when(t: dict | None) -> str:
        if t is None:
            return "n/a (HV 0)"
        return "never" if t["epoch"] is None else f"epoch {t['epoch']} ({t['elapsed_s']:.1f} s)"

    for name, s in summary.items():
        print(
            f"{name:<11}: final HV {s['final_hv']:.4f}; {frac} of own final at "
            f"{when(s['to_own_final'])}; {frac} of best final ({best:.4f}) at "
            f"{when(s['to_best_final'])}"
        )
    ms = speed["median_ms"]
    print(
        f"step of {speed['models']} models, batch {speed['batch']}, {result['threads']} "
        f"thread(s): vmap {ms['vmap']:.1f} ms, stacked loop {ms['stacked_loop']:.1f} ms, "
        f"separate models {ms['separate']:.1f} ms (vmap speed-up "
        f"{speed['speedup_vmap_vs_separate']:.2f}x)"
    )
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
