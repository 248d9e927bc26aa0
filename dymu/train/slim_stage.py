"""The width stage (METHOD.md 1.11): narrow configurations trained on a copy of their own.

Stage 0 and the joint stage train full-width trees. Training narrower configurations on
the same weights (tried first) made them usable but cost the full-width trees their
quality, the floor every budget keeps. So this stage trains a copy of the joint stage's
streams, the ``narrow`` weights of :class:`~dymu.models.streams.TreeStreams`: every node
in a narrowed context (the node or one before it on its path narrower than full width)
and the head above it run the copy; full-width trees never touch it and stay exactly
what they were.

Each step runs, on one batch, the sandwich rule over widths (universally slimmable
networks, BigNAS):

- the smallest configuration: the cheapest tree (every task on the trunk) with every node
  at the narrowest width,
- ``slim.configs`` random configurations: a branch tree of the trunk (every task leaves
  it at a random layer) with every node at a random width of ``model.widths``,

each against the same tree at full width on the frozen weights (its teacher, in-place
distillation from the largest network of the family), with the loss

    sum_configs [ sum_i w_i ( L_i(y, labels) + distill * D(y_i, y_full,i) )
                  + features * mean_nodes D(f_node, f_full,node[:, :k]) ]

where D is :func:`~dymu.train.joint.distillation` (scale-free) and the second sum runs
over the configuration's nodes in a narrowed context, each towards the first k channels
(its own width) of the same node at full width: ECMT's configuration-invariant
distillation, node by node. The trunk is the joint stage's (``joint.trunk``), and so are
batch size, optimizer, learning rate, weight decay and flips.

Narrowed nodes normalise with batch statistics in training; evaluation and export
calibrate them per configuration (:mod:`dymu.train.calibrate`). The stage writes
``slim.safetensors`` (the anchor's layout) and ``slim.json``, whose ``val_losses`` hold the
smallest configuration's validation losses on the joint weights sliced and on the copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from dymu import dist
from dymu.artifacts import read_json, rerun_fix
from dymu.config import Config, JointConfig, SlimConfig
from dymu.data import input_size
from dymu.data.batches import check_flips
from dymu.models.anchor import Anchor, load_anchor_weights
from dymu.models.streams import TreeStreams
from dymu.run import resolve_device
from dymu.space.anchor_space import anchor_space
from dymu.space.derive_widths import preference_omega, widened_from_narrowest
from dymu.space.graph import anchor_flops, space_widths
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.train.calibrate import calibrated, calibration_images
from dymu.train.checkpoint import record_matches
from dymu.train.engine import Seeded, StepLoop, frozen
from dymu.train.joint import JOINT_JSON, best_trunk, distillation, optimizer_and_schedule
from dymu.train.loop import evaluate_model
from dymu.train.scales import loss_scales
from dymu.train.spec import resolve_specs

SLIM_WEIGHTS = "slim.safetensors"
SLIM_JSON = "slim.json"
CHECKPOINT = "slim/checkpoint.pt"


def slim_hash(cfg: Config) -> str:
    """The width stage's artifact hash: the hash of its spec (:mod:`dymu.train.spec`)."""
    return resolve_specs(cfg)["slim"].hash


def width_sandwich(
    n: int,
    num_layers: int,
    configs: int,
    widths: Sequence[float],
    rng: np.random.Generator,
    trunk: int | None = None,
    rule: tuple[nx.DiGraph, float] | None = None,
) -> list[TreeSpec]:
    """One step's configurations: the smallest (the cheapest tree on ``trunk`` at the
    narrowest width), then ``configs`` branch trees of the trunk (a random trunk, drawn
    first, when ``trunk`` is None) at random widths per node, or with ``rule`` (the
    slimmable space and the rule's strength, ``slim.sample: preference``) at the widths
    the preference rule gives a random preference at a random budget."""
    drawn = int(rng.integers(n))
    trunk = drawn if trunk is None else trunk
    narrowest = [[min(widths)] * n for _ in range(num_layers)]
    out = [TreeSpec(TreeSpec.all_sharing(n, num_layers, trunk).parents, narrowest).canonical()]
    for _ in range(configs):
        split = rng.integers(0, num_layers, size=n).tolist()  # [N] layers 0..L-1
        tree = TreeSpec.branching(n, num_layers, trunk, split)
        if rule is None:
            at = rng.choice(np.asarray(widths), size=(num_layers, n)).tolist()  # [L][N]
            out.append(TreeSpec(tree.parents, at).canonical())
        else:
            out.append(_preferred_widths(tree, rng, *rule))
    return out


