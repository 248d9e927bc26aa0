"""Training one shared-backbone multi-task model with a task-weighting strategy.

The architecture x weighting split of LibMTL: the model is :class:`~dymu.models.shared.SharedNet`,
the weighting any entry of :data:`dymu.weighting.WEIGHTINGS`. Task losses are multiplied by
the scales ``w_i`` (1 / single-task loss, as in stage 1) before the weighting sees them, so
strategies start from comparable objectives. Optional auxiliary towers (METHOD.md 4) add
``gamma * L_t_aux`` to each task's loss and are dropped afterwards.

Under ``torchrun`` every rank trains on its part of each global batch with global batch
norms; the weighting combines the global batch's task gradients (:mod:`dymu.weighting.base`)
and the parameters' gradients are averaged over the ranks before each step, so a step is
the single-process one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dymu import dist
from dymu.data.batches import endless, iterate, num_batches, to_device
from dymu.models.shared import SharedNet
from dymu.models.towers import AuxTowers
from dymu.train import parallel
from dymu.train.engine import Stateless, StepLoop
from dymu.weighting import Weighting


def train_shared(
    net: SharedNet,
    weighting: Weighting,
    train_ds,
    *,
    scales: Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    towers: AuxTowers | None = None,
    desc: str = "shared",
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Train ``net`` in place; return the per-step weights, per-epoch losses and timing.

    Args:
        net: the shared model (its backbone is the shared part the weighting acts on).
        weighting: the strategy; its own parameters (uncertainty's log-variances) are trained
            with the model's.
        train_ds: the training split.
        scales: ``[T]`` loss scales ``w_i``.
        epochs, batch_size, lr, seed: Adam with a cosine schedule, like stage 0.
        device: where to train.
        towers: auxiliary towers on the shared representation, or None.
        desc: progress-bar label and the training log's name.
        run_dir: where ``logs/<desc>.jsonl`` (losses and weights every 10 steps) goes;
            None writes no log.

    Returns:
        ``weights`` ([steps][T], the strategy's weights of every step), ``epoch_losses``
        ([epochs][T], mean scaled task losses), ``seconds`` and ``images_per_s``.
    """
    modules = [net, weighting] + ([towers] if towers is not None else [])
    for m in modules:
        m.to(device).train()
    opt = _adamw(modules, weighting, lr)
    per_epoch = num_batches(train_ds, batch_size, drop_last=True)
    steps = epochs * per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    # Epoch e is the shuffle seed * 1000 + e, as epoch_bar's (and stage 0's).
    batches = endless(train_ds, batch_size, seed, shard=dist.shard())
    step = _SharedStep(
        net, weighting, towers, scales.to(device), opt, sched, device, batches, per_epoch
    )
    torch.manual_seed(seed)
    models = torch.nn.ModuleList(m for m in modules if m is not weighting)  # net, towers
    loop = StepLoop(
        name=desc, label=desc, desc=desc, run_dir=run_dir, checkpoint=None, config_hash="",
        steps=steps, every=steps, model=models, optimizer=opt, scheduler=sched, step=step,
        show=("loss",),
    )  # fmt: skip
    with parallel.global_batch(models, device):
        loop.run()
    net.eval()
    return {
        "weights": step.log_weights,
        "weights_mean": np.mean(step.log_weights, axis=0).round(6).tolist()
        if step.log_weights
        else [],
        "epoch_losses": step.epoch_losses,
        "seconds": round(loop.seconds, 2),
        "images_per_s": round(step.images / max(loop.seconds, 1e-9), 1),
    }


def epoch_bar(train_ds, batch_size: int, seed: int, epoch: int, desc: str, total: int):
    """This rank's part of one epoch's shuffle of ``train_ds`` (seed ``seed * 1000 +
    epoch``, whole batches only), behind a progress bar that rank 0 shows."""
    batches = iterate(
        train_ds, batch_size, shuffle=True, seed=seed * 1000 + epoch, drop_last=True,
        shard=dist.shard(),
    )  # fmt: skip
    return tqdm(batches, total=total, desc=desc, leave=False, disable=not dist.is_main())


