"""The joint stage (METHOD.md 1.9): the independent streams fine-tuned together on trees.

Stage 0 trains every stream alone, so a cross-task edge feeds a node features it has never
seen. This stage, between the affinity estimate and stage 1, fine-tunes all streams (and
heads) at once on trees drawn from the space, with the sandwich rule of one-shot NAS: every
step runs

- the anchor tree (every task on its own stream; left out with ``joint.private``, the
  default, where the anchor tree runs stage 0's weights and has nothing to train),
- a cheapest tree (every task on one stream's trunk: with ``joint.trunk: best``, the
  default, the stream whose cheapest tree does best on stage 0's weights, chosen once, so
  that the trees tight budgets derive train every step; with ``random``, a new one each step),
- ``joint.random_trees`` trees with uniformly random parents,

on the same batch, and sums their losses. Each tree's loss is its label loss plus in-place
distillation towards the frozen stage-0 anchor's outputs (the teacher every tree should
approximate; with the anchor tree in the sandwich it still drifted, by 6-23% in validation
loss on the default config, which is why private nodes keep stage 0's weights):

    sum_trees sum_i w_i [ L_i(y_T, labels) + distill * ||y_T,i - y_0,i||^2 / Var(y_0,i) ]

with w_i = 1 / (the stage-0 anchor's own loss on task i). BatchNorm keeps stage 0's
running statistics (eval mode): one set of statistics serves every tree, and folding stays
exact. Only weights move, so every tree's FLOPs are unchanged.

The fine-tuned weights serve shared and post-branch nodes: with ``stage2.private_nodes``
(the default) a tree's private nodes, those on their own stream's path for their own task
alone, keep stage 0's weights (:class:`~dymu.space.treenet.TreeNet`), so the anchor tree
stays the single-task anchor whatever this stage does to it.

``anchor.safetensors`` and ``anchor.json`` stay the independent single-task baseline of
``delta_m``; this stage writes ``joint.safetensors`` (same layout, loadable with
:func:`~dymu.models.anchor.load_anchor_weights`) and ``joint.json``, and every
``run.checkpoint_every`` steps ``joint/checkpoint.pt`` for ``--resume``. Under ``torchrun``
every rank draws the same trees, holds its part of each global batch, and averages the
gradients before each step (:func:`dymu.dist.average_gradients`); rank 0 alone writes.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dymu import dist
from dymu.config import Config, section_hash
from dymu.data.batches import endless, random_hflip, to_device
from dymu.models.anchor import Anchor, load_anchor_weights
from dymu.run import resolve_device
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.train.checkpoint import (
    record_matches,
    rng_state,
    set_rng_state,
    write_finished,
)
from dymu.train.engine import StepLoop
from dymu.train.loop import evaluate_model
from dymu.train.scales import loss_scales
from dymu.train.stage0 import stage0_hash

JOINT_WEIGHTS = "joint.safetensors"
JOINT_JSON = "joint.json"
CHECKPOINT = "joint/checkpoint.pt"


def joint_hash(cfg: Config) -> str:
    """What the tree-aware streams depend on: the joint settings and the anchor."""
    return section_hash(cfg, "joint") + "-" + stage0_hash(cfg)


def trees_hash(cfg: Config) -> str:
    """The hash of the streams that every tree runs on: the joint stage's when it runs,
    otherwise stage 0's (what stages 1 and 2 build on)."""
    return joint_hash(cfg) if cfg.joint.steps > 0 else stage0_hash(cfg)


def sandwich(
    n: int,
    num_layers: int,
    random_trees: int,
    rng: np.random.Generator,
    anchor_tree: bool = True,
    trunk: int | None = None,
) -> list[TreeSpec]:
    """One step's trees: the anchor tree (unless ``anchor_tree`` is False), a cheapest tree
    on ``trunk`` (a random one when None), and ``random_trees`` uniformly random trees
    (drawn from ``rng`` in this fixed order; the random trunk is drawn either way, so a
    fixed trunk leaves the random trees as they were)."""
    drawn = int(rng.integers(n))
    trunk = drawn if trunk is None else trunk
    trees = [TreeSpec.no_sharing(n, num_layers)] if anchor_tree else []
    trees.append(TreeSpec.all_sharing(n, num_layers, trunk))
    trees += [TreeSpec.random(n, num_layers, rng).canonical() for _ in range(random_trees)]
    return trees


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per image, mean (student - teacher)^2 over its elements divided by the variance of the
    teacher's, then the mean over images: a scale-free output distance (1 = as far off as
    the teacher's own mean), and a mean of per-image terms, so that ranks holding equal
    parts of a batch average to the whole batch's value."""
    teacher = teacher.detach()
    err = (student - teacher).flatten(1).pow(2).mean(1)  # [B]
    return (err / teacher.flatten(1).var(1).clamp_min(1e-8)).mean()


