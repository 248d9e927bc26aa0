"""Datasets and tasks fit together: oracle predictions built from the targets score perfectly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dymu.config import DataConfig, SynthConfig
from dymu.data import load_split
from dymu.tasks import build_task


def _oracle(task, target: torch.Tensor) -> torch.Tensor:
    """A raw head output whose prediction is exactly ``target``."""
    if task.kind in ("semseg", "parts", "classification"):
        onehot = torch.nn.functional.one_hot(target.clamp_min(0), task.out_channels).float()
        logits = 20.0 * onehot  # [B, H, W, C] (or [B, C])
        return logits.permute(0, 3, 1, 2) if task.dense else logits
    if task.kind in ("edges", "saliency"):
        return 20.0 * (2 * target - 1)  # logits of 0/1 targets
    return target.clone()  # depth, normals


@pytest.mark.parametrize("tasks", [None, ["material"]])
def test_synthscenes_oracle_scores_perfectly(tmp_path, tasks):
    cfg = DataConfig(
        cache_dir=str(tmp_path),
        size=[32, 32],
        tasks=tasks,
        synth=SynthConfig(num_train=4, num_val=4, num_test=6),
    )
    ds = load_split(cfg, "test")
    batch = ds.batch(np.arange(len(ds)))
    for spec in ds.tasks:
        task = build_task(spec)
        pred = _oracle(task, batch[spec.name])
        assert pred.shape[1] == task.out_channels
        metric = task.new_metric()
        metric.update(pred, batch[spec.name])
        scores = metric.compute()
        assert set(scores) == set(task.metric_directions)
        for name, value in scores.items():
            best = 100.0 if task.metric_directions[name] else 0.0
            assert value == pytest.approx(best, abs=0.05), (spec.name, name, value)
        assert torch.isfinite(task.loss(pred, batch[spec.name]))
