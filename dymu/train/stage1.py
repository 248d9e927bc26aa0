"""Stage 1: train the edge hypernet on the frozen anchor (METHOD.md 1.4-1.5, DESIGN "Budget").

Each step draws ``stage1.draws`` pairs of a preference r and a budget b, one per equal
group of the batch (:func:`draw_preferences_budgets`). For each pair it samples parent
weights with Gumbel-softmax from the hypernet's alpha(r, b), runs its group through the
anchor with those parent mixtures (:class:`~dymu.models.mixture.MixtureNet`) and takes

    sum_i r_i w_i L_i  +  Omega  +  lambda_b * FLOPs term,

with w_i = 1 / (anchor's own loss on task i) and c = (1 - b) / (1 - min) the paper's
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

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from tqdm.auto import tqdm

from dymu import dist
from dymu.config import Config, Stage1Config, section_hash
from dymu.data.batches import endless, to_device
from dymu.hypernet.edge import EdgeHypernet, sample_parents, temperature
from dymu.losses import (
    budget_penalty,
    budget_target,
    expected_flops,
    omega,
    omega_budget,
    p_use,
    task_loss,
)
from dymu.models.anchor import Anchor
from dymu.models.mixture import MixtureNet
from dymu.run import resolve_device
from dymu.space.graph import anchor_flops, costs, min_flops
from dymu.tasks import Task
from dymu.train import parallel
from dymu.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_finished,
)
from dymu.train.curves import StageLog
from dymu.train.joint import trees_hash
from dymu.train.precision import Precision
from dymu.train.scales import loss_scales

EDGE_WEIGHTS = "edge_hnet.safetensors"
EDGE_JSON = "edge_hnet.json"
CHECKPOINT = "stage1/checkpoint.pt"


def stage1_hash(cfg: Config) -> str:
    """What the edge hypernet depends on: the streams it runs on (stage 0's, tuned by the
    joint stage when it runs), the affinity settings and stage 1."""
    return section_hash(cfg, "affinity", "stage1") + "-" + trees_hash(cfg)


def group_parts(batch_size: int, groups: int, part: dist.Shard) -> list[tuple[int, slice, float]]:
    """Where each draw's group of a global batch lies in this rank's part of it.

    The global batch of ``batch_size`` images is split into ``groups`` equal consecutive
    groups (group g runs with draw g); the rank holds the contiguous ``part``.

    Returns:
        ``(g, local slice, share)`` for every group the rank holds images of: the slice
        indexes the rank's part, and ``share`` is the fraction of group g it holds, so that
        ``sum over ranks of share * (mean loss over the held images)`` is the group's mean.
    """
    size = batch_size // groups
    mine = part.part(batch_size)
    out = []
    for g in range(groups):
        lo, hi = max(g * size, mine.start), min((g + 1) * size, mine.stop)
        if lo < hi:
            out.append((g, slice(lo - mine.start, hi - mine.start), (hi - lo) / size))
    return out


@dataclass(frozen=True)
class Flops:
    """The space's FLOPs that the budget penalty needs, on the training device."""

    nodes: torch.Tensor  # [L, N] float64
    heads: torch.Tensor  # [N] float64
    full: float  # the anchor's
    low: float  # the cheapest tree's, as a fraction of the anchor's

    @classmethod
    def of(cls, space: nx.DiGraph, device: torch.device) -> Flops:
        node_flops, _, head_flops, _ = costs(space)
        full = float(anchor_flops(space))
        return cls(
            torch.tensor(node_flops, dtype=torch.float64, device=device),
            torch.tensor(head_flops, dtype=torch.float64, device=device),
            full,
            min_flops(space) / full,
        )