def train_joint(
    cfg: Config, run_dir: Path, anchor: Anchor, train_ds, val_ds, resume: bool = False
) -> tuple[Anchor, dict[str, Any]]:
    """Fine-tune a copy of ``anchor`` on trees; write ``joint.safetensors`` and its record.

    Returns the tree-aware anchor (``anchor`` itself, the stage-0 streams, is not changed).
    """
    js = cfg.joint
    device = resolve_device(cfg.run.device)
    dist.per_rank_batch(js.batch_size, "joint.batch_size")  # fail before any work
    dist.setup(device)
    main, part = dist.is_main(), dist.shard()
    teacher = anchor.to(device).eval()
    teacher.requires_grad_(False)
    # joint.private: private nodes run stage 0's weights, as the trees will at inference;
    # the anchor tree (all private) then trains nothing and leaves the sandwich.
    private = teacher if js.private else None
    student = copy.deepcopy(teacher)
    student.requires_grad_(True)
    student.eval()  # BatchNorm keeps stage 0's running statistics; no dropout
    n, num_layers, tasks = len(anchor.tasks), anchor.num_layers, anchor.tasks
    scales = loss_scales(teacher, val_ds, js.batch_size, device).to(device)  # [N] w_i
    params = student.parameters()
    if js.optimizer == "adam":
        opt = torch.optim.AdamW(params, lr=js.lr, weight_decay=js.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=js.lr, momentum=0.9, weight_decay=js.weight_decay)
    # Cosine decay to 0 over the stage (Python floats: the checkpoint loads weights-only).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, js.steps) / js.steps))
    )
    trunk, trunk_losses = None, None
    if js.trunk == "best":
        trunk, trunk_losses = best_trunk(teacher, scales, val_ds, js.batch_size, device)
        if main:
            print(f"joint stage: cheapest trees on {tasks[trunk].name}'s trunk")
    rng = np.random.default_rng(cfg.run.seed + 7)
    flip_gen = torch.Generator().manual_seed(cfg.run.seed + 7)

    def load_state(state: dict[str, Any]) -> None:
        set_rng_state(rng, state["numpy_rng"])
        flip_gen.set_state(state["flip_rng"])

    loop = StepLoop(
        name="joint",
        label="joint stage",
        desc="joint stage (streams on trees)",
        run_dir=run_dir,
        checkpoint=Path(run_dir) / CHECKPOINT,
        config_hash=joint_hash(cfg),
        steps=js.steps,
        every=cfg.run.checkpoint_every,
        model=student,
        optimizer=opt,
        scheduler=sched,
        state=lambda: {"numpy_rng": rng_state(rng), "flip_rng": flip_gen.get_state()},
        load_state=load_state,
        show=("labels", "distill"),
    )
    batches = endless(
        train_ds,
        js.batch_size,
        cfg.run.seed + 7,
        start=loop.resume(resume),
        shard=part,
        workers=cfg.stage0.workers,
        pin_memory=device.type == "cuda",
    )

    def step(i: int, log: bool) -> dict[str, float] | None:
        trees = sandwich(
            n, num_layers, js.random_trees, rng, anchor_tree=private is None, trunk=trunk
        )
        batch = to_device(next(batches), device)
        if js.hflip:
            batch = random_hflip(batch, tasks, flip_gen, part)
        with torch.no_grad():
            target = teacher(batch["image"])
        labels = distilled = torch.zeros((), device=device)
        for tree in trees:
            out = TreeNet(student, tree, private)(batch["image"])
            for k, t in enumerate(tasks):
                labels = labels + scales[k] * t.loss(out[t.name], batch[t.name])
                distilled = distilled + scales[k] * distillation(out[t.name], target[t.name])
        loss = (labels + js.distill * distilled) / len(trees)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(student.parameters())  # the global batch's mean gradient
        opt.step()
        sched.step()
        if not log:
            return None
        sums = dist.all_reduce_sums({"labels": labels.item(), "distill": distilled.item()})
        scale = dist.world_size() * len(trees)  # every rank takes part
        return {**{k: v / scale for k, v in sums.items()}, "lr": sched.get_last_lr()[0]}

    last = loop.run(step)
    seconds = loop.seconds
    student.requires_grad_(False)
    meta = {"config_hash": loop.config_hash, "tasks": anchor.task_names}
    record: dict[str, Any] = {
        **meta,
        "steps": js.steps,
        "seconds": round(seconds, 2),
        "images_per_s": round(js.steps * js.batch_size / max(seconds, 1e-9), 1),
        "final": {k: last[k] for k in ("labels", "distill") if k in last},
    }
    if trunk is not None:
        record["trunk"] = tasks[trunk].name
        record["trunk_weighted_losses"] = trunk_losses
    if main:
        record["val_losses"] = _val_losses(
            teacher, student, val_ds, cfg.joint.batch_size, device, private, trunk or 0
        )
    if dist.world_size() > 1:
        record["processes"] = dist.world_size()
    run_dir = Path(run_dir)
    write_finished(
        run_dir / JOINT_WEIGHTS, run_dir / JOINT_JSON, student, meta, record, loop.checkpoint
    )
    return student.cpu(), record


