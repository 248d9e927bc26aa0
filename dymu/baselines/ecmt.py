"""The ECMT-style baseline (METHOD.md 1.8, 1.11): one slimmable shared encoder, task decoders.

ECMT (Aich et al., ICCV 2023, arXiv 2308.11744; its code is not public) makes a multi-task
network's encoder and decoders slimmable: the budget sets the shared encoder's width and the
task preference each decoder's. Here it is built from dymu's own parts, so that it is
priced, run, calibrated and exported exactly as dymu's configurations are: the encoder is
the first L - 1 layers of one stream, shared by every task, and task j's decoder is its own
stream's last layer with its head, i.e. the space's cheapest tree
(:meth:`~dymu.space.tree.TreeSpec.all_sharing` on stream 0) at widths
(:func:`configuration`).

**Training** starts from the same initial weights as the other baselines and runs
``baselines.epochs`` epochs of the sandwich rule over widths: every step the full-width
network, the narrowest one and :data:`RANDOM_CONFIGS` random ones (one encoder width, one
width per decoder) on the same batch, with in-place distillation of each narrower
configuration's outputs towards the full width's, and ECMT's configuration-invariant
distillation (CI-KD) of its encoder output towards the first channels of the full encoder's:

    sum_i w_i L_i(full) + sum_c [ sum_i w_i (L_i(c) + D(y_c,i, y_full,i)) + D(f_c, f_full[:, :k]) ]

with D :func:`~dymu.train.joint.distillation` and w_i the search's loss scales. Full-width
nodes train their running statistics; narrowed ones use batch statistics and are
calibrated per configuration for evaluation (:mod:`dymu.train.calibrate`).

**Selection**, ECMT's rule (:func:`ecmt_configuration`): decoder widths follow the
preference (the most preferred task's decoder at full width, task j's at the width nearest
``r_j / max r``), then the encoder takes the widest width whose configuration fits the
budget; where none does, the least preferred decoder that can narrows a step, and so on.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dymu.data import input_size
from dymu.errors import UserError
from dymu.models.anchor import Anchor, build_anchor
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import anchor_flops, space_shape
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.train.calibrate import calibrated, calibration_images
from dymu.train.engine import Stateless, StepLoop
from dymu.train.joint import distillation

RANDOM_CONFIGS = 2
"""Random configurations per step beside the full-width and the narrowest one."""


def configuration(encoder: float, decoders: Sequence[float], num_layers: int) -> TreeSpec:
    """The encoder (layers 0 to L - 2 of stream 0, shared) at width ``encoder`` and task j's
    decoder (its own last layer) at ``decoders[j]``."""
    n = len(decoders)
    parents = TreeSpec.all_sharing(n, num_layers, 0).parents
    widths = [[encoder] * n for _ in range(num_layers - 1)] + [list(decoders)]  # [L][N]
    return TreeSpec(parents, widths).canonical()


def ecmt_configuration(
    preference: Sequence[float], budget: float, space, widths: Sequence[float]
) -> TreeSpec:
    """ECMT's rule (module docstring) for ``preference`` [N] at ``budget`` (a fraction of
    the anchor's FLOPs) on ``space`` (slimmable, with ``widths``)."""
    r = np.asarray(preference, dtype=np.float64)
    ladder = sorted(widths)
    n, num_layers = len(r), space_shape(space)[1]
    top = float(r.max())
    decoders = [min(ladder, key=lambda w, x=float(x): abs(w - max(x / top, ladder[0]))) for x in r]
    limit = budget * anchor_flops(space)
    for j in [*np.argsort(r, kind="stable").tolist(), None]:  # least preferred first
        while True:
            for encoder in reversed(ladder):
                config = configuration(encoder, decoders, num_layers)
                if config.flops(space) <= limit:
                    return config
            if j is None or decoders[j] == ladder[0]:
                break
            decoders[j] = ladder[ladder.index(decoders[j]) - 1]
    smallest = configuration(ladder[0], [ladder[0]] * n, num_layers).flops(space)
    raise UserError(
        f"budget {budget:g} is below the ECMT-style network's narrowest configuration "
        f"({smallest / anchor_flops(space):.3f} of the anchor's FLOPs)"
    )


