"""Typed configuration: dataclasses hold every default; YAML and ``key=value`` override.

Resolution order (later wins): dataclass defaults -> YAML file (``-c configs/X.yaml``) ->
``section.key=value`` arguments. Unknown keys and values of the wrong type are
:class:`~dymu.errors.UserError` with one line that names the valid keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from dymu.artifacts import read_text
from dymu.errors import UserError


@dataclass
class SynthConfig:
    """The embedded procedural dataset ``synthscenes`` (see ``dymu/data/synthscenes.py``)."""

    num_train: int = 4000
    num_val: int = 500
    num_test: int = 500
    min_objects: int = 3
    max_objects: int = 5
    color_shape_corr: float = 0.8
    """Probability that an object's colour is its shape's own colour; otherwise the colour
    is uniformly random. Links the ``semseg`` and ``material`` label sets (0 makes them
    independent, 1 makes one a function of the other)."""
    noise: float = 0.02
    """Standard deviation of the (uniform) pixel noise added to the RGB image (0..1 scale)."""

    def check(self, prefix: str) -> None:
        for key in ("num_train", "num_val", "num_test"):
            if getattr(self, key) < 1:
                raise UserError(f"config: {prefix}.{key} must be >= 1, got {getattr(self, key)}")
        if not 1 <= self.min_objects <= self.max_objects <= 8:
            raise UserError(
                f"config: need 1 <= {prefix}.min_objects <= {prefix}.max_objects <= 8, got "
                f"{self.min_objects} and {self.max_objects}"
            )
        if not 0.0 <= self.color_shape_corr <= 1.0:
            raise UserError(f"config: {prefix}.color_shape_corr must be in [0, 1]")
        if not 0.0 <= self.noise <= 0.5:
            raise UserError(f"config: {prefix}.noise must be in [0, 0.5]")


@dataclass
class DataConfig:
    """Which dataset, where it lives, which tasks, and at what size."""

    name: str = "synthscenes"
    root: str | None = None
    """Folder of a real dataset in its standard on-disk layout (unused by synthscenes)."""
    cache_dir: str | None = None
    """Where generated datasets are cached; null = $DYMU_CACHE or ~/.cache/dymu."""
    tasks: list[str] | None = None
    """Task names to use; null = the dataset's default tasks."""
    size: list[int] | None = None
    """Input size [H, W]; null = the dataset's default size."""
    seed: int = 0
    """Seed of generated datasets and of split hold-outs."""
    val_fraction: float = 0.1
    """Share of the training split held out as validation where a dataset has no val split."""
    synth: SynthConfig = field(default_factory=SynthConfig)

    def check(self, prefix: str) -> None:
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 8):
            raise UserError(f"config: {prefix}.size must be [H, W] with both >= 8, got {self.size}")
        if self.seed < 0:
            raise UserError(f"config: {prefix}.seed must be >= 0, got {self.seed}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"config: {prefix}.val_fraction must be in (0, 1)")
        if self.tasks is not None and len(self.tasks) == 0:
            raise UserError(f"config: {prefix}.tasks must name at least one task (or be null)")


@dataclass
class RunConfig:
    """Run-wide settings."""

    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Arithmetic of the training stages' forward passes (``dymu/train/precision.py``):
    ``fp32``; ``bf16`` autocast (CPU or CUDA); ``fp16`` autocast with loss scaling (CUDA
    only). Losses are always float32. A non-fp32 run's artifacts get their own hash."""
    channels_last: bool = False
    """Train with NHWC weights and images (faster convolutions on recent GPUs); a layout
    only, so it changes results by float rounding and leaves the artifacts' hashes alone."""
    checkpoint_every: int = 100
    """Steps between the checkpoints of the joint stage and stages 1 and 2, from which
    ``--resume`` continues (stage 0 checkpoints every epoch). Results do not depend on it."""

    def check(self, prefix: str) -> None:
        if self.checkpoint_every < 1:
            raise UserError(f"config: {prefix}.checkpoint_every must be >= 1")
        if self.precision == "fp16" and self.device == "cpu":
            raise UserError(
                f"config: {prefix}.precision=fp16 needs CUDA ({prefix}.device is cpu); "
                "use bf16 or fp32"
            )
        if self.seed < 0:
            raise UserError(f"config: {prefix}.seed must be >= 0, got {self.seed}")
        dev = self.device
        ok = dev in ("auto", "cpu", "cuda") or (
            dev.startswith("cuda:") and dev.removeprefix("cuda:").isdigit()
        )
        if not ok:
            raise UserError(
                f"config: {prefix}.device must be auto, cpu, cuda or cuda:N, got {dev!r}"
            )


def _widths(values: list[float], key: str) -> list[float]:
    """``values`` as a checked width set (:func:`dymu.models.slim.check_widths`), or one
    line naming ``key``."""
    from dymu.models.slim import check_widths  # models import config, not the reverse

    try:
        return list(check_widths(values))
    except UserError as exc:
        raise UserError(f"config: {key}: {exc}") from exc


@dataclass
class ModelConfig:
    """The anchor: one backbone (cut into searchable layers) and one head per task."""

    backbone: str = "tiny_resnet"
    """Registered backbone builder: tiny_resnet, resnet18, resnet34, mobilenetv2."""
    width: int = 16
    """Base channel width of ``tiny_resnet`` (ignored by the others)."""
    weights: str | None = None
    """Local torchvision-format weight file for every stream's backbone (null = random)."""
    dense_head: str = "deeplabv3plus_light"
    """Head of dense tasks: deeplabv3plus or deeplabv3plus_light."""
    class_head: str = "classification"
    """Head of image-level (classification) tasks."""
    shared_init: bool = True
    """Start every stream's backbone from the same random weights (as fine-tuning all streams
    from one pretrained file does), so that the streams' features stay comparable and a
    cross-task edge feeds a node inputs it can use. False seeds stream j with seed + j."""
    widths: list[float] = field(default_factory=lambda: [1.0])
    """The widths every node of the space may run at (METHOD.md 1.11: its first channels,
    e.g. ``[0.25, 0.5, 0.75, 1.0]``); ``[1.0]``: trees alone. Stage 0 and the joint stage
    train full widths either way, the width stage (:class:`SlimConfig`) the others; stages 1
    and 2 train full-width trees, and widths serve the budgets below the cheapest tree
    (:class:`~dymu.hypernet.derivation.Derivation`)."""

    def check(self, prefix: str) -> None:
        if self.width < 1:
            raise UserError(f"config: {prefix}.width must be >= 1, got {self.width}")
        self.widths = _widths(self.widths, f"{prefix}.widths")


@dataclass
class TowersConfig:
    """Small self-auxiliary towers (METHOD.md 4): one per task, dropped after training."""

    gamma: float = 0.0
    """Weight of each tower's loss next to its task's (0 = no towers)."""
    size: float = 0.1
    """A tower's parameters as a fraction of its task's main head (0 = a linear tower)."""

    def check(self, prefix: str) -> None:
        if self.gamma < 0:
            raise UserError(f"config: {prefix}.gamma must be >= 0, got {self.gamma}")
        if not 0 <= self.size < 1:
            raise UserError(f"config: {prefix}.size must be in [0, 1), got {self.size}")


@dataclass
class Stage0Config:
    """Stage 0: every stream trained alone on its own task."""

    epochs: int = 12
    batch_size: int = 32
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    hflip: bool = True
    """Random horizontal flips (normals' x component is mirrored with the image)."""
    val_every: int = 2
    """Validate every this many epochs (and after the last one)."""
    workers: int = 0
    """DataLoader worker processes for datasets read from files (0 = in the main process);
    stages 1 and 2 use the same number."""
    towers: TowersConfig = field(default_factory=TowersConfig)
    """Auxiliary towers on each stream's last layer while it trains (never saved)."""

    def check(self, prefix: str) -> None:
        self.towers.check(f"{prefix}.towers")
        for key in ("epochs", "batch_size", "val_every"):
            if getattr(self, key) < 1:
                raise UserError(f"config: {prefix}.{key} must be >= 1")
        if self.lr <= 0:
            raise UserError(f"config: {prefix}.lr must be > 0")
        if self.workers < 0:
            raise UserError(f"config: {prefix}.workers must be >= 0")


@dataclass
class AffinityConfig:
    """Task affinity estimation (METHOD.md 1.3)."""

    method: Literal["rsa", "grad_cosine", "lookahead"] = "rsa"
    images: int = 200
    """K: training images whose features RSA compares."""
    batches: int = 20
    """Batches averaged by the gradient-based estimators."""
    batch_size: int = 32
    lookahead_lr: float = 0.01
    """Step size of TAG's virtual step."""

    def check(self, prefix: str) -> None:
        if self.images < 3:
            raise UserError(f"config: {prefix}.images must be >= 3")
        if self.batches < 1 or self.batch_size < 1:
            raise UserError(f"config: {prefix}.batches and batch_size must be >= 1")


@dataclass
class JointConfig:
    """The joint stage (METHOD.md 1.9): every stream fine-tuned on trees of the space, so
    that a cross-task edge feeds its child features it can use; 0 steps skips it."""

    steps: int = 1500
    """Steps of the sandwich (each runs a cheapest tree, random_trees random trees and,
    without ``private``, the anchor tree on one batch)."""
    batch_size: int = 32
    optimizer: Literal["adam", "sgd"] = "adam"
    """adam (AdamW) | sgd (momentum 0.9)."""
    lr: float = 1e-3
    """Learning rate, decayed to 0 by a cosine over the steps."""
    weight_decay: float = 1e-4
    random_trees: int = 1
    """Random trees per step beside a cheapest tree (and the anchor tree without
    ``private``): the sandwich rule."""
    random_kind: Literal["branch", "uniform"] = "branch"
    """How a random tree is drawn: ``branch``, every task leaves the cheapest tree's trunk
    at a uniformly random layer (the trees budgets between the cheapest and the anchor tree
    derive); ``uniform``, every parent uniformly from the N streams."""
    trunk: Literal["best", "random"] = "best"
    """Which stream's trunk the sandwich's cheapest tree runs on: ``best``, the one whose
    cheapest tree has the lowest weighted validation loss on stage 0's streams (chosen once,
    so the trees of tight budgets get every step), or ``random``, a new one every step."""
    distill: float = 1.0
    """Weight of the in-place distillation towards the stage-0 anchor's outputs."""
    private_nodes: bool = True
    """The private-node rule (:class:`~dymu.models.streams.TreeStreams`), in every stage
    after this one: a tree's private nodes (on their own stream's path, for their own task
    alone) and the heads above them keep stage 0's weights, the other nodes run this
    stage's; so a task that shares nothing keeps its single-task network. This stage then
    trains as the trees run (the anchor tree, all private, has nothing to train and leaves
    the sandwich), stage 1 mixes stage 0's outputs in by the probability that a node is
    private (:class:`~dymu.models.mixture.MixtureNet`), and stage 2, the evaluation and
    export run them. False: every node runs this stage's weights, the anchor tree trains
    in the sandwich too."""
    hflip: bool = True

    def check(self, prefix: str) -> None:
        if self.steps < 0 or self.batch_size < 1 or self.random_trees < 0:
            raise UserError(
                f"config: {prefix}.steps and random_trees must be >= 0, batch_size >= 1"
            )
        if self.lr <= 0 or self.distill < 0 or self.weight_decay < 0:
            raise UserError(f"config: {prefix}.lr must be > 0, distill and weight_decay >= 0")


@dataclass
class SlimConfig:
    """The width stage (METHOD.md 1.11): a copy of the streams trees run, trained for the
    configurations that narrow nodes; every node in a narrowed context runs it, while
    full-width trees keep the joint stage's weights, so narrow configurations cannot cost
    them anything. It runs only when ``model.widths`` holds more than full width; batch
    size, optimizer, learning rate, weight decay and flips are the joint stage's."""

    steps: int = 1500
    """Steps of the sandwich over widths (the smallest configuration and ``configs``
    random ones on one batch)."""
    configs: int = 2
    """Random configurations per step beside the smallest: a branch tree of the trunk
    (:attr:`JointConfig.random_kind` ``branch``) at widths drawn by ``sample``."""
    sample: Literal["random", "preference"] = "random"
    """How a random configuration's nodes get their widths: ``random``, each node a width
    drawn uniformly; ``preference``, the widths derivation gives a random preference
    (Dirichlet(1)) at a random budget between the tree at the narrowest widths and at
    full width: every node narrowest, widened by the preference rule at ``strength``
    while the budget allows, the kind of configuration budgets below the cheapest tree
    run."""
    distill: float = 1.0
    """Weight of the in-place distillation of a configuration's outputs towards the same
    tree at full width (the largest network of its family)."""
    features: float = 1.0
    """Weight of the feature distillation (ECMT's configuration-invariant distillation): every
    node in a narrowed context towards the first channels of the same node at full width."""
    strength: float = 10.0
    """How strongly widths follow the preference below the cheapest tree (ECMT's rule,
    :func:`~dymu.space.derive_widths.preference_omega`): each width step of a node is worth
    ``strength`` times the preference weight of the tasks it serves. Used when configurations
    are derived, not in training."""
    fill: float = 0.0
    """A budget whose full-width tree spends less than this fraction of it runs a
    configuration with widths instead, where one spends more (0: only budgets below the
    cheapest tree run widths). Used when configurations are derived, not in training."""

    def check(self, prefix: str) -> None:
        if self.steps < 1 or self.configs < 0:
            raise UserError(f"config: {prefix}.steps must be >= 1 and configs >= 0")
        if self.distill < 0 or self.features < 0:
            raise UserError(f"config: {prefix}.distill and features must be >= 0")
        if not self.strength > 0:
            raise UserError(f"config: {prefix}.strength must be > 0, got {self.strength}")
        if not 0 <= self.fill <= 1:
            raise UserError(f"config: {prefix}.fill must be in [0, 1], got {self.fill}")


@dataclass
class Stage1Config:
    """Stage 1: the edge hypernet with the branching-regularised loss (METHOD.md 1.4-1.5)."""

    objective: Literal["budget", "paper"] = "budget"
    """``budget`` (METHOD.md 1.9): Omega averaged over layers and pairs and scaled by the
    budget's tightness, FLOPs pulled towards the budget from both sides, and draws that
    include budget 1 and uniform preferences. ``paper`` (METHOD.md 1.5): summed Omega with
    the paper's c on L_active only, a FLOPs ceiling, Dirichlet draws only."""
    steps: int = 3000
    """Training steps (the paper: 30k on GPUs; one (r, b) per mini-batch)."""
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay: float = 0.3
    lr_every: int = 1400
    """Multiply the learning rate by ``lr_decay`` every this many steps (paper: 14k of 30k)."""
    dirichlet: float = 0.2
    """Preferences r ~ Dirichlet(dirichlet) per draw."""
    uniform_share: float = 0.3
    """``objective: budget`` only: the share of draws whose preference is uniform on the
    simplex (Dirichlet(1), what the evaluation sweep asks) instead of Dirichlet(dirichlet)."""
    full_budget_share: float = 0.2
    """``objective: budget`` only: the share of draws at budget 1 exactly."""
    lambda_under: float = 1.0
    """``objective: budget`` only: weight of the unspent-budget side of the FLOPs target
    (relative to ``lambda_budget``'s over-budget side)."""
    draws: int = 4
    """(preference, budget) draws per step, each on batch_size / draws images (the paper: 1;
    more draws average the hypernet's gradient over more of the (r, b) it must serve)."""
    regularise: Literal["alpha", "samples"] = "alpha"
    """What Omega compares: the parent distributions alpha (no sampling noise) or the
    Gumbel samples v (METHOD.md 1.5 as written)."""
    temperature: float = 5.0
    temperature_decay: float = 0.97
    temperature_every: int = 30
    """Gumbel temperature x decay every this many steps (paper: 300 of 30k)."""
    hard: bool = False
    """Hard (straight-through) Gumbel samples instead of soft mixtures."""
    lambda_active: float = 1.0
    lambda_inactive: float = 0.1
    lambda_budget: float = 10.0
    """Weight of dymu's expected-FLOPs budget penalty."""
    self_bias: float = 2.0
    """Initial logit bonus of a node's own stream as parent (start near the anchor)."""
    trunk: Literal["edge", "preference"] = "edge"
    """Which stream runs each shared node of a derived tree: ``edge``, the one the edge
    hypernet's parents name (the paper); ``preference``, the stream of the task the
    preference weighs most among the tasks the node serves (METHOD.md 1.10, lever (a):
    the preferred task keeps its own features), for spaces whose joint stage trained every
    trunk (``joint.trunk: random``)."""

    def check(self, prefix: str) -> None:
        for key in ("steps", "batch_size", "lr_every", "temperature_every", "draws"):
            if getattr(self, key) < 1:
                raise UserError(f"config: {prefix}.{key} must be >= 1")
        if self.batch_size % self.draws:
            raise UserError(
                f"config: {prefix}.batch_size ({self.batch_size}) must be a multiple of "
                f"{prefix}.draws ({self.draws})"
            )
        if self.lr <= 0 or self.dirichlet <= 0 or self.temperature <= 0:
            raise UserError(f"config: {prefix}.lr, dirichlet and temperature must be > 0")
        for key in ("uniform_share", "full_budget_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"config: {prefix}.{key} must be in [0, 1]")
        if self.lambda_under < 0:
            raise UserError(f"config: {prefix}.lambda_under must be >= 0")


@dataclass
class Stage2Config:
    """Stage 2: the weight hypernet on hard derived trees, anchor and edge hypernet frozen."""

    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    lr_decay: float = 0.3
    lr_every: int = 700
    dirichlet: float = 0.2
    uniform_share: float = 0.3
    """The share of draws whose preference is uniform on the simplex (as stage 1's)."""
    full_budget_share: float = 0.2
    """The share of draws at budget 1 exactly (as stage 1's)."""
    task_floor: float = 0.2
    """Loss weights (1 - floor) * r + floor / N instead of r: every task keeps a gradient,
    so the trees serve tasks the preference weighs little (0 = the paper's r alone)."""
    hflip: bool = True
    """Random horizontal flips of the training batches (as stage 0 and the joint stage).
    Without them the preference-dependent offsets fit the training images: on the default
    config semseg then did worse on the test split the more weight it was given."""
    adapter_rank: int = 4
    """Rank of the per-edge low-rank adapter on the first convolution of every node fed by
    another stream (folded into that convolution at export; 0 = BatchNorm offsets only,
    the paper's weight hypernet)."""
    task_rank: int = 0
    """Rank of the per-task low-rank adapters mixed by the preference, ``sum_i r_i U_i
    V_i^T``, on the first convolution of every node but the private ones (folded at export
    like the edge adapters; 0 = none)."""

    def check(self, prefix: str) -> None:
        for key in ("steps", "batch_size", "lr_every"):
            if getattr(self, key) < 1:
                raise UserError(f"config: {prefix}.{key} must be >= 1")
        if self.lr <= 0 or self.dirichlet <= 0:
            raise UserError(f"config: {prefix}.lr and dirichlet must be > 0")
        for key in ("uniform_share", "full_budget_share", "task_floor"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise UserError(f"config: {prefix}.{key} must be in [0, 1]")
        for key in ("adapter_rank", "task_rank"):
            if getattr(self, key) < 0:
                raise UserError(f"config: {prefix}.{key} must be >= 0")


@dataclass
class EvaluateConfig:
    """The evaluation of a search (METHOD.md 1.7): a preference sweep at several budgets."""

    preferences: int = 20
    budgets: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    """FLOPs budgets (fractions of the anchor); those below the cheapest tree are skipped."""
    flops_samples: int = 1000
    """Preferences whose derived trees give the FLOPs and params statistics."""
    cheapest: bool = True
    """Also evaluate at the cheapest tree's budget (the paper's c = 1), beside ``budgets``."""
    batch_size: int = 64
    seed: int = 0

    def check(self, prefix: str) -> None:
        if self.preferences < 2 or self.flops_samples < 1 or self.batch_size < 1:
            raise UserError(f"config: {prefix}.preferences must be >= 2, the others >= 1")
        if not self.budgets or any(not 0 < b <= 1 for b in self.budgets):
            raise UserError(f"config: {prefix}.budgets must be fractions in (0, 1]")


BASELINE_METHODS = ("static", "transfer", "phn", "phn_bn", "weighting", "ecmt")
"""What ``dymu baselines`` can train, in report order (:mod:`dymu.baselines`)."""
OPT_IN_BASELINES = ("ecmt",)
"""Methods ``baselines.methods`` leaves out unless named."""


@dataclass
class BaselinesConfig:
    """``dymu baselines``: the methods DYMU is compared with, on the search's data and sweep.

    Every multi-task model here is the shared-backbone net (:mod:`dymu.models.shared`) on the
    anchor's backbone and heads; its task losses are scaled by ``w_i`` as in stage 1.
    """

    methods: list[str] = field(
        default_factory=lambda: [m for m in BASELINE_METHODS if m not in OPT_IN_BASELINES]
    )
    """Which to train: ``static`` (one shared model per sweep preference), ``phn`` and
    ``phn_bn`` (Pareto hypernetworks), ``transfer`` (Pareto set with parameter transfer),
    ``weighting`` (one shared model per strategy in ``weightings``), ``ecmt`` (a slimmable
    shared encoder with task decoders, ECMT's rule at each of ``ecmt_budgets``; not in the
    default list). Single-task is stage 0."""
    weightings: list[str] = field(
        default_factory=lambda: ["equal", "uncertainty", "dwa", "mgda_ub", "pcgrad", "tensioner"]
    )
    epochs: int = 12
    """Epochs of every model (the same as stage 0's default)."""
    batch_size: int = 32
    lr: float = 2e-3
    phn_solver: Literal["linear", "epo"] = "linear"
    phn_alpha: float = 0.2
    """Dirichlet concentration of the training rays of the Pareto hypernetworks."""
    transfer_neighbours: int = 2
    transfer_strength: float = 0.1
    """Weight moved to the neighbours per step at the base learning rate (METHOD.md 3)."""
    stacked_models: int = 0
    """How many of the sweep's preferences ``static`` and ``transfer`` train: the first K
    (0 = all). The sweep is a uniform random draw, so its first K are a uniform sample; the
    hypervolume of K models is a lower bound of all of them (a point added never lowers a
    hypervolume), and where the models run in turn (CPUs) training time grows with K."""
    towers: TowersConfig = field(default_factory=TowersConfig)
    """Auxiliary towers on the shared backbone of ``static`` and ``weighting`` models."""
    ecmt_widths: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    """The widths the ``ecmt`` network's encoder and decoders run at."""
    ecmt_budgets: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.75])
    """FLOPs fractions of the anchor at which ``ecmt`` is evaluated over the sweep."""

    def check(self, prefix: str) -> None:
        self.towers.check(f"{prefix}.towers")
        self.ecmt_widths = _widths(self.ecmt_widths, f"{prefix}.ecmt_widths")
        if not self.ecmt_budgets or not all(0 < x <= 1 for x in self.ecmt_budgets):
            raise UserError(f"config: {prefix}.ecmt_budgets must be fractions in (0, 1]")
        for m in self.methods:
            if m not in BASELINE_METHODS:
                raise UserError(
                    f"config: unknown {prefix}.methods entry {m!r}; choose from "
                    f"{', '.join(BASELINE_METHODS)}"
                )
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError(f"config: {prefix}.epochs, batch_size and lr must be > 0")
        if self.stacked_models < 0:
            raise UserError(f"config: {prefix}.stacked_models must be >= 0 (0 = the whole sweep)")
        if self.phn_alpha <= 0 or self.transfer_neighbours < 0:
            raise UserError(f"config: {prefix}.phn_alpha must be > 0, transfer_neighbours >= 0")
        if not 0 <= self.transfer_strength <= 1:
            raise UserError(f"config: {prefix}.transfer_strength must be in [0, 1]")


@dataclass
class Config:
    """The whole resolved configuration of a run."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    stage0: Stage0Config = field(default_factory=Stage0Config)
    affinity: AffinityConfig = field(default_factory=AffinityConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    slim: SlimConfig = field(default_factory=SlimConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)


def section_hash(cfg: Config, *sections: str) -> str:
    """A stable 12-hex hash of the named config sections: an artifact records it, so a
    later run can tell whether the artifact still matches its config."""
    import hashlib
    import json

    blob = {name: dataclasses.asdict(getattr(cfg, name)) for name in sections}
    for values in blob.values():
        # Towers that are off change nothing: artifacts made before towers existed stay valid.
        if values.get("towers", {}).get("gamma") == 0:
            del values["towers"]
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not get_args(tp):
        return tp.__name__
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    return str(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` or raise a one-line :class:`UserError`."""
    origin = get_origin(tp)
    bad = UserError(
        f"config: {key} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError:
                continue
        raise bad
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise bad
    if origin is list:
        if not isinstance(value, list | tuple):
            raise bad
        (elem,) = get_args(tp)
        return [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise UserError(f"config: {key} must be a mapping of keys, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    """Build dataclass ``cls`` from ``values`` over its defaults, strictly."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    obj = cls()
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            where = f"in {prefix}" if prefix else "at the top level"
            raise UserError(f"config: unknown key {full!r}; valid keys {where}: {', '.join(names)}")
        setattr(obj, key, _coerce(value, hints[key], full))
    check = getattr(obj, "check", None)
    if check is not None:
        check(prefix)
    return obj


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"config: {dotted!r} goes below {part!r}, which is not a section")
        node = child
    node[parts[-1]] = value


def _expected_type(dotted: str) -> Any:
    """The declared type at ``dotted`` (None when the path is unknown; _build reports it)."""
    cls: Any = Config
    tp: Any = None
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        tp = cls = hints[part]
    return tp


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value``; the value is read as YAML (``[32, 32]``, ``null``, ``0.5``).

    Where the key is declared as a string, the raw text is kept (so ``data.root=2024``
    stays the folder name ``"2024"``).
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise UserError(f"config: override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    expected = _expected_type(key)
    union = get_origin(expected) in (Union, types.UnionType)
    accepted = (expected, *get_args(expected)) if union else (expected,)
    if str in accepted and value is not None and not isinstance(value, str):
        value = raw
    elif float in accepted and isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads "1e-3" as a string
            value = float(value)
    return key, value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config YAML file as a mapping, with one-line errors."""
    p = Path(path)
    text = read_text(p, "config file", "give a YAML file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"config file {p}: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"config file {p} must hold a mapping of sections, got {type(data).__name__}"
        )
    return data


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Resolve defaults, an optional YAML file and ``key=value`` overrides into a Config."""
    tree: dict[str, Any] = load_yaml(path) if path is not None else {}
    extra: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_path(extra, key, value)
    return from_dict(_merge(tree, extra))


def from_dict(values: Mapping[str, Any]) -> Config:
    """Build a :class:`Config` from a nested mapping, strictly (unknown keys fail)."""
    return _build(Config, values, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain nested dicts and lists (YAML/JSON ready)."""
    return dataclasses.asdict(cfg)


def dotted_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys (``stage1.lr``) of a nested config mapping, in its order: sections
    are walked, values (lists included) are not."""
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out += dotted_keys(value, f"{name}.") if isinstance(value, Mapping) else [name]
    return out


def to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML text; loading it gives back an equal Config."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
