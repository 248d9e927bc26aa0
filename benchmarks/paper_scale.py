"""Paper-scale training throughput of stages 0, 1 and 2 against a straightforward loop.

The NYU-v2-sized configuration of the paper: 3 tasks (13-class semseg, depth, normals),
ResNet-34 streams with DeepLabv3+ heads, 288x384 inputs. Inputs and targets are synthetic
random tensors of NYU-v2's shapes and value ranges (the benchmark measures compute, not
data loading; one batch is made once and reused every step). For each stage it measures
training images/s and peak memory of two implementations of the same step:

- ``dymu``: the library's modules as ``train_stage0/1/2`` use them (stage 0 the stacked
  streams, stage 1 :class:`~dymu.models.mixture.MixtureNet`, stage 2
  :class:`~dymu.space.treenet.TreeNet`), under ``--precision`` and ``--channels-last``;
- ``looped``: the reference, a straightforward implementation on the same anchor weights:
  streams run one after another in Python, parent mixtures summed parent by parent, fp32,
  contiguous layout, no compilation.

Speed-up = dymu images/s / looped images/s. Goal on a GPU: stage 1 >= 3x. Each (stage,
implementation) runs in a fresh process of this script, so its peak memory is its own.
At startup both implementations run every stage at 64x64 in float64 and must give the same
outputs, losses and gradients, so the comparison is between equal computations. Prints and
saves JSON.

    python benchmarks/paper_scale.py --threads 1 --batch 2 --draws 2 --steps 2 --warmup 1 \
        --out benchmarks/results/paper_scale_cpu.json
    python benchmarks/paper_scale.py --device cuda --precision bf16 --channels-last \
        --batch 8 --out benchmarks/results/paper_scale_gpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from dymu.compile.bench import process_memory_mib
from dymu.config import ModelConfig, Stage0Config, Stage1Config, Stage2Config
from dymu.data.nyuv2 import NYUV2_INFO
from dymu.dist import WHOLE
from dymu.errors import UserError
from dymu.hypernet.edge import EdgeHypernet
from dymu.hypernet.weight import WeightHypernet, bn_layout
from dymu.io import write_json
from dymu.losses import task_loss
from dymu.models.anchor import Anchor, StackedAnchor, build_anchor
from dymu.models.mixture import MixtureNet, path_weights
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import anchor_flops, load_space, min_flops, save_space
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.tasks.base import IGNORE_INDEX
from dymu.train.draws import draw_parents, group_parts
from dymu.train.objective import Flops, step_terms
from dymu.train.precision import Precision
from dymu.train.stage0 import Stage0Objective
from dymu.train.stage2 import draw_tree

ROOT = Path(__file__).resolve().parent.parent
STAGES = (0, 1, 2)
IMPLS = ("dymu", "looped")
GOAL_STAGE1_SPEEDUP_GPU = 3.0
SEED = 0
CHECK_TOLERANCE = 1e-6  # max |dymu - looped| / max |looped| per compared tensor, float64

Batch = dict[str, Tensor]
Step = Callable[[], Tensor]


# --------------------------------------------------------------------------- inputs


def nyuv2_specs():
    """The task specs of NYU-v2 (semseg 13 classes, depth, normals), from the data module."""
    return NYUV2_INFO.select(NYUV2_INFO.default_tasks)


def synthetic_batch(specs, batch: int, size: tuple[int, int], device: torch.device) -> Batch:
    """Random image and targets valid for each task (dymu.tasks.base conventions).

    semseg: class ids with about 10% ignored pixels; depth: positive, about 5% without a
    measurement (0); normals: unit vectors.
    """
    gen = torch.Generator().manual_seed(SEED)
    h, w = size
    out = {"image": torch.rand(batch, 3, h, w, generator=gen)}
    for spec in specs:
        if spec.kind == "semseg":
            label = torch.randint(0, spec.num_classes, (batch, h, w), generator=gen)
            label[torch.rand(batch, h, w, generator=gen) < 0.1] = IGNORE_INDEX
            out[spec.name] = label
        elif spec.kind == "depth":
            depth = 0.5 + 9.5 * torch.rand(batch, 1, h, w, generator=gen)
            depth[torch.rand(batch, 1, h, w, generator=gen) < 0.05] = 0.0
            out[spec.name] = depth
        elif spec.kind == "normals":
            n = torch.randn(batch, 3, h, w, generator=gen)
            out[spec.name] = n / n.norm(dim=1, keepdim=True).clamp_min(1e-6)
        else:
            raise ValueError(f"no synthetic target for task kind {spec.kind!r}")
    return {k: v.to(device) for k, v in out.items()}


def make_anchor(backbone: str, head: str, device: torch.device, width: int = 16) -> Anchor:
    """The anchor both implementations share; same seed, so every process builds the same."""
    # Streams from different seeds, as after training: with one shared initialisation every
    # stream computes the same features, parent mixtures change nothing, and stage 1's
    # gradient through them (and the check of it) would vanish.
    model = ModelConfig(backbone=backbone, dense_head=head, width=width, shared_init=False)
    return build_anchor(model, nyuv2_specs(), seed=SEED).to(device)


# --------------------------------------------------------------------------- the reference


def looped_stage0_outputs(anchor: Anchor, image: Tensor) -> dict[str, Tensor]:
    """Reference stage-0 forward: each stream on the image on its own, then its head."""
    size = (image.shape[-2], image.shape[-1])
    out = {}
    for j, task in enumerate(anchor.tasks):
        feats = []
        x = image
        for layer in anchor.streams[j].layers:
            x = layer(x)
            feats.append(x)
        out[task.name] = anchor.run_head(j, feats, size)
    return out


def looped_mixture_outputs(anchor: Anchor, image: Tensor, v: Tensor) -> dict[str, Tensor]:
    """Reference stage-1 forward: node (l, j) reads sum_i v[l-1, j, i] * y(l-1, i), summed
    parent by parent, and every stream layer is called on its own.

    ``v`` is [G, L-1, N, N]; group g of the batch (consecutive, equal size) runs with v[g].
    """
    n, num_layers = len(anchor.tasks), anchor.num_layers
    size = (image.shape[-2], image.shape[-1])
    batch = image.shape[0]
    w = v.repeat_interleave(batch // v.shape[0], dim=0)  # [B, L-1, N, N]: one set per image
    ys = [anchor.streams[j].layers[0](image) for j in range(n)]
    feats = [ys]
    for layer in range(1, num_layers):
        new = []
        for j in range(n):
            mixed = w[:, layer - 1, j, 0].view(-1, 1, 1, 1) * ys[0]
            for i in range(1, n):
                mixed = mixed + w[:, layer - 1, j, i].view(-1, 1, 1, 1) * ys[i]
            new.append(anchor.streams[j].layers[layer](mixed))
        ys = new
        feats.append(ys)
    q = path_weights(w)  # [B, L, N, N]: weight of node (l, i) on task j's path
    out = {}
    for j, task in enumerate(anchor.tasks):
        head = anchor.heads[task.name]
        low = None
        if head.low_layer is not None:
            low = q[:, head.low_layer, j, 0].view(-1, 1, 1, 1) * feats[head.low_layer][0]
            for i in range(1, n):
                low = low + q[:, head.low_layer, j, i].view(-1, 1, 1, 1) * feats[head.low_layer][i]
        out[task.name] = head(ys[j], low, size)
    return out


def looped_tree_outputs(
    anchor: Anchor, tree: TreeSpec, image: Tensor, offsets: dict
) -> dict[str, Tensor]:
    """Reference stage-2 forward: the tree's used nodes one by one, each stream layer run
    with its BatchNorm affine parameters shifted by the weight hypernet's offsets."""
    tree = tree.canonical()
    size = (image.shape[-2], image.shape[-1])
    nodes: dict[tuple[int, int], Tensor] = {}
    for layer, used in enumerate(tree.used()):
        for j, is_used in enumerate(used):
            if not is_used:
                continue
            x = image if layer == 0 else nodes[(layer - 1, tree.parents[layer - 1][j])]
            module = anchor.streams[j].layers[layer]
            params = dict(module.named_parameters())
            for name, delta in offsets.get((layer, j), {}).items():
                params[name] = params[name] + delta
            nodes[(layer, j)] = functional_call(module, params, (x,))
    out = {}
    for j, task in enumerate(anchor.tasks):
        path = [nodes[(layer, s)] for layer, s in enumerate(tree.path(j))]
        out[task.name] = anchor.run_head(j, path, size)
    return out