class _EcmtStep(Stateless):
    """One sandwich step over widths (module docstring's loss)."""

    def __init__(self, ctx, net: Anchor, widths, optimizer, scheduler, batches, rng) -> None:
        self.ctx, self.net, self.widths = ctx, net, tuple(sorted(widths))
        self.optimizer, self.scheduler, self.batches, self.rng = optimizer, scheduler, batches, rng
        self.n, self.num_layers = len(net.tasks), net.num_layers

    def configs(self) -> list[TreeSpec]:
        """The full-width network, the narrowest, then the random ones."""
        n, num_layers, w = self.n, self.num_layers, self.widths
        out = [
            configuration(1.0, [1.0] * n, num_layers),
            configuration(w[0], [w[0]] * n, num_layers),
        ]
        for _ in range(RANDOM_CONFIGS):
            picks = self.rng.choice(np.asarray(w), size=n + 1).tolist()  # encoder, decoders
            out.append(configuration(picks[0], picks[1:], num_layers))
        return out

    def __call__(self, i: int, log: bool) -> dict[str, float] | None:
        batch = self.ctx.to_device(next(self.batches))
        image, encoder = batch["image"], (self.num_layers - 2, 0)
        full, *narrower = self.configs()
        full_nodes: dict = {}
        target = TreeNet(self.net, full)(image, nodes=full_nodes)
        labels = self.ctx.scaled_losses(target, batch).sum()
        distilled = features = torch.zeros((), device=labels.device)
        scales = self.ctx.scales.to(labels.device)
        for config in narrower:
            nodes: dict = {}
            out = TreeNet(self.net, config)(image, nodes=nodes)
            labels = labels + self.ctx.scaled_losses(out, batch).sum()
            for k, t in enumerate(self.ctx.tasks):
                distilled = distilled + scales[k] * distillation(out[t.name], target[t.name])
            own = nodes[encoder]  # [B, k, h, w]
            features = features + distillation(own, full_nodes[encoder][:, : own.shape[1]])
        loss = labels + distilled + features
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        if not log:
            return None
        count = 1 + len(narrower)
        return {"labels": labels.item() / count, "distill": distilled.item() / len(narrower),
                "features": features.item() / len(narrower)}  # fmt: skip


def train_ecmt(ctx, widths: Sequence[float], budgets: Sequence[float]) -> dict[str, Any]:
    """Train the ECMT-style network on ``ctx`` (:class:`dymu.baselines.run._Context`) and
    evaluate ECMT's rule over the sweep at each of ``budgets``: one entry per budget with
    its points (test split), mean FLOPs fraction and mean parameters."""
    cfg, b = ctx.cfg, ctx.cfg.baselines
    net = build_anchor(cfg.model, ctx.specs, seed=cfg.run.seed).to(ctx.device).train()
    space = anchor_space(net, input_size(cfg.data), widths)
    for budget in budgets:  # every budget must be reachable before anything trains
        ecmt_configuration(np.ones(len(ctx.tasks)), budget, space, widths)
    opt = torch.optim.AdamW(net.parameters(), lr=b.lr, weight_decay=1e-4)
    steps = ctx.steps()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rng = np.random.default_rng(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    step = _EcmtStep(ctx, net, widths, opt, sched, ctx.batches(cfg.run.seed), rng)
    loop = StepLoop(
        name="ecmt", label="ecmt", desc="ecmt", run_dir=ctx.run_dir / "baselines",
        checkpoint=None, config_hash="", steps=steps, every=steps, model=net, optimizer=opt,
        scheduler=sched, step=step, show=("labels", "distill", "features"),
    )  # fmt: skip
    tick = time.perf_counter()
    loop.run()
    seconds = time.perf_counter() - tick
    net.eval()
    images = calibration_images(ctx.splits.train, ctx.device)
    full = anchor_flops(space)
    per_budget, nets = {}, {}
    for budget in budgets:
        points, fractions, params, hashes = [], [], [], set()
        for k, r in enumerate(ctx.preferences):
            config = ecmt_configuration(r, budget, space, widths)
            key = config.hash()
            hashes.add(key)
            if key not in nets:
                nets[key] = calibrated(net, config, images)
            label = f"r{k} enc {config.width(0, 0):g} dec " + "/".join(
                f"{config.width(net.num_layers - 1, j):g}" for j in range(len(ctx.tasks))
            )
            points.append(ctx.point(nets[key], label, r))
            fractions.append(config.flops(space) / full)
            params.append(config.params(space))
        per_budget[f"{budget:g}"] = {
            "points": points,
            "flops_fraction": float(np.mean(fractions)),
            "params": float(np.mean(params)),
            "configurations": len(hashes),
        }
    used = configuration(1.0, [1.0] * len(ctx.tasks), net.num_layers).params(space)
    return {
        "widths": list(widths),
        "budgets": per_budget,
        "train_seconds": seconds,
        "params_stored": used,
        "log": {},
    }
