"""Stage 2: train the weight hypernet (METHOD.md 1.6) on the trees the edge hypernet derives.

Anchor and edge hypernet are frozen. Each step draws (r, b), derives the hard tree for it
(argmax parents, repaired to fit b; :meth:`EdgeHypernet.tree`), and trains the adaptation
of that tree's non-private nodes (:mod:`dymu.hypernet.weight`; a step whose tree is all
private, the anchor tree, has nothing to train) on the task loss weighted by r mixed with
a uniform floor (``stage2.task_floor``, so no
task is left without a gradient). Writes ``weight_hnet.safetensors`` and
``weight_hnet.json``, and every ``run.checkpoint_every`` steps ``stage2/checkpoint.pt``, from
which ``resume=True`` continues exactly.

Under ``torchrun`` (:mod:`dymu.dist`) every rank draws the same (r, b), so derives the same
tree, and trains on its equal part of the global batch; DDP averages the weight hypernet's
gradients, which is the gradient of the global batch's mean loss. Rank 0 alone writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from dymu import dist
from dymu.config import Config, Stage2Config
from dymu.data.batches import check_flips, random_hflip, to_device
from dymu.hypernet.edge import EdgeHypernet
from dymu.hypernet.weight import WeightHypernet, build_weight_hypernet
from dymu.losses import task_loss
from dymu.models.anchor import Anchor
from dymu.models.streams import TreeStreams
from dymu.run import resolve_device
from dymu.space.graph import anchor_flops, min_flops
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.train import parallel
from dymu.train.checkpoint import rng_state, set_rng_state
from dymu.train.draws import mix_evaluation_draws
from dymu.train.engine import StepLoop, frozen
from dymu.train.precision import Precision
from dymu.train.spec import resolve_specs

WEIGHT_WEIGHTS = "weight_hnet.safetensors"
WEIGHT_JSON = "weight_hnet.json"
CHECKPOINT = "stage2/checkpoint.pt"


def stage2_hash(cfg: Config) -> str:
    """The weight hypernet's artifact hash: the hash of stage 2's spec
    (:mod:`dymu.train.spec`)."""
    return resolve_specs(cfg)["stage2"].hash


def draw_tree(
    edge: EdgeHypernet,
    space: nx.DiGraph,
    dirichlet: float,
    low: float,
    rng: np.random.Generator,
    device: torch.device,
    uniform_share: float = 0.0,
    full_budget_share: float = 0.0,
) -> tuple[torch.Tensor, float, TreeSpec]:
    """Stage 2's draw for one step: r ~ Dirichlet (uniform on the simplex for a share
    ``uniform_share`` of the draws), b ~ U(low, 1) (exactly 1 for a share
    ``full_budget_share``) and the tree the frozen edge hypernet derives for them (argmax
    parents, repaired to fit b).

    Returns:
        ``(r [N], b, tree)``.
    """
    r_np = rng.dirichlet([dirichlet] * edge.num_tasks)
    b = float(rng.uniform(low, 1.0))
    # Always drawn, so the generator's sequence does not depend on the shares.
    rs, bs = mix_evaluation_draws(r_np[None], np.array([b]), uniform_share, full_budget_share, rng)
    r_np, b = rs[0], float(bs[0])
    r = torch.tensor(r_np, dtype=torch.float32, device=device)
    tree = edge.tree(r, b, space)
    return r, b, tree


@dataclass
class WeightStep:
    """One stage-2 step: derive the tree for a drawn (r, b), run it with the weight
    hypernet's adaptation, and descend the task loss; called by the stage's
    :class:`~dymu.train.engine.StepLoop`, it returns the scalars to log when asked."""

    s2: Stage2Config
    edge: EdgeHypernet  # frozen
    space: nx.DiGraph
    streams: TreeStreams  # the weights every tree runs (frozen)
    scales: torch.Tensor  # [N] w_i
    low: float  # the cheapest tree's FLOPs fraction
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    prec: Precision
    rng: np.random.Generator
    flip_gen: torch.Generator
    device: torch.device
    batches: Iterator[dict[str, torch.Tensor]] | None = None  # set once the loop resumed
    hypernet: Any = None  # the weight hypernet or its DDP wrapper, set inside data_parallel
    nets: dict[str, TreeNet] = field(default_factory=dict)  # one per tree drawn, built once
    seen: set[str] = field(default_factory=set)  # hashes of the trees drawn, over resumes

    def __call__(self, i: int, log: bool) -> dict[str, float] | None:
        s2, prec, tasks = self.s2, self.prec, self.streams.tasks
        r, b, tree = draw_tree(
            self.edge, self.space, s2.dirichlet, self.low, self.rng, self.device,
            s2.uniform_share, s2.full_budget_share,
        )  # fmt: skip
        net = self.nets.setdefault(tree.hash(), TreeNet(self.streams, tree))
        self.seen.add(tree.hash())
        batch = to_device(next(self.batches), self.device)
        if s2.hflip:
            batch = random_hflip(batch, tasks, self.flip_gen, dist.shard())
        offsets = self.hypernet(r, b, tree)  # the hypernet runs in float32, the tree under autocast
        with prec.autocast():
            out = net(prec.to_input(batch["image"]), offsets)
        out = prec.fp32(out)
        losses = torch.stack([t.loss(out[t.name], batch[t.name]) for t in tasks])
        # Every task keeps a share of the loss (task_floor), so the adaptation also serves
        # the tasks r weighs little; this rank's part of the global batch.
        weights_r = (1.0 - s2.task_floor) * r + s2.task_floor / len(tasks)
        loss = task_loss(losses, weights_r, self.scales)
        self.optimizer.zero_grad(set_to_none=True)
        if loss.requires_grad:  # else every node is private (the anchor tree): no offsets
            prec.backward(loss)
            prec.step(self.optimizer)
        self.scheduler.step()
        if not log:
            return None
        # The global batch's loss: the mean of the ranks' equal parts.
        mean = dist.all_reduce_sums({"loss": loss.item()})["loss"] / dist.world_size()
        return {"loss": mean, "lr": self.scheduler.get_last_lr()[0]}

    def state(self) -> dict[str, Any]:
        return {
            "numpy_rng": rng_state(self.rng),
            "flip_rng": self.flip_gen.get_state(),
            "trees_seen": sorted(self.seen),
            **self.prec.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.prec.load_state_dict(state)
        set_rng_state(self.rng, state["numpy_rng"])
        self.flip_gen.set_state(state["flip_rng"])
        self.seen = set(state["trees_seen"])


def train_stage2(
    cfg: Config,
    run_dir: Path,
    streams: TreeStreams | Anchor,
    space: nx.DiGraph,
    edge: EdgeHypernet,
    train_ds,
    scales: torch.Tensor,
    resume: bool = False,
) -> tuple[WeightHypernet, dict[str, Any]]:
    """Train the weight hypernet on the frozen ``streams``; write its weights and a summary
    into ``run_dir``. ``scales``: [N] w_i (:func:`~dymu.train.scales.loss_scales`)."""
    s2, run_dir = cfg.stage2, Path(run_dir)
    device = resolve_device(cfg.run.device)
    prec = Precision.from_config(cfg.run, device)
    dist.per_rank_batch(s2.batch_size, "stage2.batch_size")  # fail before any work
    check_flips(train_ds.info, {"stage2.hflip": s2.hflip})
    dist.setup(device)
    streams = TreeStreams.of(streams)
    for m in streams.modules():
        prec.prepare(frozen(m, device))  # in place; released after training
    anchor = streams.tuned
    edge = frozen(edge, device)
    torch.manual_seed(cfg.run.seed + 1)  # the hypernet's initial weights
    weights = build_weight_hypernet(
        len(anchor.tasks), anchor.streams, s2.adapter_rank, s2.task_rank
    )
    weights = weights.to(device)
    opt = torch.optim.Adam(weights.parameters(), lr=s2.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s2.lr_every, gamma=s2.lr_decay)
    scales = scales.to(device)  # [N] w_i, :func:`~dymu.train.scales.loss_scales`
    low = min_flops(space) / anchor_flops(space)
    step = WeightStep(
        s2, edge, space, streams, scales, low, opt, sched, prec,
        np.random.default_rng(cfg.run.seed + 1),
        torch.Generator().manual_seed(cfg.run.seed * 1000 + 2), device,
    )  # fmt: skip
    loop = StepLoop(
        name="stage2",
        label="stage 2",
        desc="stage 2 (weight hypernet)",
        run_dir=run_dir,
        checkpoint=run_dir / CHECKPOINT,
        config_hash=stage2_hash(cfg),
        steps=s2.steps,
        every=cfg.run.checkpoint_every,
        model=weights,
        optimizer=opt,
        scheduler=sched,
        step=step,
        show=("loss",),
    )
    seed, workers = cfg.run.seed + 1, cfg.stage0.workers
    step.batches = loop.batches(train_ds, s2.batch_size, seed, resume, workers, device)
    # Under torchrun: DDP averages the weight hypernet's gradients over the ranks.
    # Adapters of nodes the step's tree lacks get no gradient: DDP must expect that.
    unused = s2.adapter_rank > 0 or s2.task_rank > 0
    with parallel.data_parallel(weights, device, find_unused=unused) as step.hypernet:
        last = loop.run().get("loss", 0.0)
    for m in streams.modules():
        prec.release(m)
    meta = {"config_hash": loop.config_hash, "tasks": anchor.task_names}
    spec = resolve_specs(cfg)["stage2"].to_json()
    record = loop.finish(
        run_dir / WEIGHT_WEIGHTS, run_dir / WEIGHT_JSON, meta, s2.batch_size, spec=spec,
        final_loss=last, distinct_trees=len(step.seen), loss_scales=scales.tolist(),
        precision=prec.describe(),
    )  # fmt: skip
    return weights.cpu(), record