# --------------------------------------------------------------------------- the steps


def stage0_step(
    anchor: Anchor, batch: Batch, impl: str, prec: Precision
) -> tuple[Step, Callable[[Tensor], dict[str, Tensor]]]:
    """One stage-0 step (the three task losses, backward, AdamW, as ``train_stage0``) and
    the implementation's forward, for the startup check."""
    s0 = Stage0Config()
    anchor.train()
    if impl == "dymu":
        stacked = StackedAnchor(anchor).to(batch["image"].device).train()
        prec.prepare(stacked)
        objective = Stage0Objective(stacked, None, prec)  # train_stage0's own step objective
        opt = torch.optim.AdamW(stacked.parameters(), lr=s0.lr, weight_decay=s0.weight_decay)

        def losses() -> dict[str, Tensor]:
            return objective(batch)

        def forward(image: Tensor) -> dict[str, Tensor]:
            with prec.autocast():
                out = stacked(prec.to_input(image))
            return prec.fp32(out)

    else:
        opt = torch.optim.AdamW(anchor.parameters(), lr=s0.lr, weight_decay=s0.weight_decay)

        def losses() -> dict[str, Tensor]:
            out = looped_stage0_outputs(anchor, batch["image"])
            return {t.name: t.loss(out[t.name], batch[t.name]) for t in anchor.tasks}

        def forward(image: Tensor) -> dict[str, Tensor]:
            return looped_stage0_outputs(anchor, image)

    def step() -> Tensor:
        loss = sum(losses().values())
        opt.zero_grad(set_to_none=True)
        prec.backward(loss)
        prec.step(opt)
        return loss.detach()

    return step, forward


