"""The joint stage (METHOD.md 1.9): the independent streams fine-tuned together on trees.

Stage 0 trains every stream alone, so a cross-task edge feeds a node features it has never
seen. This stage, between the affinity estimate and stage 1, fine-tunes all streams (and
heads) at once on trees drawn from the space, with the sandwich rule of one-shot NAS: every
step runs

- the anchor tree (every task on its own stream; left out with ``joint.private_nodes``,
  the default, where the anchor tree runs stage 0's weights and has nothing to train),
- a cheapest tree (every task on one stream's trunk: with ``joint.trunk: best``, the
  default, the stream whose cheapest tree does best on stage 0's weights, chosen once, so
  that the trees tight budgets derive train every step; with ``random``, a new one each step),
- ``joint.random_trees`` random trees: with ``joint.random_kind: branch`` every task leaves
  the cheapest tree's trunk at a random layer, with ``uniform`` every parent is random,

on the same batch, and sums their losses (a node or head two trees share, the same weights
on the same path from the image, runs once for both). Each tree's loss is its label loss
plus in-place distillation towards the frozen stage-0 anchor's outputs (the teacher every
tree should approximate; with the anchor tree in the sandwich it still drifted, by 6-23%
in validation loss on the default config, which is why private nodes keep stage 0's
weights):

    sum_trees sum_i w_i [ L_i(y_T, labels) + distill * ||y_T,i - y_0,i||^2 / Var(y_0,i) ]

with w_i = 1 / (the stage-0 anchor's own validation loss on task i,
:func:`~dymu.train.scales.loss_scales`). BatchNorm keeps stage 0's
running statistics (eval mode): one set of statistics serves every tree, and folding stays
exact. Only weights move, so every tree's FLOPs are unchanged.

This stage trains full-width trees only; narrower configurations (``model.widths``,
METHOD.md 1.11) get copies of their own in the width stage that follows
(:mod:`dymu.train.slim_stage`), so that they cannot cost a full-width tree anything.

The fine-tuned weights serve shared and post-branch nodes: with ``joint.private_nodes``
(the default) a tree's private nodes, those on their own stream's path for their own task
alone, keep stage 0's weights (:class:`~dymu.models.streams.TreeStreams`), so the anchor tree
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dymu import dist
from dymu.config import Config, JointConfig
from dymu.data.batches import check_flips
from dymu.models.anchor import Anchor, load_anchor_weights
from dymu.models.streams import TreeStreams
from dymu.run import resolve_device
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.train.checkpoint import record_matches
from dymu.train.engine import Seeded, StepLoop, frozen
from dymu.train.loop import evaluate_model
from dymu.train.scales import loss_scales
from dymu.train.spec import resolve_specs

JOINT_WEIGHTS = "joint.safetensors"
JOINT_JSON = "joint.json"
CHECKPOINT = "joint/checkpoint.pt"


def joint_hash(cfg: Config) -> str:
    """The joint stage's artifact hash: the hash of its spec (:mod:`dymu.train.spec`)."""
    return resolve_specs(cfg)["joint"].hash


def sandwich(
    n: int,
    num_layers: int,
    random_trees: int,
    rng: np.random.Generator,
    anchor_tree: bool = True,
    trunk: int | None = None,
    kind: str = "uniform",
) -> list[TreeSpec]:
    """One step's trees: the anchor tree (unless ``anchor_tree`` is False), a cheapest tree
    on ``trunk`` (a random one when None), and ``random_trees`` random trees (drawn from
    ``rng`` in this fixed order; the random trunk is drawn either way, so a fixed trunk
    leaves the random trees as they were).

    ``kind`` says how a random tree is drawn: ``uniform``, every parent uniformly from the N
    streams; ``branch``, every task leaves the trunk at a uniformly random layer
    (:meth:`TreeSpec.branching`), the trees between the cheapest and the anchor tree that
    budgets in between derive.
    """
    drawn = int(rng.integers(n))
    trunk = drawn if trunk is None else trunk
    trees = [TreeSpec.no_sharing(n, num_layers)] if anchor_tree else []
    trees.append(TreeSpec.all_sharing(n, num_layers, trunk))
    for _ in range(random_trees):
        if kind == "branch":
            split = rng.integers(0, num_layers, size=n).tolist()  # [N] layers 0..L-1
            trees.append(TreeSpec.branching(n, num_layers, trunk, split))
        else:
            trees.append(TreeSpec.random(n, num_layers, rng).canonical())
    return trees


def distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per image, mean (student - teacher)^2 over its elements divided by the variance of the
    teacher's, then the mean over images: a scale-free output distance (1 = as far off as
    the teacher's own mean), and a mean of per-image terms, so that ranks holding equal
    parts of a batch average to the whole batch's value."""
    teacher = teacher.detach()
    err = (student - teacher).flatten(1).pow(2).mean(1)  # [B]
    return (err / teacher.flatten(1).var(1).clamp_min(1e-8)).mean()