def _adamw(modules: list[torch.nn.Module], weighting: Weighting, lr: float):
    """AdamW over every module's parameters; weight decay 1e-4, except on the weighting's
    own (uncertainty's log-variances are not weights to shrink)."""
    decayed = [p for m in modules if m is not weighting for p in m.parameters()]
    return torch.optim.AdamW(
        [
            {"params": decayed, "weight_decay": 1e-4},
            {"params": list(weighting.parameters()), "weight_decay": 0.0},
        ],
        lr=lr,
    )


class _SharedStep(Stateless):
    """One optimisation step of :func:`train_shared` on a batch: the scaled task losses
    (plus the auxiliary towers'), combined by the weighting strategy."""

    def __init__(
        self, net, weighting, towers, scales, opt, sched, device, batches, per_epoch
    ) -> None:
        self.net, self.weighting, self.towers = net, weighting, towers
        self.scales, self.opt, self.sched, self.device = scales, opt, sched, device
        self.shared = [p for p in net.backbone.parameters() if p.requires_grad]
        # The features the heads read: every path from the backbone to a loss passes
        # through one of them, which representation-based strategies (mgda_ub) need.
        last = net.backbone.num_layers - 1
        lows = (h.low_layer for h in net.heads.values() if h.low_layer is not None)
        self.read = sorted({last, *lows})
        modules = [net, weighting] + ([towers] if towers is not None else [])
        self.trained = [p for m in modules for p in m.parameters()]
        self.batches, self.per_epoch = batches, per_epoch  # endless; steps in one epoch
        self.log_weights: list[list[float]] = []  # [steps][T]
        self.epoch_losses: list[list[float]] = []  # [epochs][T]
        self.sums = torch.zeros(len(net.tasks), dtype=torch.float64)
        self.count = self.images = 0

    def __call__(self, i: int, log: bool) -> dict[str, float] | None:
        """One step on the next batch; at an epoch's end the weighting sees the epoch's
        mean losses. Returns this rank's scaled task losses and the strategy's weights
        when ``log``."""
        batch = next(self.batches)
        w, losses = self.descend(to_device(batch, self.device))
        self.images += dist.global_count(batch["image"].shape[0])
        self.log_weights.append([round(float(x), 6) for x in w])
        self.sums += losses.double().cpu()
        self.count += 1
        if (i + 1) % self.per_epoch == 0:
            mean = dist.all_reduce_mean(self.sums) / self.count  # the global batches' mean
            self.weighting.epoch_end(mean.float())
            self.epoch_losses.append(mean.tolist())
            self.sums, self.count = torch.zeros_like(self.sums), 0
        if not log:
            return None
        names = [t.name for t in self.net.tasks]
        return {
            "loss": float(losses.sum()),
            **{f"loss_{n}": float(v) for n, v in zip(names, losses, strict=True)},
            **{f"weight_{n}": float(v) for n, v in zip(names, w, strict=True)},
        }

    def descend(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Returns the strategy's weights [T] and the scaled task losses [T] (detached)."""
        net, tasks, towers = self.net, self.net.tasks, self.towers
        image = batch["image"]
        size = (image.shape[-2], image.shape[-1])
        feats = net.features(image)
        out = net.heads_on(feats, size)
        per_task = [t.loss(out[t.name], batch[t.name]) for t in tasks]
        if towers is not None:
            aux = towers.losses({t.name: feats[-1] for t in tasks}, size, batch)
            per_task = [loss + aux[t.name] for loss, t in zip(per_task, tasks, strict=True)]
        # A list, not a stacked tensor: each task's backward then visits only its head.
        losses = [loss * self.scales[k] for k, loss in enumerate(per_task)]
        self.opt.zero_grad(set_to_none=True)
        # MGDA-UB is the representation ("upper bound") variant by definition; PCGrad and
        # the tensioner act on the shared parameters, as their papers do.
        rep = [feats[i] for i in self.read] if self.weighting.name == "mgda_ub" else None
        w = self.weighting.backward(losses, self.shared, representation=rep)
        dist.average_gradients(self.trained)  # DDP's part, after the weighting's
        self.opt.step()
        self.sched.step()
        return w, torch.stack(losses).detach()