class _Stage1:
    """Stage 1's step around a forward ``(image, v) -> outputs``, in one process.

    The draws and Gumbel sampling (``draw_parents``) and the loss terms (``step_terms``) are
    ``train_stage1``'s own functions; everything but the image network is the same code for
    both implementations.
    The loss scales w_i are 1 (they change no compute) and the affinity is a fixed
    symmetric matrix.
    """

    def __init__(
        self, anchor: Anchor, space: nx.DiGraph, batch: Batch, draws: int, prec: Precision
    ) -> None:
        s1 = Stage1Config(batch_size=batch["image"].shape[0], draws=draws)
        self.cfg = s1
        device = batch["image"].device
        n, num_layers = len(anchor.tasks), anchor.num_layers
        self.flops = Flops.of(space, device)
        self.low = self.flops.low
        self.parts = group_parts(s1.batch_size, draws, WHOLE)  # one process: every group
        torch.manual_seed(SEED)
        self.edge = EdgeHypernet(n, num_layers, self_bias=s1.self_bias, min_budget=self.low).to(
            device
        )
        self.opt = torch.optim.Adam(self.edge.parameters(), lr=s1.lr)
        gen = torch.Generator().manual_seed(SEED)
        a = torch.rand(n, n, generator=gen)
        self.affinity = ((a + a.T) / 2).fill_diagonal_(1.0).to(device)
        self.scales = torch.ones(n, device=device)
        self.rng = np.random.default_rng(SEED)
        self.gen = torch.Generator(device=device).manual_seed(SEED)
        self.batch, self.draws, self.prec, self.tasks = batch, draws, prec, anchor.tasks
        self.index = 0

    def __call__(self, forward: Callable[[Tensor, Tensor], dict[str, Tensor]]) -> Tensor:
        s1, device = self.cfg, self.batch["image"].device
        d = draw_parents(self.edge, self.edge, s1, self.index, self.low, self.rng, self.gen, device)
        # [G, ...] -> [B, ...]: one set of parent weights per image, as train_stage1 does
        v_rows = d.v.repeat_interleave(self.batch["image"].shape[0] // self.draws, dim=0)
        out = forward(self.batch["image"], v_rows)
        l_task, reg, penalty = step_terms(  # train_stage1's own loss terms
            out, self.batch, self.tasks, self.parts, s1, d, self.scales, self.affinity, self.flops
        )
        loss = l_task + reg + s1.lambda_budget * penalty
        self.opt.zero_grad(set_to_none=True)
        self.prec.backward(loss)
        self.prec.step(self.opt)
        self.index += 1
        return loss.detach()


def stage1_step(
    anchor: Anchor, space: nx.DiGraph, batch: Batch, impl: str, prec: Precision, draws: int
) -> tuple[Step, _Stage1]:
    """One stage-1 step: anchor frozen (eval), gradients into the edge hypernet only."""
    anchor.eval()
    anchor.requires_grad_(False)
    runner = _Stage1(anchor, space, batch, draws, prec)
    if impl == "dymu":
        net = MixtureNet(anchor).to(batch["image"].device).eval()
        net.requires_grad_(False)
        prec.prepare(net)

        def forward(image: Tensor, v: Tensor) -> dict[str, Tensor]:
            with prec.autocast():
                out = net(prec.to_input(image), v)
            return prec.fp32(out)

    else:

        def forward(image: Tensor, v: Tensor) -> dict[str, Tensor]:
            return looped_mixture_outputs(anchor, image, v)

    runner.forward = forward
    return (lambda: runner(forward)), runner


class _Stage2:
    """Stage 2's step around a forward ``(tree, image, offsets) -> outputs``: a frozen random
    edge hypernet, ``train_stage2``'s own draw (``draw_tree``: derived and repaired tree),
    BN offsets from the weight hypernet, the preference-weighted task loss, Adam."""

    def __init__(self, anchor: Anchor, space: nx.DiGraph, batch: Batch, prec: Precision):
        s1, s2 = Stage1Config(), Stage2Config()
        self.cfg = s2
        device = batch["image"].device
        n = len(anchor.tasks)
        self.low = min_flops(space) / anchor_flops(space)
        torch.manual_seed(SEED)
        self.edge = EdgeHypernet(
            n, anchor.num_layers, self_bias=s1.self_bias, min_budget=self.low
        ).to(device)
        self.edge.eval().requires_grad_(False)
        torch.manual_seed(SEED + 1)
        self.weights = WeightHypernet(n, bn_layout(anchor.streams)).to(device)
        self.opt = torch.optim.Adam(self.weights.parameters(), lr=s2.lr)
        self.scales = torch.ones(n, device=device)
        self.rng = np.random.default_rng(SEED + 1)
        self.space, self.batch, self.prec, self.tasks = space, batch, prec, anchor.tasks
        self.fractions: list[float] = []  # FLOPs of each step's tree, fraction of the anchor

    def __call__(self, forward: Callable[[TreeSpec, Tensor, dict], dict[str, Tensor]]) -> Tensor:
        image = self.batch["image"]
        r, b, tree = draw_tree(
            self.edge, self.space, self.cfg.dirichlet, self.low, self.rng, image.device
        )
        self.fractions.append(tree.flops(self.space) / anchor_flops(self.space))
        offsets = self.weights(r, b)
        out = forward(tree, self.batch["image"], offsets)
        losses = torch.stack([t.loss(out[t.name], self.batch[t.name]) for t in self.tasks])
        loss = task_loss(losses, r, self.scales)
        self.opt.zero_grad(set_to_none=True)
        self.prec.backward(loss)
        self.prec.step(self.opt)
        return loss.detach()


def stage2_step(
    anchor: Anchor, space: nx.DiGraph, batch: Batch, impl: str, prec: Precision
) -> tuple[Step, _Stage2]:
    """One stage-2 step: anchor and edge hypernet frozen, gradients into the weight hnet."""
    anchor.eval()
    anchor.requires_grad_(False)
    runner = _Stage2(anchor, space, batch, prec)
    if impl == "dymu":
        prec.prepare(anchor)
        nets: dict[str, TreeNet] = {}

        def forward(tree: TreeSpec, image: Tensor, offsets: dict) -> dict[str, Tensor]:
            net = nets.setdefault(tree.hash(), TreeNet(anchor, tree))
            with prec.autocast():
                out = net(prec.to_input(image), offsets)
            return prec.fp32(out)

    else:

        def forward(tree: TreeSpec, image: Tensor, offsets: dict) -> dict[str, Tensor]:
            return looped_tree_outputs(anchor, tree, image, offsets)

    runner.forward = forward
    return (lambda: runner(forward)), runner


def build_step(
    stage: int,
    impl: str,
    anchor: Anchor,
    space: nx.DiGraph,
    batch: Batch,
    prec: Precision,
    draws: int,
) -> tuple[Step, Any]:
    """The step of ``stage`` for ``impl`` and its state (forward or hypernet runner)."""
    if stage == 0:
        return stage0_step(anchor, batch, impl, prec)
    if stage == 1:
        return stage1_step(anchor, space, batch, impl, prec, draws)
    return stage2_step(anchor, space, batch, impl, prec)


# --------------------------------------------------------------------------- the startup check


def _rel_diff(a: Sequence[Tensor | None], b: Sequence[Tensor | None]) -> float:
    """Largest over pairs of max |a - b| / max |b| (a missing gradient counts as zeros)."""
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        if x is None and y is None:
            continue
        x = torch.zeros_like(y) if x is None else x
        y = torch.zeros_like(x) if y is None else y
        x, y = x.detach().double(), y.detach().double()
        scale = y.abs().max().item()
        diff = (x - y).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _check_outputs(stage: int, anchor: Anchor, state: Any, image: Tensor) -> dict[str, Tensor]:
    """The implementation's forward on fixed inputs: stage 1 random soft parent weights,
    stage 2 a random tree with random BatchNorm offsets (seeded, so equal for both)."""
    n, num_layers = len(anchor.tasks), anchor.num_layers
    gen = torch.Generator().manual_seed(SEED)
    if stage == 0:
        return state(image)
    if stage == 1:
        v = torch.randn(2, num_layers - 1, n, n, generator=gen).softmax(-1)  # [G, L-1, N, N]
        return state.forward(image, v.to(image.device))
    tree = TreeSpec.random(n, num_layers, np.random.default_rng(SEED))
    offsets = {
        node: {
            f"{name}.{key}" if name else key: 0.1 * torch.randn(c, generator=gen).to(image.device)
            for name, c in bns
            for key in ("weight", "bias")
        }
        for node, bns in bn_layout(anchor.streams)
    }
    return state.forward(tree, image, offsets)


def check_equal(
    backbone: str,
    head: str,
    stages: Sequence[int],
    size: tuple[int, int],
    device: torch.device,
    width: int = 16,
) -> dict[str, float]:
    """Run each stage's forward and one step with both implementations and compare.

    In float64 at batch 2: in float32, BatchNorm after ASPP's global pooling normalises two
    values per channel, which amplifies the rounding differences of grouped against plain
    convolutions far beyond any fixed tolerance; float64 leaves only the differences of
    the computations themselves. Compared: the forward's task outputs (stage 0 on the
    image, stage 1 on random soft parent weights, stage 2 on a random tree with random
    BatchNorm offsets), the step's loss, and the gradients of what the step trains (stage 0
    the heads, stage 1 the edge hypernet, stage 2 the weight hypernet) as one vector.

    Returns:
        The largest relative difference per stage (``"stage0"`` ...).

    Raises:
        RuntimeError: a difference above ``CHECK_TOLERANCE``.
    """
    prec = Precision(kind="fp32", device=device)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # every model, hypernet and input built below
    try:
        base = make_anchor(backbone, head, torch.device("cpu"), width)
        space = anchor_space(base, size)
        base.to(device)
        batch = synthetic_batch(nyuv2_specs(), 2, size, device)
        diffs = {}
        for stage in stages:
            got: dict[str, list[Tensor | None]] = {}
            for impl in IMPLS:
                anchor = copy.deepcopy(base)
                step, state = build_step(stage, impl, anchor, space, batch, prec, draws=2)
                tensors: list[Tensor | None] = []
                torch.manual_seed(SEED)  # same dropout masks in the heads (stage 0)
                tensors += list(_check_outputs(stage, anchor, state, batch["image"]).values())
                torch.manual_seed(SEED)
                tensors.append(step())
                hnet = anchor.heads if stage == 0 else (state.edge if stage == 1 else state.weights)
                # One vector: the tolerance is relative to the largest gradient.
                grads = [
                    torch.zeros_like(p) if p.grad is None else p.grad for p in hnet.parameters()
                ]
                tensors.append(torch.cat([g.flatten() for g in grads]))
                got[impl] = tensors
            diffs[f"stage{stage}"] = _rel_diff(got["dymu"], got["looped"])
            if diffs[f"stage{stage}"] > CHECK_TOLERANCE:
                raise RuntimeError(
                    f"stage {stage}: dymu and the looped reference differ by "
                    f"{diffs[f'stage{stage}']:.2e} (relative) at {size[0]}x{size[1]}; they "
                    "do not compute the same thing"
                )
    finally:
        torch.set_default_dtype(default)
    return diffs


# --------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Step, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """Wall time of ``steps`` steps after ``warmup`` untimed ones (CUDA synchronised)."""
    for _ in range(warmup):
        step()
    times = []
    loss = None
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"step_s": [round(t, 4) for t in times], "last_loss": float(loss)}