@dataclass
class JointStep(Seeded):
    """One step of the sandwich (the module docstring's loss), called by the stage's
    :class:`~dymu.train.engine.StepLoop`; returns the scalars to log when asked."""

    js: JointConfig
    teacher: Anchor  # the frozen stage-0 streams: distillation targets
    student: Anchor  # the streams being tuned
    private: Anchor | None  # what private nodes run (``joint.private_nodes``), else None
    scales: torch.Tensor  # [N] w_i
    trunk: int | None  # the cheapest tree's trunk, None for a new one every step
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator
    flip_gen: torch.Generator
    device: torch.device
    batches: Iterator[dict[str, torch.Tensor]] | None = None  # set once the loop resumed
    share: bool = True  # nodes the trees share run once (False: each tree on its own)

    @classmethod
    def build(
        cls,
        js: JointConfig,
        teacher: Anchor,
        scales: torch.Tensor,
        trunk: int | None,
        seed: int,
        device: torch.device,
    ) -> JointStep:
        """The step ``train_joint`` runs: a trainable copy of the frozen ``teacher`` (which
        private nodes run under ``joint.private_nodes``), its optimizer and schedule, and
        the tree and flip generators seeded with ``seed``, all on ``device``."""
        student = copy.deepcopy(teacher)
        student.requires_grad_(True)
        student.eval()  # BatchNorm keeps stage 0's running statistics; no dropout
        opt, sched = optimizer_and_schedule(js, student, js.steps)
        # joint.private_nodes: private nodes run stage 0's weights, as the trees will later;
        # the anchor tree (all private) then trains nothing and leaves the sandwich.
        private = teacher if js.private_nodes else None
        return cls(
            js, teacher, student, private, scales, trunk, opt, sched,
            np.random.default_rng(seed), torch.Generator().manual_seed(seed), device,
        )  # fmt: skip

    def __call__(self, i: int, log: bool) -> dict[str, float] | None:
        js, tasks = self.js, self.teacher.tasks
        n, num_layers = len(tasks), self.teacher.num_layers
        trees = sandwich(
            n,
            num_layers,
            js.random_trees,
            self.rng,
            anchor_tree=self.private is None,
            trunk=self.trunk,
            kind=js.random_kind,
        )
        batch = self.next_batch(tasks, js.hflip)
        with torch.no_grad():
            target = self.teacher(batch["image"])
        labels = distilled = torch.zeros((), device=self.device)
        streams, shared = TreeStreams(self.student, self.private), {} if self.share else None
        for tree in trees:  # nodes the trees share (the trunk, at least) run once
            out = TreeNet(streams, tree)(batch["image"], shared=shared)
            for k, t in enumerate(tasks):
                labels = labels + self.scales[k] * t.loss(out[t.name], batch[t.name])
                distilled = distilled + self.scales[k] * distillation(out[t.name], target[t.name])
        self.update((labels + js.distill * distilled) / len(trees), self.student.parameters())
        return self.logged({"labels": labels, "distill": distilled}, len(trees)) if log else None


def train_joint(
    cfg: Config,
    run_dir: Path,
    anchor: Anchor,
    train_ds,
    val_ds,
    resume: bool = False,
    scales: torch.Tensor | None = None,
) -> tuple[Anchor, dict[str, Any]]:
    """Fine-tune a copy of ``anchor`` on trees; write ``joint.safetensors`` and its record.

    Returns the tree-aware anchor (``anchor`` itself, the stage-0 streams, is not changed).
    ``scales``: [N] w_i (:func:`~dymu.train.scales.loss_scales` of ``anchor`` on
    ``val_ds``, computed here when None).
    """
    js, run_dir = cfg.joint, Path(run_dir)
    device = resolve_device(cfg.run.device)
    dist.per_rank_batch(js.batch_size, "joint.batch_size")  # fail before any work
    check_flips(train_ds.info, {"joint.hflip": js.hflip})
    dist.setup(device)
    teacher = frozen(anchor, device)
    if scales is None:  # [N] w_i: the caller's, else computed by their one definition
        scales = loss_scales(teacher, val_ds, device)
    scales = scales.to(device)
    trunk, trunk_losses = None, None
    if js.trunk == "best":
        trunk, trunk_losses = best_trunk(teacher, scales, val_ds, js.batch_size, device)
        if dist.is_main():
            print(f"joint stage: cheapest trees on {anchor.tasks[trunk].name}'s trunk")
    seed = cfg.run.seed + 7
    step = JointStep.build(js, teacher, scales, trunk, seed, device)
    student, opt, sched, private = step.student, step.optimizer, step.scheduler, step.private
    loop = StepLoop(
        name="joint",
        label="joint stage",
        desc="joint stage (streams on trees)",
        run_dir=run_dir,
        checkpoint=run_dir / CHECKPOINT,
        config_hash=joint_hash(cfg),
        steps=js.steps,
        every=cfg.run.checkpoint_every,
        model=student,
        optimizer=opt,
        scheduler=sched,
        step=step,
        show=("labels", "distill"),
    )
    step.batches = loop.batches(train_ds, js.batch_size, seed, resume, cfg.stage0.workers, device)
    last = loop.run()
    student.requires_grad_(False)
    extra: dict[str, Any] = {"final": {k: last[k] for k in ("labels", "distill") if k in last}}
    if trunk is not None:
        extra["trunk"] = anchor.tasks[trunk].name
        extra["trunk_weighted_losses"] = trunk_losses
    if dist.is_main():
        extra["val_losses"] = _val_losses(
            teacher, student, val_ds, js.batch_size, device, private, trunk or 0
        )
    meta = {"config_hash": loop.config_hash, "tasks": anchor.task_names}
    extra["spec"] = resolve_specs(cfg)["joint"].to_json()
    extra["loss_scales"] = scales.tolist()
    files = run_dir / JOINT_WEIGHTS, run_dir / JOINT_JSON
    record = loop.finish(*files, meta, js.batch_size, **extra)
    return student.cpu(), record


