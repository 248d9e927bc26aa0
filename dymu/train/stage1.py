"""Stage 1: train the edge hypernet on the frozen anchor (METHOD.md 1.4-1.5, DESIGN "Budget").

Each step draws ``stage1.draws`` pairs of a preference r and a budget b, one per equal
group of the batch (:func:`draw_preferences_budgets`). For each pair it samples parent
weights with Gumbel-softmax from the hypernet's alpha(r, b), runs its group through the
anchor with those parent mixtures (:class:`~dymu.models.mixture.MixtureNet`) and takes

    sum_i r_i w_i L_i  +  Omega  +  lambda_b * FLOPs term,

with w_i = 1 / (the stage-0 anchor's validation loss on task i,
:func:`~dymu.train.scales.loss_scales`) and c = (1 - b) / (1 - min) the paper's
frugality knob implied by b. ``objective: budget`` (the default, METHOD.md 1.9): Omega is
the mean-normalised regulariser times c (no sharing pressure at b = 1) and the FLOPs term
pulls E[FLOPs] towards b from both sides. ``objective: paper`` (METHOD.md 1.5): Omega with
c on L_active only, and a one-sided FLOPs ceiling. Omega compares alpha, or the samples
with ``regularise: samples``; the step minimises the mean over the pairs. The paper draws
one pair per step; several lower the variance of the hypernet's gradient.

Writes ``edge_hnet.safetensors`` and ``edge_hnet.json`` into the run directory, and every
``run.checkpoint_every`` steps ``stage1/checkpoint.pt``, from which ``resume=True`` continues
exactly (same draws and batches as an uninterrupted run).

Under ``torchrun`` (:mod:`dymu.dist`) every rank draws the same (r, b) pairs and Gumbel
noise (generators seeded alike), holds its contiguous part of each global batch, and so
part of some draws' groups; it weights each group's loss by the share of the group it holds,
so the ranks' gradients add up to the single-process one (DDP averages them, hence the
factor ``world`` on the task term; Omega and the budget penalty are the same on every
rank). Rank 0 alone writes checkpoints and files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch

from dymu import dist
from dymu.config import Config, Stage1Config
from dymu.data.batches import to_device
from dymu.hypernet.edge import EdgeHypernet
from dymu.losses import expected_flops
from dymu.models.anchor import Anchor
from dymu.models.mixture import MixtureNet
from dymu.models.streams import TreeStreams
from dymu.run import resolve_device
from dymu.train import parallel
from dymu.train.checkpoint import rng_state, set_rng_state
from dymu.train.draws import draw_parents, group_parts
from dymu.train.engine import StepLoop, frozen
from dymu.train.objective import Flops, step_terms
from dymu.train.precision import Precision
from dymu.train.spec import resolve_specs

EDGE_WEIGHTS = "edge_hnet.safetensors"
EDGE_JSON = "edge_hnet.json"
CHECKPOINT = "stage1/checkpoint.pt"


def stage1_hash(cfg: Config) -> str:
    """The edge hypernet's artifact hash: the hash of stage 1's spec (:mod:`dymu.train.spec`)."""
    return resolve_specs(cfg)["stage1"].hash


@dataclass
class EdgeStep:
    """One stage-1 step (the module docstring's loss), called by the stage's
    :class:`~dymu.train.engine.StepLoop`; returns the scalars to log when asked."""

    s1: Stage1Config
    edge: EdgeHypernet
    net: MixtureNet  # the frozen anchor run with parent mixtures
    tasks: list
    flops: Flops
    scales: torch.Tensor  # [N] w_i
    affinity: torch.Tensor  # [N, N] symmetric
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    prec: Precision
    rng: np.random.Generator
    gen: torch.Generator
    device: torch.device
    batches: Iterator[dict[str, torch.Tensor]] | None = None  # set once the loop resumed
    hypernet: Any = None  # ``edge`` or its DDP wrapper, set inside data_parallel

    def __call__(self, i: int, log: bool) -> dict[str, float] | None:
        s1, prec, part = self.s1, self.prec, dist.shard()
        # G draws of (r, b), one per group of batch_size / G images; the same on every
        # rank (the generators are seeded alike).
        d = draw_parents(
            self.hypernet, self.edge, s1, i, self.flops.low, self.rng, self.gen, self.device
        )
        # [G, ...] -> [B, ...] one set per image of the global batch -> this rank's rows
        v_rows = d.v.repeat_interleave(s1.batch_size // s1.draws, dim=0)[part.part(s1.batch_size)]
        batch = to_device(next(self.batches), self.device)
        # Only the anchor runs under autocast; hypernet, losses and Omega stay float32.
        with prec.autocast():
            out = self.net(prec.to_input(batch["image"]), v_rows)  # image k ran with v_rows[k]
        out = prec.fp32(out)
        parts = group_parts(s1.batch_size, s1.draws, part)  # the draws' groups this rank holds
        l_task, reg, penalty = step_terms(
            out, batch, self.tasks, parts, s1, d, self.scales, self.affinity, self.flops
        )
        # DDP averages over the ranks: world x this rank's share of the task term sums the
        # ranks' shares; Omega and the penalty are each rank's (equal) own.
        loss = dist.world_size() * l_task + reg + s1.lambda_budget * penalty
        self.optimizer.zero_grad(set_to_none=True)
        prec.backward(loss)
        prec.step(self.optimizer)
        self.scheduler.step()
        return _scalars(d, l_task, reg, penalty, s1, self.flops, self.scheduler) if log else None

    def state(self) -> dict[str, Any]:
        return {
            "numpy_rng": rng_state(self.rng),
            "torch_rng": self.gen.get_state(),
            **self.prec.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.prec.load_state_dict(state)
        set_rng_state(self.rng, state["numpy_rng"])
        self.gen.set_state(state["torch_rng"])


def train_stage1(
    cfg: Config,
    run_dir: Path,
    streams: TreeStreams | Anchor,
    space: nx.DiGraph,
    affinity: torch.Tensor,
    train_ds,
    scales: torch.Tensor,
    resume: bool = False,
) -> tuple[EdgeHypernet, dict[str, Any]]:
    """Train the edge hypernet on the frozen ``streams``; write its weights and a summary
    into ``run_dir``. ``scales``: [N] w_i (:func:`~dymu.train.scales.loss_scales`)."""
    s1, run_dir = cfg.stage1, Path(run_dir)
    device = resolve_device(cfg.run.device)
    prec = Precision.from_config(cfg.run, device)
    dist.per_rank_batch(s1.batch_size, "stage1.batch_size")  # fail before any work
    dist.setup(device)
    streams = TreeStreams.of(streams)
    for m in streams.modules():
        frozen(m, device)
    anchor = streams.tuned
    net = frozen(MixtureNet(streams), device)
    prec.prepare(net)  # the anchor's layers, in place; released after training
    flops = Flops.of(space, device)
    torch.manual_seed(cfg.run.seed)  # the hypernet's initial weights
    edge = EdgeHypernet(
        len(anchor.tasks), anchor.num_layers, self_bias=s1.self_bias, min_budget=flops.low,
        trunk=s1.trunk,
    ).to(device)  # fmt: skip
    opt = torch.optim.Adam(edge.parameters(), lr=s1.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s1.lr_every, gamma=s1.lr_decay)
    sym_affinity = ((affinity + affinity.T) / 2).to(device)  # RSA's rows are not symmetric
    scales = scales.to(device)  # [N] w_i, :func:`~dymu.train.scales.loss_scales`
    step = EdgeStep(
        s1, edge, net, anchor.tasks, flops, scales, sym_affinity, opt, sched, prec,
        np.random.default_rng(cfg.run.seed),
        torch.Generator(device=device).manual_seed(cfg.run.seed), device,
    )  # fmt: skip
    loop = StepLoop(
        name="stage1",
        label="stage 1",
        desc="stage 1 (edge hypernet)",
        run_dir=run_dir,
        checkpoint=run_dir / CHECKPOINT,
        config_hash=stage1_hash(cfg),
        steps=s1.steps,
        every=cfg.run.checkpoint_every,
        model=edge,
        optimizer=opt,
        scheduler=sched,
        step=step,
        show=("loss", "temperature"),
    )
    workers = cfg.stage0.workers
    step.batches = loop.batches(train_ds, s1.batch_size, cfg.run.seed, resume, workers, device)
    # Under torchrun: DDP averages the edge hypernet's gradients over the ranks.
    with parallel.data_parallel(edge, device) as step.hypernet:
        last = loop.run()
    prec.release(net)
    meta = {"config_hash": loop.config_hash, "tasks": anchor.task_names}
    meta["num_layers"] = anchor.num_layers
    spec = resolve_specs(cfg)["stage1"].to_json()
    final = {k: last[k] for k in ("loss", "task", "omega", "budget") if k in last}
    record = loop.finish(
        run_dir / EDGE_WEIGHTS, run_dir / EDGE_JSON, meta, s1.batch_size, spec=spec, final=final,
        loss_scales=scales.tolist(), min_flops_fraction=flops.low, precision=prec.describe(),
    )  # fmt: skip
    return edge.cpu(), record


def _scalars(d, l_task, reg, penalty, s1, flops: Flops, sched) -> dict[str, float]:
    """A logged step's scalars: the loss and its terms over the global batch, the
    temperature, learning rate, and the FLOPs the parent distributions expect against the
    budgets drawn (fractions of the anchor's)."""
    task = dist.all_reduce_sums({"task": l_task.item()})["task"]  # every rank takes part
    with torch.no_grad():
        spent = sum(
            float(expected_flops(d.nu[g], flops.nodes, flops.heads)) for g in range(s1.draws)
        )
    return {
        "loss": task + reg.item() + s1.lambda_budget * penalty.item(),
        "task": task,
        "omega": reg.item(),
        "budget": penalty.item(),
        "temperature": d.tau,
        "lr": sched.get_last_lr()[0],
        "flops_fraction": spent / s1.draws / flops.full,
        "budget_asked": float(np.mean(d.bs)),
    }