def measure(args: argparse.Namespace, stage: int, impl: str, space: nx.DiGraph) -> dict:
    """images/s and peak memory of one (stage, implementation), from a fresh model."""
    device = torch.device(args.device)
    rss_before = process_memory_mib("VmRSS")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    anchor = make_anchor(args.backbone, args.head, device, args.width)
    batch = synthetic_batch(nyuv2_specs(), args.batch, args.size, device)
    if impl == "dymu":
        prec = Precision(kind=args.precision, device=device, channels_last=args.channels_last)
    else:
        prec = Precision(kind="fp32", device=device)
    step, state = build_step(stage, impl, anchor, space, batch, prec, args.draws)
    result = time_steps(step, device, args.steps, args.warmup)
    seconds = sum(result["step_s"])
    result["images_per_s"] = round(args.steps * args.batch / seconds, 3)
    result["step_s_mean"] = round(seconds / args.steps, 4)
    # Less sensitive than the mean to other jobs on a shared machine.
    result["images_per_s_median_step"] = round(args.batch / float(np.median(result["step_s"])), 3)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - allocated_before
        result["peak_memory_mib"] = round(peak / 2**20, 1)
    else:
        peak = process_memory_mib("VmHWM")
        # In-process, the peak may come from an earlier measurement: not reported.
        fresh = not args.in_process and peak is not None and rss_before is not None
        result["peak_memory_mib"] = round(peak - rss_before, 1) if fresh else None
    if stage == 2:
        timed = state.fractions[args.warmup :]
        result["tree_flops_fraction_mean"] = round(float(np.mean(timed)), 4)
    return result