@dataclass(frozen=True)
class Draws:
    """One step's G draws of (r, b) and the parent weights sampled for them."""

    rs: torch.Tensor  # [G, N] preferences
    bs: np.ndarray  # [G] budgets
    nu: torch.Tensor  # [G, L-1, N, N] parent probabilities alpha(r, b)
    v: torch.Tensor  # [G, L-1, N, N] Gumbel-softmax samples of nu
    cs: list[float]  # [G] the paper's frugality knob c implied by each b
    tau: float  # the Gumbel-softmax temperature of this step


def draw_preferences_budgets(
    s1: Stage1Config, num_tasks: int, low: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """G pairs (r [G, N], b [G]) for one step.

    ``objective: paper``: r ~ Dirichlet(dirichlet), b ~ U(low, 1). ``objective: budget``
    mixes in what the evaluation asks for (METHOD.md 1.9): a share ``uniform_share`` of the
    preferences is uniform on the simplex, and a share ``full_budget_share`` of the budgets
    is exactly 1 (:func:`mix_evaluation_draws`).
    """
    g = s1.draws
    rs = rng.dirichlet([s1.dirichlet] * num_tasks, size=g)  # [G, N]
    bs = rng.uniform(low, 1.0, size=g)  # [G]
    if s1.objective == "paper":
        return rs, bs
    return mix_evaluation_draws(rs, bs, s1.uniform_share, s1.full_budget_share, rng)


def mix_evaluation_draws(
    rs: np.ndarray,
    bs: np.ndarray,
    uniform_share: float,
    full_budget_share: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace a share of the draws (r [G, N], b [G]) by what the evaluation asks for: a
    preference uniform on the simplex (``uniform_share``), a budget of exactly 1
    (``full_budget_share``). Both replacements are drawn every time, then picked, so the
    generator's sequence does not depend on the shares (stages 1 and 2)."""
    g, num_tasks = rs.shape
    flat = rng.dirichlet([1.0] * num_tasks, size=g)  # [G, N] uniform on the simplex
    coins = rng.uniform(size=(2, g))  # [2, G]
    rs = np.where((coins[0] < uniform_share)[:, None], flat, rs)
    bs = np.where(coins[1] < full_budget_share, 1.0, bs)
    return rs, bs


def draw_parents(
    hypernet,
    edge: EdgeHypernet,
    s1: Stage1Config,
    step: int,
    low: float,
    rng: np.random.Generator,
    gen: torch.Generator,
    device: torch.device,
) -> Draws:
    """Stage 1's draws for one step: G pairs (r ~ Dirichlet, b ~ U(low, 1)), alpha(r, b)
    from ``hypernet`` (``edge`` itself, or its DDP wrapper), and Gumbel-softmax samples.

    Consumes ``rng`` and ``gen`` in a fixed order, so equal seeds give equal draws on every
    rank and a resumed run continues the same sequence.
    """
    rs, bs = draw_preferences_budgets(s1, edge.num_tasks, low, rng)
    rs = torch.tensor(rs, dtype=torch.float32, device=device)  # [G, N]
    b_t = torch.tensor(bs, dtype=torch.float32, device=device)
    logits = hypernet(rs, b_t)  # [G, L-1, N, N]
    tau = temperature(step, s1.temperature, s1.temperature_decay, s1.temperature_every)
    v = sample_parents(logits, tau, hard=s1.hard, generator=gen)  # [G, L-1, N, N]
    return Draws(rs, bs, logits.softmax(-1), v, edge.frugality(b_t).tolist(), tau)


def step_terms(
    out: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    tasks: Sequence[Task],
    parts: list[tuple[int, slice, float]],
    s1: Stage1Config,
    draws: Draws,
    scales: torch.Tensor,
    affinity: torch.Tensor,
    flops: Flops,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The three terms of a stage-1 step, each the mean over the G draws.

    Args:
        out, batch: the network's outputs and the targets for this rank's images.
        tasks: the anchor's tasks.
        parts: :func:`group_parts` of the global batch for this rank.
        s1: the stage-1 config (draws, regulariser, lambdas).
        draws: the step's :func:`draw_parents`.
        scales: [N] loss scales w_i; affinity: [N, N] symmetric.
        flops: the space's FLOPs.

    Returns:
        ``(L_task, Omega, budget penalty)``; ``L_task`` holds only this rank's shares of
        the draws' groups (the ranks' values add up to the global one).
    """
    rs, nu = draws.rs, draws.nu
    l_task = reg = penalty = torch.zeros((), device=rs.device)
    for g, rows, share in parts:
        losses = torch.stack([t.loss(out[t.name][rows], batch[t.name][rows]) for t in tasks])
        l_task = l_task + share * task_loss(losses, rs[g], scales) / s1.draws
    for g in range(s1.draws):
        choice = nu[g] if s1.regularise == "alpha" else draws.v[g]
        regulariser = omega if s1.objective == "paper" else omega_budget
        term = regulariser(
            choice,
            affinity,
            rs[g],
            p_use(nu[g]).detach(),
            draws.cs[g],  # paper: c on L_active; budget: the tightness on all of Omega
            lambda_a=s1.lambda_active,
            lambda_i=s1.lambda_inactive,
        )
        reg = reg + term / s1.draws
        b = float(draws.bs[g])
        if s1.objective == "paper":
            over = budget_penalty(nu[g], flops.nodes, flops.heads, b, flops.full)
        else:
            over = budget_target(nu[g], flops.nodes, flops.heads, b, flops.full, s1.lambda_under)
        penalty = penalty + over / s1.draws
    return l_task, reg, penalty


def train_stage1(
    cfg: Config,
    run_dir: Path,
    anchor: Anchor,
    space: nx.DiGraph,
    affinity: torch.Tensor,
    train_ds,
    val_ds,
    resume: bool = False,
) -> tuple[EdgeHypernet, dict[str, Any]]:
    """Train the edge hypernet; write its weights and a summary into ``run_dir``."""
    s1 = cfg.stage1
    device = resolve_device(cfg.run.device)
    prec = Precision.from_config(cfg.run, device)
    dist.per_rank_batch(s1.batch_size, "stage1.batch_size")  # fail before any work
    dist.setup(device)
    main, part, world = dist.is_main(), dist.shard(), dist.world_size()
    parts = group_parts(s1.batch_size, s1.draws, part)  # the draws' groups this rank holds
    mine = part.part(s1.batch_size)
    anchor = anchor.to(device).eval()
    anchor.requires_grad_(False)
    net = MixtureNet(anchor).to(device).eval()
    net.requires_grad_(False)
    prec.prepare(net)  # the anchor's layers, in place; released after training
    n, num_layers, tasks = len(anchor.tasks), anchor.num_layers, anchor.tasks
    flops = Flops.of(space, device)
    low = flops.low
    torch.manual_seed(cfg.run.seed)  # the hypernet's initial weights
    edge = EdgeHypernet(n, num_layers, self_bias=s1.self_bias, min_budget=low).to(device)
    opt = torch.optim.Adam(edge.parameters(), lr=s1.lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=s1.lr_every, gamma=s1.lr_decay)
    sym_affinity = ((affinity + affinity.T) / 2).to(device)  # RSA's rows are not symmetric
    scales = loss_scales(anchor, val_ds, s1.batch_size, device).to(device)
    rng = np.random.default_rng(cfg.run.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.run.seed)
    h = stage1_hash(cfg)
    ckpt = Path(run_dir) / CHECKPOINT
    first, images, seconds = 0, 0, 0.0
    if resume and ckpt.is_file():
        state = load_checkpoint(ckpt, h, "stage-1", edge, opt, sched)
        prec.load_state_dict(state)
        set_rng_state(rng, state["numpy_rng"])
        gen.set_state(state["torch_rng"])
        first, images, seconds = state["step"], state["images"], state["seconds"]
        if main:
            print(f"stage 1: resuming after step {first}/{s1.steps} from {ckpt}")

    bar = tqdm(
        range(first, s1.steps),
        initial=first,
        total=s1.steps,
        desc="stage 1 (edge hypernet)",
        unit="step",
        leave=False,
        disable=not main,
    )
    batches = endless(
        train_ds,
        s1.batch_size,
        cfg.run.seed,
        start=first,
        shard=part,
        workers=cfg.stage0.workers,
        pin_memory=device.type == "cuda",
    )
    last: dict[str, float] = {}
    curve = StageLog(run_dir, "stage1", first, enabled=main)
    # Under torchrun: DDP averages the edge hypernet's gradients over the ranks.
    with parallel.data_parallel(edge, device) as hypernet:
        for step in bar:
            tick = time.perf_counter()
            # G draws of (r, b), one per group of batch_size / G images; the same on every
            # rank (the generators are seeded alike).
            d = draw_parents(hypernet, edge, s1, step, low, rng, gen, device)
            # [G, ...] -> [B, ...] one set per image of the global batch -> this rank's rows
            v_rows = d.v.repeat_interleave(s1.batch_size // s1.draws, dim=0)[mine]
            batch = to_device(next(batches), device)
            # Only the anchor runs under autocast; hypernet, losses and Omega stay float32.
            with prec.autocast():
                out = net(prec.to_input(batch["image"]), v_rows)  # image k ran with v_rows[k]
            out = prec.fp32(out)
            l_task, reg, penalty = step_terms(
                out, batch, tasks, parts, s1, d, scales, sym_affinity, flops
            )
            # DDP averages over the ranks: world x this rank's share of the task term sums
            # the ranks' shares; Omega and the penalty are each rank's (equal) own.
            loss = world * l_task + reg + s1.lambda_budget * penalty
            opt.zero_grad(set_to_none=True)
            prec.backward(loss)
            prec.step(opt)
            sched.step()
            images += s1.batch_size
            seconds += time.perf_counter() - tick
            if step % 10 == 0 or step + 1 == s1.steps:
                task = dist.all_reduce_sums({"task": l_task.item()})["task"]  # every rank
                last = {
                    "loss": task + reg.item() + s1.lambda_budget * penalty.item(),
                    "task": task,
                    "omega": reg.item(),
                    "budget": penalty.item(),
                }
                bar.set_postfix(
                    loss=f"{last['loss']:.3f}",
                    tau=f"{d.tau:.2f}",
                    img_s=f"{images / max(seconds, 1e-9):.0f}",
                )
                with torch.no_grad():  # the FLOPs the parent distributions expect vs asked
                    spent = sum(
                        float(expected_flops(d.nu[g], flops.nodes, flops.heads))
                        for g in range(s1.draws)
                    )
                curve.log(
                    step,
                    **last,
                    temperature=d.tau,
                    lr=sched.get_last_lr()[0],
                    flops_fraction=spent / s1.draws / flops.full,
                    budget_asked=float(np.mean(d.bs)),
                )
            if main and (step + 1) % cfg.run.checkpoint_every == 0 and step + 1 < s1.steps:
                save_checkpoint(
                    ckpt,
                    h,
                    step + 1,
                    edge,
                    opt,
                    sched,
                    numpy_rng=rng_state(rng),
                    torch_rng=gen.get_state(),
                    images=images,
                    seconds=seconds,
                    **prec.state_dict(),
                )
    bar.close()
    curve.close()
    prec.release(net)
    meta = {"config_hash": h, "tasks": anchor.task_names, "num_layers": num_layers}
    record = {
        **meta,
        "steps": s1.steps,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / max(seconds, 1e-9), 1),
        "final": last,
        "loss_scales": scales.tolist(),
        "min_flops_fraction": low,
        "precision": prec.describe(),
    }
    if world > 1:
        record["processes"] = world
    run_dir = Path(run_dir)
    write_finished(run_dir / EDGE_WEIGHTS, run_dir / EDGE_JSON, edge, meta, record, ckpt)
    return edge.cpu(), record