def _preferred_widths(
    tree: TreeSpec, rng: np.random.Generator, space: nx.DiGraph, strength: float
) -> TreeSpec:
    """``tree`` at the widths the preference rule gives a Dirichlet(1) preference at a
    budget drawn uniformly between the tree at the narrowest widths and at full width."""
    n, num_layers = tree.num_tasks, tree.num_layers
    widths = space_widths(space)
    r = rng.dirichlet(np.ones(n))  # [N]
    low = TreeSpec(tree.parents, [[widths[0]] * n for _ in range(num_layers)])
    lo, hi = low.flops(space), tree.flops(space)
    # A hair above the draw, so that rounding never puts the narrowest over it.
    budget = min(1.0, float(rng.uniform(lo, hi)) / anchor_flops(space) * (1 + 1e-12))
    omega = preference_omega(tree, r, len(widths), strength)  # [L, N, K]
    config = widened_from_narrowest(tree, space, budget, omega)
    if config is None:  # pragma: no cover - the budget is at least the narrowest's cost
        raise AssertionError("a tree does not fit at its own narrowest widths")
    return config


def feature_distillation(
    student: dict[tuple[int, int], torch.Tensor],
    teacher: dict[tuple[int, int], torch.Tensor],
    config: TreeSpec,
) -> torch.Tensor:
    """Mean over the used nodes of ``config`` in a narrowed context of D(student node,
    the teacher's same node's first channels); 0 when none is (``student`` and ``teacher``
    are :meth:`TreeNet.forward`'s ``nodes``)."""
    narrowed = config.narrowed()
    terms = []
    for layer, j in config.used_nodes():
        if narrowed[layer][j]:
            own = student[(layer, j)]  # [B, k, h, w], k <= the full node's channels
            terms.append(distillation(own, teacher[(layer, j)][:, : own.shape[1]]))
    return torch.stack(terms).mean() if terms else torch.zeros(())


@dataclass
class SlimStep(Seeded):
    """One step of the sandwich over widths (the module docstring's loss), called by the
    stage's :class:`~dymu.train.engine.StepLoop`; returns the scalars to log when asked."""

    slim: SlimConfig
    js: JointConfig
    full: TreeStreams  # frozen: what full-width trees run, the teachers
    student: Anchor  # the narrow copy being trained
    scales: torch.Tensor  # [N] w_i
    trunk: int | None  # the trunk of every configuration, None for a new one every step
    widths: tuple[float, ...]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator
    flip_gen: torch.Generator
    device: torch.device
    rule: tuple[nx.DiGraph, float] | None = None  # slim.sample: preference (space, strength)
    batches: Iterator[dict[str, torch.Tensor]] | None = None  # set once the loop resumed

    def __call__(self, i: int, log: bool) -> dict[str, float] | None:
        tasks = self.full.tasks
        n, num_layers = len(tasks), self.full.num_layers
        configs = width_sandwich(
            n, num_layers, self.slim.configs, self.widths, self.rng, self.trunk, self.rule
        )
        batch = self.next_batch(tasks, self.js.hflip)
        image = batch["image"]
        streams = TreeStreams(self.full.tuned, self.full.stage0, self.student)
        zero = torch.zeros((), device=self.device)
        labels, distilled, featured = zero, zero, zero
        taught, shared = {}, {}  # nodes the configurations share run once
        for config in configs:
            full_nodes, nodes = {}, {}
            with torch.no_grad():
                target = TreeNet(self.full, TreeSpec(config.parents))(
                    image, shared=taught, nodes=full_nodes
                )
            out = TreeNet(streams, config)(image, shared=shared, nodes=nodes)
            for k, t in enumerate(tasks):
                labels = labels + self.scales[k] * t.loss(out[t.name], batch[t.name])
                distilled = distilled + self.scales[k] * distillation(out[t.name], target[t.name])
            featured = featured + feature_distillation(nodes, full_nodes, config).to(self.device)
        slim = self.slim
        loss = (labels + slim.distill * distilled + slim.features * featured) / len(configs)
        self.update(loss, self.student.parameters())
        if not log:
            return None
        sums = {"labels": labels, "distill": distilled, "features": featured}
        return self.logged(sums, len(configs))


