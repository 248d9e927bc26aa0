"""Loss scales w_i (METHOD.md 1.5 [choice]): one place for every stage that weighs tasks."""

from __future__ import annotations

import torch

from dymu.data.batches import iterate, to_device
from dymu.models.anchor import Anchor


@torch.no_grad()
def loss_scales(anchor: Anchor, ds, batch_size: int, device: torch.device, batches: int = 4):
    """w_i = 1 / (the anchor's mean loss on task i over a few batches): puts tasks with very
    different loss scales on one footing (METHOD.md 1.5 [choice])."""
    anchor.eval()
    totals = torch.zeros(len(anchor.tasks))
    count = 0
    for _, batch in zip(range(batches), iterate(ds, batch_size, shuffle=False), strict=False):
        batch = to_device(batch, device)
        out = anchor(batch["image"])
        totals += torch.stack([t.loss(out[t.name], batch[t.name]).cpu() for t in anchor.tasks])
        count += 1
    return 1.0 / (totals / max(count, 1)).clamp_min(1e-6)