def optimizer_and_schedule(js: JointConfig, student: Anchor, steps: int):
    """The stage's optimizer (``js``'s) and its cosine decay to 0 over ``steps`` (Python
    floats: the checkpoint loads weights-only); the width stage shares them."""
    params = student.parameters()
    if js.optimizer == "adam":
        opt = torch.optim.AdamW(params, lr=js.lr, weight_decay=js.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=js.lr, momentum=0.9, weight_decay=js.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / steps))
    )
    return opt, sched


@torch.no_grad()
def cheapest_trees(
    streams: TreeStreams | Anchor, scales: torch.Tensor, ds, batch_size: int, device
) -> dict[str, dict[str, Any]]:
    """Every stream's cheapest tree (every task on that stream's trunk) evaluated on ``ds``:
    ``{stream: {"metrics", "losses" [N], "weighted": sum_i w_i L_i}}``, in task order."""
    streams = TreeStreams.of(streams)
    tasks = streams.tasks
    n, num_layers = len(tasks), streams.num_layers
    out = {}
    for k, stream in enumerate(tasks):
        net = TreeNet(streams, TreeSpec.all_sharing(n, num_layers, k))
        metrics, losses = evaluate_model(net, ds, tasks, batch_size, device)
        weighted = sum(w * v for w, v in zip(scales.tolist(), losses, strict=True))
        out[stream.name] = {"metrics": metrics, "losses": losses, "weighted": weighted}
    return out


def best_trunk(
    anchor: Anchor, scales: torch.Tensor, val_ds, batch_size: int, device
) -> tuple[int, dict[str, float]]:
    """The stream whose cheapest tree (every task on its trunk) has the lowest weighted
    validation loss sum_i w_i L_i on ``anchor``'s weights, and that loss per trunk.

    Every rank computes it over the whole split, so all ranks agree without a broadcast.
    """
    trees = cheapest_trees(anchor, scales, val_ds, batch_size, device)
    weighted = {name: t["weighted"] for name, t in trees.items()}
    best = min(range(len(anchor.tasks)), key=lambda k: weighted[anchor.tasks[k].name])
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
            ("joint", TreeNet(TreeStreams(student, private), tree)),
        ):
            _, losses = evaluate_model(net, val_ds, teacher.tasks, batch_size, device)
            out[f"{name}/{when}"] = dict(zip(teacher.task_names, losses, strict=True))
    return out


def ensure_joint(
    cfg: Config,
    run_dir: Path,
    anchor: Anchor,
    train_ds,
    val_ds,
    resume: bool = False,
    scales: torch.Tensor | None = None,
) -> Anchor:
    """The streams every tree runs on: the stage-0 anchor itself when ``joint.steps`` is 0,
    else the tree-aware copy, loaded when its files match the config and trained otherwise."""
    if cfg.joint.steps == 0:
        return anchor
    run_dir = Path(run_dir)
    weights = run_dir / JOINT_WEIGHTS
    if dist.main_decides(
        weights.is_file() and record_matches(run_dir / JOINT_JSON, joint_hash(cfg))
    ):
        if dist.is_main():
            print(f"joint stage: using {weights} (config unchanged)")
        return load_joint(anchor, weights)
    tuned, _ = train_joint(cfg, run_dir, anchor, train_ds, val_ds, resume=resume, scales=scales)
    return tuned


def load_joint(anchor: Anchor, path: Path) -> Anchor:
    """A copy of ``anchor`` holding the tree-aware weights saved at ``path``."""
    tuned = copy.deepcopy(anchor).cpu()
    load_anchor_weights(tuned, path, "joint-stage weights")
    return tuned.eval()