def train_slim(
    cfg: Config,
    run_dir: Path,
    full: TreeStreams,
    train_ds,
    val_ds,
    resume: bool = False,
    scales: torch.Tensor | None = None,
    trunk: int | None = None,
) -> tuple[Anchor, dict[str, Any]]:
    """Train the narrow copy of ``full.tuned``; write ``slim.safetensors`` and its record.

    ``full``: what full-width trees run (the joint stage's streams and, under the
    private-node rule, stage 0's), left unchanged. ``scales``: [N] w_i
    (:func:`~dymu.train.scales.loss_scales` of the stage-0 anchor; computed here from
    ``full.stage0`` or ``full.tuned`` when None). ``trunk``: the configurations' trunk
    under ``joint.trunk: best`` (None: the joint stage's record's in ``run_dir``, else the
    best on ``full``). Returns the copy and the record.
    """
    js, run_dir = cfg.joint, Path(run_dir)
    widths = tuple(cfg.model.widths)
    if len(widths) < 2:
        raise ValueError("the width stage needs model.widths beyond full width")
    device = resolve_device(cfg.run.device)
    dist.per_rank_batch(js.batch_size, "joint.batch_size")
    check_flips(train_ds.info, {"joint.hflip": js.hflip})
    dist.setup(device)
    for m in full.modules():
        frozen(m, device)
    if scales is None:
        stage0 = full.stage0 if full.stage0 is not None else full.tuned
        scales = loss_scales(stage0, val_ds, device)
    scales = scales.to(device)
    if js.trunk != "best":
        trunk = None
    elif trunk is None:
        trunk = _trunk(run_dir, full, scales, val_ds, js.batch_size, device)
    student = copy.deepcopy(full.tuned).requires_grad_(True).eval()  # BN: running stats
    opt, sched = optimizer_and_schedule(js, student, cfg.slim.steps)
    seed = cfg.run.seed + 11
    rule = None
    if cfg.slim.sample == "preference":  # configurations priced as derivation prices them
        space = anchor_space(copy.deepcopy(full.tuned).cpu(), input_size(cfg.data), widths)
        rule = (space, cfg.slim.strength)
    step = SlimStep(
        cfg.slim, js, full, student, scales, trunk, widths, opt, sched,
        np.random.default_rng(seed), torch.Generator().manual_seed(seed), device, rule,
    )  # fmt: skip
    loop = StepLoop(
        name="slim",
        label="width stage",
        desc="width stage (narrow configurations)",
        run_dir=run_dir,
        checkpoint=run_dir / CHECKPOINT,
        config_hash=slim_hash(cfg),
        steps=cfg.slim.steps,
        every=cfg.run.checkpoint_every,
        model=student,
        optimizer=opt,
        scheduler=sched,
        step=step,
        show=("labels", "distill", "features"),
    )
    step.batches = loop.batches(train_ds, js.batch_size, seed, resume, cfg.stage0.workers, device)
    last = loop.run()
    student.requires_grad_(False)
    extra: dict[str, Any] = {
        "final": {k: last[k] for k in ("labels", "distill", "features") if k in last}
    }
    if dist.is_main():
        images = calibration_images(train_ds, device)
        extra["val_losses"] = _val_losses(
            full, student, val_ds, js.batch_size, device, trunk or 0, widths, images
        )
    meta = {"config_hash": loop.config_hash, "tasks": full.tuned.task_names}
    extra["spec"] = resolve_specs(cfg)["slim"].to_json()
    extra["loss_scales"] = scales.tolist()
    files = run_dir / SLIM_WEIGHTS, run_dir / SLIM_JSON
    record = loop.finish(*files, meta, js.batch_size, **extra)
    return student.cpu(), record


def _trunk(run_dir: Path, full: TreeStreams, scales, val_ds, batch_size: int, device) -> int:
    """The joint stage's trunk (its record's), else the best one on ``full``'s weights."""
    record_path = run_dir / JOINT_JSON
    if record_path.is_file():
        record = read_json(record_path, "joint-stage record", rerun_fix(run_dir))
        name = record.get("trunk")
        if name in full.tuned.task_names:
            return full.tuned.task_names.index(name)
    return best_trunk(full.tuned, scales, val_ds, batch_size, device)[0]


@torch.no_grad()
def _val_losses(
    full: TreeStreams,
    student: Anchor,
    val_ds,
    batch_size: int,
    device,
    trunk: int,
    widths: Sequence[float],
    images: list[torch.Tensor],
) -> dict:
    """Validation losses of the smallest configuration on ``full``'s weights sliced and on
    the narrow copy, statistics calibrated on ``images``: what the stage bought."""
    n, num_layers = len(full.tasks), full.num_layers
    narrowest = [[min(widths)] * n for _ in range(num_layers)]
    config = TreeSpec(TreeSpec.all_sharing(n, num_layers, trunk).parents, narrowest)
    out = {}
    for when, streams in (
        ("sliced", full),
        ("slim", TreeStreams(full.tuned, full.stage0, student)),
    ):
        net = calibrated(streams, config, images)
        _, losses = evaluate_model(net, val_ds, full.tasks, batch_size, device)
        names = full.tuned.task_names
        out[f"smallest_configuration/{when}"] = dict(zip(names, losses, strict=True))
    return out


def ensure_slim(
    cfg: Config,
    run_dir: Path,
    full: TreeStreams,
    train_ds,
    val_ds,
    resume: bool = False,
    scales: torch.Tensor | None = None,
    trunk: int | None = None,
) -> TreeStreams:
    """``full`` with its narrow copy: None while ``model.widths`` is full width only, else
    loaded when its files match the config and trained otherwise (:func:`train_slim`)."""
    if len(cfg.model.widths) < 2:
        return full
    run_dir = Path(run_dir)
    weights = run_dir / SLIM_WEIGHTS
    if dist.main_decides(weights.is_file() and record_matches(run_dir / SLIM_JSON, slim_hash(cfg))):
        if dist.is_main():
            print(f"width stage: using {weights} (config unchanged)")
        narrow = load_slim(full.tuned, weights)
    else:
        narrow, _ = train_slim(cfg, run_dir, full, train_ds, val_ds, resume, scales, trunk)
    return TreeStreams(full.tuned, full.stage0, narrow)


def load_slim(anchor: Anchor, path: Path) -> Anchor:
    """A copy of ``anchor`` holding the width stage's weights saved at ``path``."""
    narrow = copy.deepcopy(anchor).cpu()
    load_anchor_weights(narrow, path, "width-stage weights")
    return narrow.eval()
