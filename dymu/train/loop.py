"""Pieces every training stage shares: evaluation over a split and learning-rate schedules
(batches and flips are in :mod:`dymu.data.batches`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from dymu.data.base import MultiTaskDataset
from dymu.data.batches import iterate, to_device
from dymu.tasks import Task


@torch.no_grad()
def evaluate_model(
    model: Callable[[Tensor], dict[str, Tensor]],
    ds: MultiTaskDataset,
    tasks: Sequence[Task],
    batch_size: int,
    device: torch.device,
    workers: int = 0,
) -> tuple[dict[str, dict[str, float]], list[float]]:
    """(metrics per task, mean loss per task) of any multi-task model over a whole split.

    ``model`` maps an image batch to raw outputs keyed by task (already in eval mode);
    metrics are dataset-level statistics, losses the per-image mean.
    """
    metrics = {t.name: t.new_metric() for t in tasks}
    # Loss sums stay on the device: no host sync per batch (the metrics need none either).
    totals, count = torch.zeros(len(tasks), dtype=torch.float64, device=device), 0
    for batch in iterate(ds, batch_size, shuffle=False, workers=workers):
        batch = to_device(batch, device)
        out = model(batch["image"])
        b = batch["image"].shape[0]
        for k, t in enumerate(tasks):
            metrics[t.name].update(out[t.name], batch[t.name])
            totals[k] += t.loss(out[t.name], batch[t.name]).double() * b
        count += b
    return {n: m.compute() for n, m in metrics.items()}, (totals / max(count, 1)).tolist()


def evaluate(
    model: nn.Module,
    ds: MultiTaskDataset,
    tasks: Sequence[Task],
    batch_size: int,
    device: torch.device,
    workers: int = 0,
) -> dict[str, dict[str, float]]:
    """Every task's metrics over the whole split, with ``model`` in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    metrics, _ = evaluate_model(model, ds, tasks, batch_size, device, workers)
    model.train(was_training)
    return metrics


def lr_lambda(schedule: str, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at a step: cosine to 0, x0.1 at 2/3, or flat."""
    if schedule == "cosine":
        return lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / total_steps))
    if schedule == "step":
        return lambda s: 0.1 if s >= 2 * total_steps // 3 else 1.0
    return lambda s: 1.0
