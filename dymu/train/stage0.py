"""Stage 0: train every stream alone on its own task (METHOD.md 1.1).

The streams share no parameters, so summing their losses gives each stream exactly its
own task's gradient; they are trained together only to run each layer of all streams as
one batched op (:class:`~dymu.models.anchor.StackedAnchor`). Writes ``anchor.safetensors``
and ``anchor.json`` (single-task metrics on val and test: the ``delta_m`` baselines).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dymu import dist
from dymu.artifacts import read_json, rerun_fix
from dymu.config import Config
from dymu.data import get_builder
from dymu.data.batches import check_flips, iterate, num_batches, random_hflip, to_device
from dymu.io import ensure_dir, write_json
from dymu.models.anchor import Anchor, StackedAnchor, build_anchor, load_anchor_weights, save_anchor
from dymu.models.towers import AuxTowers, build_towers
from dymu.run import resolve_device
from dymu.train import parallel
from dymu.train.checkpoint import load_checkpoint, record_matches, save_checkpoint
from dymu.train.curves import StageLog
from dymu.train.loop import evaluate, lr_lambda
from dymu.train.precision import Precision
from dymu.train.spec import resolve_specs

ANCHOR_WEIGHTS = "anchor.safetensors"
ANCHOR_JSON = "anchor.json"
CHECKPOINT = "stage0/checkpoint.pt"


def stage0_hash(cfg: Config) -> str:
    """The anchor's artifact hash: the hash of stage 0's spec (:mod:`dymu.train.spec`)."""
    return resolve_specs(cfg)["stage0"].hash


@dataclass
class Splits:
    train: Any
    val: Any
    test: Any


def load_splits(cfg: Config) -> tuple[list, Splits]:
    """The task specs of the configured data and its three splits."""
    builder = get_builder(cfg.data.name)
    builder.prepare(cfg.data, progress=True)
    specs = list(builder.info_for(cfg.data).select(cfg.data.tasks))
    splits = Splits(*(builder.load(cfg.data, s) for s in ("train", "val", "test")))
    return specs, splits


class Stage0Objective(nn.Module):
    """Every task's loss (plus its tower's, if any) on one batch: stage 0's training step,
    public so that benchmarks time exactly the step ``train_stage0`` takes.

    All of a step's differentiable work happens in ``forward``, because that is the only
    work whose gradients DistributedDataParallel synchronises. The streams and heads run
    under the precision's autocast; the losses, and the small towers, in float32.
    """

    def __init__(
        self, stacked: StackedAnchor, towers: AuxTowers | None, precision: Precision
    ) -> None:
        super().__init__()
        self.stacked = stacked
        self.towers = towers
        self.precision = precision

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        prec = self.precision
        with prec.autocast():
            out, feats = self.stacked.forward_with_features(prec.to_input(batch["image"]))
        out, feats = prec.fp32(out), prec.fp32(feats)
        losses = {t.name: t.loss(out[t.name], batch[t.name]) for t in self.stacked.tasks}
        if self.towers is not None:
            size = (batch["image"].shape[-2], batch["image"].shape[-1])
            aux = self.towers.losses(feats, size, batch)
            losses = {k: v + aux[k] for k, v in losses.items()}
        return losses


@dataclass
class _Stage0:
    """What one stage-0 run trains with, built once by :func:`_setup`."""

    cfg: Config
    device: torch.device
    prec: Precision
    splits: Any
    anchor: Anchor
    stacked: StackedAnchor
    towers: AuxTowers | None
    trained: nn.Module  # what the optimizer trains and the checkpoint holds
    opt: torch.optim.Optimizer
    sched: Any
    per_epoch: int


def _setup(cfg: Config, device: torch.device, prec: Precision) -> _Stage0:
    s0 = cfg.stage0
    with dist.main_first():  # rank 0 makes a dataset cache, the others then read it
        specs, splits = load_splits(cfg)
    check_flips(splits.train.info, {"stage0.hflip": s0.hflip})
    anchor = build_anchor(cfg.model, specs, seed=cfg.run.seed)
    stacked = StackedAnchor(anchor).to(device)
    # Beside the anchor, never in it: anchor.safetensors and its trees cannot hold them.
    towers = build_towers(anchor.tasks, anchor.streams[0], anchor.heads, s0.towers)
    # What the optimizer trains and the checkpoint holds: the streams, and towers if any.
    trained = stacked if towers is None else nn.ModuleDict({"anchor": stacked, "towers": towers})
    trained.to(device)
    prec.prepare(trained)
    params = trained.parameters()
    if s0.optimizer == "adam":
        opt = torch.optim.AdamW(params, lr=s0.lr, weight_decay=s0.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=s0.lr, momentum=0.9, weight_decay=s0.weight_decay)
    per_epoch = num_batches(splits.train, s0.batch_size, drop_last=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(s0.schedule, s0.epochs * per_epoch))
    return _Stage0(
        cfg, device, prec, splits, anchor, stacked, towers, trained, opt, sched, per_epoch
    )


def train_stage0(cfg: Config, run_dir: Path, resume: bool = False) -> tuple[Anchor, dict]:
    """Train the anchor; write its weights and metrics into ``run_dir``; return both.

    Under ``torchrun`` (:mod:`dymu.dist`) every rank trains on its shard of each
    global batch of ``stage0.batch_size`` images, so a step equals the single-process one;
    rank 0 alone validates (the other ranks' next step waits for it), checkpoints and
    writes the files, and every rank returns the anchor read back from them.
    """
    device = resolve_device(cfg.run.device)
    prec = Precision.from_config(cfg.run, device)  # fail before any work
    s0 = cfg.stage0
    dist.per_rank_batch(s0.batch_size, "stage0.batch_size")  # fail before any work
    distributed = dist.setup(device)
    main = dist.is_main()
    st = _setup(cfg, device, prec)
    h = stage0_hash(cfg)
    ckpt = Path(run_dir) / CHECKPOINT
    start = 0
    if resume and ckpt.is_file():  # every rank restores the same file
        state = load_checkpoint(ckpt, h, "stage-0", st.trained, st.opt, st.sched)
        prec.load_state_dict(state)
        start = state["step"]  # finished epochs
    if start and main:
        print(f"stage 0: resuming after epoch {start}/{s0.epochs} from {ckpt}")
    images, seconds = 0, 0.0
    curve = StageLog(run_dir, "stage0", start * st.per_epoch, enabled=main)
    # Under torchrun: global batch norms and dropouts, in place, until the block ends.
    objective = Stage0Objective(st.stacked, st.towers, prec)
    with parallel.data_parallel(objective, device) as objective:
        for epoch in range(start, s0.epochs):
            train_loss, n, took = _epoch(st, objective, epoch)
            images, seconds = images + n, seconds + took
            curve.log((epoch + 1) * st.per_epoch, **_validate(st, epoch, train_loss))
            if main and epoch + 1 < s0.epochs:  # the finished anchor supersedes the last
                save_checkpoint(
                    ckpt, h, epoch + 1, st.trained, st.opt, st.sched, **prec.state_dict()
                )
    curve.close()
    prec.release(st.trained)
    if main:
        record = _write(st, Path(run_dir), h, images, seconds, distributed)
        ckpt.unlink(missing_ok=True)
    if not distributed:
        return st.anchor, record
    dist.barrier()  # rank 0 has written the files
    # Every rank, rank 0 included, returns what rank 0 wrote: one anchor and record for all.
    return load_trained_anchor(cfg, run_dir)


def _epoch(st: _Stage0, objective, epoch: int) -> tuple[float, int, float]:
    """One epoch of steps; (mean loss of the global batches, images, seconds)."""
    cfg, s0, device = st.cfg, st.cfg.stage0, st.device
    st.trained.train()
    # Seeding per epoch (flips and dropout) makes a resumed run match an uninterrupted
    # one; every rank seeds alike and draws for the global batch.
    flip_gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + epoch)
    torch.manual_seed(cfg.run.seed * 1000 + epoch)
    part = dist.shard()
    bar = tqdm(
        iterate(
            st.splits.train,
            s0.batch_size,
            shuffle=True,
            seed=cfg.run.seed * 1000 + epoch,
            drop_last=True,
            workers=s0.workers,
            pin_memory=device.type == "cuda",
            shard=part,
        ),
        total=st.per_epoch,
        desc=f"stage 0 epoch {epoch + 1}/{s0.epochs}",
        unit="batch",
        leave=False,
        disable=not dist.is_main(),
    )
    loss_sum, images, seconds = 0.0, 0, 0.0
    for batch in bar:
        tick = time.perf_counter()
        batch = to_device(batch, device)  # from pinned memory: asynchronous
        if s0.hflip:  # on the device; the coins come from the CPU generator
            batch = random_hflip(batch, st.anchor.tasks, flip_gen, part)
        loss = sum(objective(batch).values())
        st.opt.zero_grad(set_to_none=True)
        st.prec.backward(loss)
        st.prec.step(st.opt)
        st.sched.step()
        seconds += time.perf_counter() - tick
        images += dist.global_count(batch["image"].shape[0])
        value = loss.item()
        loss_sum += value
        bar.set_postfix(loss=f"{value:.3f}", img_s=f"{images / max(seconds, 1e-9):.0f}")
    bar.close()
    # The mean over the epoch's steps of the global batch's loss (the ranks' mean).
    sums = dist.all_reduce_sums({"loss": loss_sum, "steps": st.per_epoch})
    return sums["loss"] / max(sums["steps"], 1), images, seconds


def _validate(st: _Stage0, epoch: int, train_loss: float) -> dict[str, float]:
    """The epoch's scalars for the log; every ``val_every`` epochs and after the last, rank 0
    also validates (printed, and logged as ``val_<task>_<metric>``)."""
    s0, tasks = st.cfg.stage0, st.anchor.tasks
    scalars = {"train_loss": train_loss, "lr": st.sched.get_last_lr()[0]}
    last = epoch + 1 == s0.epochs
    if dist.is_main() and ((epoch + 1) % s0.val_every == 0 or last):
        scores = evaluate(st.stacked, st.splits.val, tasks, s0.batch_size, st.device, s0.workers)
        summary = ", ".join(
            f"{t.name} {t.primary_metric} {scores[t.name][t.primary_metric]:.3f}" for t in tasks
        )
        tqdm.write(
            f"stage 0 epoch {epoch + 1}/{s0.epochs}: train loss {train_loss:.3f}, val {summary}"
        )
        for t in tasks:
            scalars[f"val_{t.name}_{t.primary_metric}"] = scores[t.name][t.primary_metric]
    return scalars


def _write(
    st: _Stage0, run_dir: Path, h: str, images: int, seconds: float, distributed: bool
) -> dict:
    """Rank 0: the trained streams back into the anchor, its val and test metrics, and
    ``anchor.safetensors`` and ``anchor.json``; returns the record."""
    s0, anchor, tasks = st.cfg.stage0, st.anchor, st.anchor.tasks
    st.stacked.write_back(anchor)
    anchor.to(st.device)
    metrics = {
        split: evaluate(anchor, ds, tasks, s0.batch_size, st.device, s0.workers)
        for split, ds in (("val", st.splits.val), ("test", st.splits.test))
    }
    record = {
        "tasks": anchor.task_names,
        "config_hash": h,
        "spec": resolve_specs(st.cfg)["stage0"].to_json(),
        "backbone": st.cfg.model.backbone,
        "metrics": metrics,
        "directions": {t.name: t.metric_directions for t in tasks},
        "primary_metric": {t.name: t.primary_metric for t in tasks},
        "conventions": {t.name: t.conventions for t in tasks if t.conventions},
        "precision": st.prec.describe(),
        "train": {
            "epochs": s0.epochs,
            "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1) if seconds else None,
        },
    }
    if distributed:
        record["train"]["processes"] = dist.world_size()
    run_dir = ensure_dir(run_dir)
    meta = {"config_hash": h, "tasks": anchor.task_names}
    save_anchor(anchor.cpu(), run_dir / ANCHOR_WEIGHTS, meta)
    write_json(run_dir / ANCHOR_JSON, record)
    return record


def load_trained_anchor(cfg: Config, run_dir: Path) -> tuple[Anchor, dict]:
    """The anchor and record that :func:`train_stage0` wrote into ``run_dir``."""
    run_dir = Path(run_dir)
    record = read_json(run_dir / ANCHOR_JSON, "stage-0 record", rerun_fix(run_dir))
    specs = get_builder(cfg.data.name).info_for(cfg.data).select(cfg.data.tasks)
    anchor = build_anchor(cfg.model, specs, seed=cfg.run.seed)
    load_anchor_weights(anchor, run_dir / ANCHOR_WEIGHTS)
    return anchor, record


def ensure_anchor(cfg: Config, run_dir: Path, resume: bool = False) -> tuple[Anchor, dict]:
    """The run's anchor: loaded when its files match the config, trained otherwise."""
    run_dir = Path(run_dir)
    weights, record_path = run_dir / ANCHOR_WEIGHTS, run_dir / ANCHOR_JSON
    main = dist.is_main()
    if dist.main_decides(weights.is_file() and record_matches(record_path, stage0_hash(cfg))):
        anchor, record = load_trained_anchor(cfg, run_dir)
        if main:
            print(f"stage 0: using the trained anchor in {run_dir} (config unchanged)")
        return anchor, record
    if main and weights.is_file() and record_path.is_file():
        print(f"stage 0: {weights} was trained with another config; training again")
    return train_stage0(cfg, run_dir, resume=resume)