@torch.no_grad()
def best_trunk(
    anchor: Anchor, scales: torch.Tensor, val_ds, batch_size: int, device
) -> tuple[int, dict[str, float]]:
    """The stream whose cheapest tree (every task on its trunk) has the lowest weighted
    validation loss sum_i w_i L_i on ``anchor``'s weights, and that loss per trunk.

    Every rank computes it over the whole split, so all ranks agree without a broadcast.
    """
    n, num_layers = len(anchor.tasks), anchor.num_layers
    weighted = {}
    for k, stream in enumerate(anchor.tasks):
        net = TreeNet(anchor, TreeSpec.all_sharing(n, num_layers, k))
        _, losses = evaluate_model(net, val_ds, anchor.tasks, batch_size, device)
        weighted[stream.name] = sum(w * v for w, v in zip(scales.tolist(), losses, strict=True))
    best = min(range(n), key=lambda k: weighted[anchor.tasks[k].name])
    return best, weighted


@torch.no_grad()
def _val_losses(
    teacher: Anchor,
    student: Anchor,
    val_ds,
    batch_size: int,
    device,
    private: Anchor | None,
    trunk: int = 0,
) -> dict:
    """Validation losses of the anchor tree and the cheapest tree on ``trunk``, before
    (stage 0's streams) and after this stage: what the stage bought, in the record."""
    n, num_layers = len(teacher.tasks), teacher.num_layers
    out = {}
    for name, tree in (
        ("anchor_tree", TreeSpec.no_sharing(n, num_layers)),
        ("cheapest_tree", TreeSpec.all_sharing(n, num_layers, trunk)),
    ):
        for when, net in (
            ("stage0", TreeNet(teacher, tree)),
            ("joint", TreeNet(student, tree, private)),
        ):
            _, losses = evaluate_model(net, val_ds, teacher.tasks, batch_size, device)
            out[f"{name}/{when}"] = dict(zip(teacher.task_names, losses, strict=True))
    return out


def ensure_joint(
    cfg: Config, run_dir: Path, anchor: Anchor, train_ds, val_ds, resume: bool = False
) -> Anchor:
    """The streams every tree runs on: the stage-0 anchor itself when ``joint.steps`` is 0,
    else the tree-aware copy, loaded when its files match the config and trained otherwise."""
    if cfg.joint.steps == 0:
        return anchor
    run_dir = Path(run_dir)
    weights = run_dir / JOINT_WEIGHTS
    if weights.is_file() and record_matches(run_dir / JOINT_JSON, joint_hash(cfg)):
        if dist.is_main():
            print(f"joint stage: using {weights} (config unchanged)")
        return load_joint(anchor, weights)
    tuned, _ = train_joint(cfg, run_dir, anchor, train_ds, val_ds, resume=resume)
    return tuned


def load_joint(anchor: Anchor, path: Path) -> Anchor:
    """A copy of ``anchor`` holding the tree-aware weights saved at ``path``."""
    tuned = copy.deepcopy(anchor).cpu()
    load_anchor_weights(tuned, path, "joint-stage weights")
    return tuned.eval()