def _run_worker(argv: list[str], stage: int, impl: str, space_file: Path, tmp: Path) -> dict:
    """``measure`` in a fresh process of this script (its own peak memory)."""
    result_file = tmp / f"stage{stage}_{impl}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv]
    cmd += ["--worker", f"{stage}:{impl}", "--space", str(space_file), "--result", str(result_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage} {impl} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result_file.read_text())


def _load_average() -> float | None:
    """The 1-minute load average (other jobs on the machine slow the measurements)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------------- command line


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HxW, e.g. 288x384, got {text!r}") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return h, w


def _stages(text: str) -> list[int]:
    try:
        stages = sorted({int(s) for s in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"stages must be like 0,1,2, got {text!r}") from None
    if not stages or any(s not in STAGES for s in stages):
        raise argparse.ArgumentTypeError(f"stages must be among 0,1,2, got {text!r}")
    return stages


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true", help="dymu path only")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--draws", type=int, default=Stage1Config().draws, help="stage 1 (r, b)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--stages", type=_stages, default=list(STAGES), help="e.g. 0,1,2")
    parser.add_argument("--size", type=_size, default=NYUV2_INFO.default_size, help="HxW")
    parser.add_argument("--backbone", default="resnet34")
    parser.add_argument("--width", type=int, default=16, help="tiny_resnet only (tests)")
    parser.add_argument("--head", default="deeplabv3plus", help="head of the dense tasks")
    parser.add_argument("--check-size", type=_size, default=(64, 64), help="startup check HxW")
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocess per measurement (no CPU memory)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/paper_scale.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # STAGE:IMPL, internal
    parser.add_argument("--space", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key in ("batch", "draws", "steps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1")
    if args.precision == "fp16" and not args.device.startswith("cuda"):
        parser.error("--precision fp16 needs --device cuda (use bf16 on a CPU)")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if 1 in args.stages and args.batch % args.draws:
        parser.error(f"--batch ({args.batch}) must be a multiple of --draws ({args.draws})")
    if 0 in args.stages and args.batch < 2:
        parser.error("--batch must be >= 2: stage 0 trains BatchNorm on batch statistics")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def _setup(args: argparse.Namespace) -> torch.device:
    """The device, checked, with the thread count applied."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    Precision(kind=args.precision, device=device, channels_last=args.channels_last)  # fail early
    return device


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark: the startup check, every measurement, the summary."""
    device = _setup(args)
    load_before = _load_average()
    tick = time.perf_counter()
    check = check_equal(args.backbone, args.head, args.stages, args.check_size, device, args.width)
    check_s = time.perf_counter() - tick
    print(f"startup check passed in {check_s:.1f} s: {check}", flush=True)
    anchor = make_anchor(args.backbone, args.head, torch.device("cpu"), args.width)
    space = anchor_space(anchor, args.size)
    del anchor
    stages: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dymu-paper-scale-") as tmp:
        space_file = save_space(space, Path(tmp) / "space.json")
        for stage in args.stages:
            row: dict[str, Any] = {}
            for impl in IMPLS:
                if args.in_process:
                    row[impl] = measure(args, stage, impl, space)
                else:
                    row[impl] = _run_worker(args.argv, stage, impl, space_file, Path(tmp))
                print(
                    f"stage {stage} {impl}: {row[impl]['images_per_s']} images/s, "
                    f"peak memory {row[impl]['peak_memory_mib']} MiB",
                    flush=True,
                )
            row["speedup"] = round(row["dymu"]["images_per_s"] / row["looped"]["images_per_s"], 3)
            stages[f"stage{stage}"] = row
    if device.type == "cuda":
        memory = (
            "peak torch.cuda.max_memory_allocated during the measurement minus the memory "
            "allocated before the model was built (weights, optimizer state, activations, "
            "gradients), MiB"
        )
    elif args.in_process:
        memory = "not measured (--in-process: a process's peak RSS never decreases)"
    else:
        memory = (
            "peak resident set size of the measurement's own process (VmHWM in "
            "/proc/self/status) minus its resident set size just before the model was built "
            "(weights, optimizer state, activations, gradients, allocator caches), MiB"
        )
    speedup_1 = stages.get("stage1", {}).get("speedup")
    return {
        "benchmark": "paper_scale",
        "command": "python benchmarks/paper_scale.py " + shlex.join(args.argv),
        "data": (
            "synthetic: random images and targets of NYU-v2's shapes (semseg 13 classes with "
            "~10% ignored pixels, positive depth with ~5% missing, unit normals); one batch "
            "reused every step, no data loading measured"
        ),
        "tasks": [s.name for s in nyuv2_specs()],
        "backbone": args.backbone,
        "head": args.head,
        "input": [args.batch, 3, *args.size],
        "batch": args.batch,
        "stage1_draws": args.draws,
        "steps": args.steps,
        "warmup": args.warmup,
        "anchor_gflops_per_image": round(anchor_flops(space) / 1e9, 3),
        "flops_convention": "fvcore, one fused multiply-add = one FLOP",
        "min_tree_flops_fraction": round(min_flops(space) / anchor_flops(space), 4),
        "implementations": {
            "dymu": {
                "what": (
                    "stage 0 StackedAnchor (grouped convolutions) with train_stage0's "
                    "objective and AdamW; stage 1 MixtureNet (one contraction per layer), "
                    "train_stage1's draws and loss terms; stage 2 TreeNet with weight-hnet "
                    "BN offsets and train_stage2's draws"
                ),
                "precision": args.precision,
                "channels_last": args.channels_last,
            },
            "looped": {
                "what": (
                    "streams run one after another in Python; stage 1 mixtures summed parent "
                    "by parent, each stream layer called separately; stage 2 the tree's nodes "
                    "one by one with the offsets; same hypernets, losses and optimizers"
                ),
                "precision": "fp32",
                "channels_last": False,
            },
        },
        "stages": stages,
        "speedup_definition": "dymu images/s / looped images/s",
        "goal": {
            "stage1_speedup_on_gpu": GOAL_STAGE1_SPEEDUP_GPU,
            "met": (speedup_1 >= GOAL_STAGE1_SPEEDUP_GPU)
            if device.type == "cuda" and speedup_1 is not None
            else None,
        },
        "peak_memory_meaning": memory,
        "isolation": "in-process" if args.in_process else "a fresh process per measurement",
        "check": {
            "size": list(args.check_size),
            "batch": 2,
            "precision": "float64 (dymu path without autocast or channels-last)",
            "max_relative_difference": {k: float(f"{v:.3g}") for k, v in check.items()},
            "tolerance": CHECK_TOLERANCE,
        },
        "device": str(device),
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "cuda_tf32": {
            "matmul": torch.backends.cuda.matmul.allow_tf32,
            "cudnn": torch.backends.cudnn.allow_tf32,
        }
        if device.type == "cuda"
        else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "load_average_1min": {"start": load_before, "end": _load_average()},
        "wall_s": round(time.perf_counter() - tick, 1),
    }


def _worker(args: argparse.Namespace) -> int:
    _setup(args)
    stage_text, impl = args.worker.split(":")
    result = measure(args, int(stage_text), impl, load_space(args.space))
    write_json(args.result, result)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.worker:
            return _worker(args)
        out = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
