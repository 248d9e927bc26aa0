"""Loss scales w_i (METHOD.md 1.5 [choice]): the one definition every stage that weighs
tasks uses (the joint stage, stages 1 and 2, the baselines through stage 1's record)."""

from __future__ import annotations

import torch

from dymu.models.anchor import Anchor
from dymu.train.loop import evaluate_model

BATCH = 64
"""Images per evaluation batch (the mean is over images, so it does not change w_i)."""


def loss_scales(stage0: Anchor, val_ds, device: torch.device) -> torch.Tensor:
    """[N] w_i = 1 / (the stage-0 anchor's mean loss on task i over the whole validation
    split): puts tasks with very different loss scales on one footing, measured on the
    single-task networks every tree is compared with (not on the joint stage's weights,
    whose anchor tree no tree runs under the private-node rule)."""
    stage0.to(device).eval()
    _, losses = evaluate_model(stage0, val_ds, stage0.tasks, BATCH, device)
    return 1.0 / torch.tensor(losses, dtype=torch.float32).clamp_min(1e-6)
