"""Stage 2: train the weight hypernet (METHOD.md 1.6) on the trees the edge hypernet derives.

Anchor and edge hypernet are frozen. Each step draws (r, b), derives the hard tree for it
(argmax parents, repaired to fit b), and trains the BatchNorm offsets of that tree's nodes
on the task loss weighted by r mixed with a uniform floor (``stage2.task_floor``, so no
task is left without a gradient). Writes ``weight_hnet.safetensors`` and
``weight_hnet.json``, and every ``run.checkpoint_every`` steps ``stage2/checkpoint.pt``, from
which ``resume=True`` continues exactly.

Under ``torchrun`` (:mod:`dymu.dist`) every rank draws the same (r, b), so derives the same
tree, and trains on its equal part of the global batch; DDP averages the weight hypernet's
gradients, which is the gradient of the global batch's mean loss. Rank 0 alone writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from dymu import dist
from dymu.config import Config, section_hash
from dymu.data.batches import endless, to_device
from dymu.hypernet.edge import EdgeHypernet
from dymu.hypernet.weight import WeightHypernet, build_weight_hypernet
from dymu.losses import task_loss
from dymu.models.anchor import Anchor
from dymu.run import resolve_device
from dymu.space.derive import derive_tree
from dymu.space.graph import anchor_flops, min_flops
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.train import parallel
from dymu.train.checkpoint import (
    rng_state,
    set_rng_state,
    write_finished,
)
from dymu.train.draws import mix_evaluation_draws
from dymu.train.engine import StepLoop
from dymu.train.precision import Precision
from dymu.train.scales import loss_scales
from dymu.train.stage1 import stage1_hash

WEIGHT_WEIGHTS = "weight_hnet.safetensors"
WEIGHT_JSON = "weight_hnet.json"
CHECKPOINT = "stage2/checkpoint.pt"


def stage2_hash(cfg: Config) -> str:
    return section_hash(cfg, "stage2") + "-" + stage1_hash(cfg)


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
    if uniform_share > 0 or full_budget_share > 0:
        rs, bs = mix_evaluation_draws(
            r_np[None], np.array([b]), uniform_share, full_budget_share, rng
        )
        r_np, b = rs[0], float(bs[0])
    r = torch.tensor(r_np, dtype=torch.float32, device=device)
    with torch.no_grad():
        tree = derive_tree(edge.alpha(r, b).cpu(), space, b)
    return r, b, tree


def train_stage2(
    cfg: Config,
    run_dir: Path,
    anchor: Anchor,
    space: nx.DiGraph,
    edge: EdgeHypernet,
    train_ds,
    val_ds,
    resume: bool = False,
    private: Anchor | None = None,
) -> tuple[WeightHypernet, dict[str, Any]]:
    """Train the weight hypernet; write its weights and a summary into ``run_dir``.

    ``private``: the stage-0 streams that the trees' private nodes run (see
    :class:`~dymu.space.treenet.TreeNet`), frozen like ``anchor``.
    """
    s2 = cfg.stage2
    device = resolve_device(cfg.run.device)
    prec = Precision.from_config(cfg.run, device)
    dist.per_rank_batch(s2.batch_size, "stage2.batch_size")  # fail before any work
    dist.setup(device)
    part, world = dist.shard(), dist.world_size()
    anchor = anchor.to(device).eval()
    anchor.requires_grad_(False)
    prec.prepare(anchor)  # in place; released after training
    if private is not None:
        private = private.to(device).eval().requires_grad_(False)
        prec.prepare(private)
    edge = edge.to(device).eval()
    edge.requires_grad_(False)
    n = len(anchor.tasks)
    torch.manual_seed(cfg.run.seed + 1)  # the hypernet's initial weights
    weights = build_weight_hypernet(n, anchor.streams, s2.adapter_rank).to(device)
    opt = torch.optim.Adam(weights.parameters(), lr=s2.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s2.lr_every, gamma=s2.lr_decay)
    scales = loss_scales(anchor, val_ds, s2.batch_size, device).to(device)
    low = min_flops(space) / anchor_flops(space)
    rng = np.random.default_rng(cfg.run.seed + 1)

    def load_state(state: dict[str, Any]) -> None:
        prec.load_state_dict(state)
        set_rng_state(rng, state["numpy_rng"])

    loop = StepLoop(
        name="stage2",
        label="stage 2",
        desc="stage 2 (weight hypernet)",
        run_dir=run_dir,
        checkpoint=Path(run_dir) / CHECKPOINT,
        config_hash=stage2_hash(cfg),
        steps=s2.steps,
        every=cfg.run.checkpoint_every,
        model=weights,
        optimizer=opt,
        scheduler=sched,
        state=lambda: {"numpy_rng": rng_state(rng), **prec.state_dict()},
        load_state=load_state,
        show=("loss",),
    )
    nets: dict[str, TreeNet] = {}  # one per tree drawn, built once
    batches = endless(
        train_ds,
        s2.batch_size,
        cfg.run.seed + 1,
        start=loop.resume(resume),
        shard=part,
        workers=cfg.stage0.workers,
        pin_memory=device.type == "cuda",
    )
    # Under torchrun: DDP averages the weight hypernet's gradients over the ranks.
    # Adapters of edges the step's tree lacks get no gradient: DDP must expect that.
    with parallel.data_parallel(weights, device, find_unused=s2.adapter_rank > 0) as hypernet:

        def step(i: int, log: bool) -> dict[str, float] | None:
            r, b, tree = draw_tree(
                edge, space, s2.dirichlet, low, rng, device, s2.uniform_share, s2.full_budget_share
            )
            net = nets.setdefault(tree.hash(), TreeNet(anchor, tree, private))
            batch = to_device(next(batches), device)
            offsets = hypernet(r, b, tree)  # the hypernet runs in float32, the tree under autocast
            with prec.autocast():
                out = net(prec.to_input(batch["image"]), offsets)
            out = prec.fp32(out)
            losses = torch.stack([t.loss(out[t.name], batch[t.name]) for t in anchor.tasks])
            # Every task keeps a share of the loss (task_floor), so the adaptation also
            # serves the tasks r weighs little; this rank's part of the global batch.
            weights_r = (1.0 - s2.task_floor) * r + s2.task_floor / n
            loss = task_loss(losses, weights_r, scales)
            opt.zero_grad(set_to_none=True)
            prec.backward(loss)
            prec.step(opt)
            sched.step()
            if not log:
                return None
            # The global batch's loss: the mean of the ranks' equal parts.
            mean = dist.all_reduce_sums({"loss": loss.item()})["loss"] / world
            return {"loss": mean, "lr": sched.get_last_lr()[0]}

        last = loop.run(step).get("loss", 0.0)
    seconds = loop.seconds
    prec.release(anchor)
    if private is not None:
        prec.release(private)
    meta = {"config_hash": loop.config_hash, "tasks": anchor.task_names}
    record = {
        **meta,
        "steps": s2.steps,
        "seconds": round(seconds, 2),
        "images_per_s": round(s2.steps * s2.batch_size / max(seconds, 1e-9), 1),
        "final_loss": last,
        "distinct_trees": len(nets),
        "precision": prec.describe(),
    }
    if world > 1:
        record["processes"] = world
    run_dir = Path(run_dir)
    write_finished(
        run_dir / WEIGHT_WEIGHTS, run_dir / WEIGHT_JSON, weights, meta, record, loop.checkpoint
    )
    return weights.cpu(), record
