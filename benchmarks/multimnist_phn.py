"""MultiMNIST in the Pareto-hypernetwork protocol: PHN-LS and PHN-EPO on a LeNet target.

Protocol of Navon et al., "Learning the Pareto Front with Hypernetworks" (ICLR 2021) and
their public trainer (github.com/AvivNavon/pareto-hypernetworks,
``experiments/multimnist/trainer.py``): a two-head LeNet (their ``PHNTarget``: conv 9x9 10
channels, max-pool, conv 5x5 20 channels, max-pool, linear 50, two 10-way linear heads),
two tasks (``left``, ``right``), one Dirichlet(0.2) training ray per step, Adam, and at the
end the test cross-entropies of both tasks for 25 rays evenly spread in angle over
[0.1, pi/2 - 0.1] (normalised to sum 1), summarised by their exact hypervolume with
reference point (2, 2). PHN-BN is skipped: the LeNet has no normalisation layer.

Differences, deliberately: the data is dymu's ``multimnist`` (28x28, generated from the
MNIST idx files; the paper uses Lin et al.'s 36x36 pickles), so the first feature map is
20x20 and the linear layer takes 20*3*3 inputs; the hypernet is :class:`ParetoHypernet`
(chunked, shared output layer, offsets around the target's initialisation) instead of
PHN's one linear head per layer; and the default run is a few epochs on a CPU.

    python benchmarks/multimnist_phn.py --root DATA --out benchmarks/results/multimnist_phn.json

DATA is a folder holding ``mnist/`` with the four original idx files (default:
``$DYMU_SHARED_DATA``). Prints a table and saves JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dymu.config import DataConfig
from dymu.data import get_builder
from dymu.data.base import ArrayDataset
from dymu.errors import DymuError, UserError
from dymu.evaluate.metrics import hypervolume
from dymu.io import write_json
from dymu.pareto.phn import ParetoHypernet, train_phn

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("left", "right")
REFERENCE = (2.0, 2.0)
METHODS = {"PHN-LS": "linear", "PHN-EPO": "epo"}


class MultiLeNet(nn.Module):
    """PHN's MultiMNIST target at 28x28: ``{"left": logits [B, 10], "right": logits [B, 10]}``.

    As their ``PHNTarget``: ReLU and 2x2 max-pool after each convolution, no ReLU after the
    shared linear layer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 10, 9)  # [B, 1, 28, 28] -> [B, 10, 20, 20], pool -> 10x10
        self.conv2 = nn.Conv2d(10, 20, 5)  # [B, 10, 10, 10] -> [B, 20, 6, 6], pool -> 3x3
        self.fc = nn.Linear(20 * 3 * 3, 50)
        self.heads = nn.ModuleDict({t: nn.Linear(50, 10) for t in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        z = self.fc(x.flatten(1))  # [B, 20, 3, 3] -> [B, 180] -> [B, 50]
        return {t: head(z) for t, head in self.heads.items()}


class Batches:
    """Shuffled mini-batches of a split; every ``iter()`` is one more epoch."""

    def __init__(self, ds: ArrayDataset, batch_size: int, seed: int) -> None:
        self.ds = ds
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.ds) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        order = self.rng.permutation(len(self.ds))
        for start in range(0, len(order), self.batch_size):
            yield one_channel(self.ds.batch(order[start : start + self.batch_size]))


def one_channel(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """dymu returns grey images with the channel repeated; LeNet reads one channel."""
    return {**batch, "image": batch["image"][:, :1].contiguous()}  # [B, 3, H, W] -> [B, 1, H, W]


def task_losses(out: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
    """Mean cross-entropy of each task, stacked as [left, right]."""
    return torch.stack([F.cross_entropy(out[t], batch[t]) for t in TASKS])


def test_rays(count: int = 25) -> np.ndarray:
    """PHN's evaluation rays: angles evenly spread over [0.1, pi/2 - 0.1], rescaled to sum 1.

    [count, 2]; the first component weighs ``left``.
    """
    angles = np.linspace(0.1, np.pi / 2 - 0.1, count)
    rays = np.stack([np.cos(angles), np.sin(angles)], axis=1)  # [count, 2]
    return rays / rays.sum(axis=1, keepdims=True)


@torch.no_grad()
def evaluate(model: ParetoHypernet, ds: ArrayDataset, rays: np.ndarray, batch: int) -> dict:
    """Test cross-entropy (mean over samples) and accuracy of both tasks for every ray."""
    model.eval()
    n = len(ds)
    chunks = [one_channel(ds.batch(np.arange(s, min(s + batch, n)))) for s in range(0, n, batch)]
    losses, accs = [], []
    for ray in rays:
        r = torch.tensor(ray, dtype=torch.float32)
        loss_sum, correct = np.zeros(2), np.zeros(2)
        for b in chunks:
            out = model(b["image"], r)
            for i, t in enumerate(TASKS):
                loss_sum[i] += float(F.cross_entropy(out[t], b[t], reduction="sum"))
                correct[i] += int((out[t].argmax(1) == b[t]).sum())
        losses.append((loss_sum / n).tolist())
        accs.append((correct / n).tolist())
    model.train()
    return {
        "hv": hypervolume(np.array(losses), np.array(REFERENCE)),
        "losses": losses,
        "accuracy": accs,
    }


def run_method(name: str, args: argparse.Namespace, train: ArrayDataset, test: ArrayDataset):
    """Train one PHN from the seeded initialisation, evaluating the test HV after each epoch."""
    torch.manual_seed(args.seed)  # the same target and hypernet initialisation per method
    model = ParetoHypernet(MultiLeNet(), num_tasks=2, chunk_size=args.chunk_size)
    batches = Batches(train, args.batch_size, args.seed)
    rays = test_rays()
    per_epoch: list[dict] = []
    seen: list[list[float]] = []  # training losses of the current epoch
    last: dict = {}

    def after_step(step: int, record: dict) -> None:
        seen.append(record["losses"])
        if (step + 1) % len(batches):
            return
        epoch = {"epoch": len(per_epoch) + 1, "train_loss": np.mean(seen, axis=0).round(4).tolist()}
        seen.clear()
        if args.eval_each_epoch or epoch["epoch"] == args.epochs:
            tic = time.perf_counter()
            last.update(evaluate(model, test, rays, args.eval_batch))
            epoch["test_hv"] = round(last["hv"], 4)
            epoch["eval_s"] = round(time.perf_counter() - tic, 1)
        per_epoch.append(epoch)
        print(f"{name}: {json.dumps(epoch)}", flush=True)

    history = train_phn(
        model,
        batches,
        task_losses,
        steps=args.epochs * len(batches),
        lr=args.lr,
        solver=METHODS[name],
        alpha=args.alpha,
        seed=args.seed,
        on_step=after_step,
    )
    train_s = sum(history["step_s"])  # data + forward + backward + solver, no evaluation
    return {
        "solver": METHODS[name],
        "steps": history["steps"],
        "hypervolume": round(last["hv"], 4),
        "test_losses": [[round(v, 4) for v in row] for row in last["losses"]],
        "test_accuracy": [[round(v, 4) for v in row] for row in last["accuracy"]],
        "train_s": round(train_s, 1),
        "ms_per_step": round(1000 * train_s / history["steps"], 1),
        "per_epoch": per_epoch,
        "epo_moves": history.get("epo_moves"),
        "parameters": {
            "target": sum(p.numel() for p in model.target.parameters()),
            "generated": model.total,
            "hypernet": sum(p.numel() for p in model.hypernet_parameters()),
            "chunks": [model.num_chunks, model.chunk_size],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        default=os.environ.get("DYMU_SHARED_DATA"),
        help="folder holding mnist/ with the idx files ($DYMU_SHARED_DATA)",
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--alpha", type=float, default=0.2, help="Dirichlet of training rays")
    parser.add_argument("--chunk-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-batch", type=int, default=1000)
    parser.add_argument(
        "--eval-each-epoch",
        action="store_true",
        help="test HV after every epoch, not just the last",
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/multimnist_phn.json")
    args = parser.parse_args()
    if not args.root:
        raise UserError("multimnist_phn: pass --root DATA (a folder holding mnist/)")
    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("multimnist_phn: --epochs and --batch-size must be >= 1")
    torch.set_num_threads(args.threads)

    builder = get_builder("multimnist")
    cfg = DataConfig(name="multimnist", root=args.root, seed=args.seed)
    summary = builder.prepare(cfg)
    train, test = builder.load(cfg, "train"), builder.load(cfg, "test")
    result: dict = {
        "benchmark": "multimnist_phn",
        "command": "python benchmarks/multimnist_phn.py "
        + " ".join(sys.argv[1:]).replace(str(args.root), "DATA"),
        "protocol": {
            "target": "PHN's MultiMNIST LeNet at 28x28 (conv9x9x10, pool, conv5x5x20, pool, "
            "fc50, two 10-way heads)",
            "data": "dymu multimnist (28x28 from the MNIST idx files), seed "
            f"{args.seed}; train {summary['splits']['train']}, test "
            f"{summary['splits']['test']} (val {summary['splits']['val']} unused)",
            "training_rays": f"Dirichlet({args.alpha}, {args.alpha}), one per step",
            "test_rays": "25 angles evenly spread over [0.1, pi/2 - 0.1], normalised to sum 1",
            "objectives": "mean test cross-entropy of left and right",
            "hypervolume": "exact (moocore), reference point (2, 2), losses not normalised",
        },
        "settings": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": "Adam",
            "lr": args.lr,
            "alpha": args.alpha,
            "chunk_size": args.chunk_size,
            "hidden": 100,
            "seed": args.seed,
        },
        "test_rays": test_rays().round(6).tolist(),
        "skipped": {"PHN-BN": "the LeNet target has no normalisation layer"},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": "cpu",
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "methods": {},
    }
    start = time.perf_counter()
    for name in args.methods:
        result["methods"][name] = run_method(name, args, train, test)
    result["total_s"] = round(time.perf_counter() - start, 1)

    ends = test_rays()[[0, -1], 0]
    print(f"\nMultiMNIST test, {args.epochs} epochs, HV with reference (2, 2):")
    print(
        f"{'method':<9} {'HV':>7} {'train s':>8} {'ms/step':>8}  test losses [left, right] at "
        f"r_left = {ends[0]:.3f} / {ends[1]:.3f}"
    )
    for name, m in result["methods"].items():
        first, last = m["test_losses"][0], m["test_losses"][-1]
        print(
            f"{name:<9} {m['hypervolume']:>7.4f} {m['train_s']:>8.1f} {m['ms_per_step']:>8.1f}"
            f"  {first} / {last}"
        )
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DymuError as exc:  # bad input or a failed step: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
