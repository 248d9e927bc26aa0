"""``dymu search``: stage 0, affinity, space, stage 1, stage 2 and evaluation in one run dir.

Each stage is skipped when its artifact already matches the config (a hash stored with
it), so a re-run only redoes what changed; ``--resume`` continues an interrupted stage 0, 1 or 2
from its last checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import torch

from dymu import dist
from dymu.affinity.estimate import estimate_affinity
from dymu.affinity.plot import affinity_png
from dymu.affinity.result import AffinityResult
from dymu.artifacts import load_into, read_json, rerun_fix
from dymu.config import Config
from dymu.data import get_builder, input_size
from dymu.data.batches import check_flips
from dymu.errors import UserError
from dymu.evaluate.report import write_report
from dymu.evaluate.search import evaluate_search
from dymu.hypernet.derivation import Derivation
from dymu.hypernet.edge import EdgeHypernet
from dymu.hypernet.weight import WeightHypernet, build_weight_hypernet
from dymu.lock import run_lock, unlock_run
from dymu.models.anchor import Anchor
from dymu.models.streams import TreeStreams
from dymu.run import read_run_config, resolve_device, start_run
from dymu.space.anchor_space import anchor_space
from dymu.space.graph import load_space, save_space
from dymu.train.calibrate import calibration_images
from dymu.train.checkpoint import record_matches
from dymu.train.joint import JOINT_JSON, JOINT_WEIGHTS, ensure_joint, load_joint
from dymu.train.scales import loss_scales
from dymu.train.slim_stage import SLIM_JSON, SLIM_WEIGHTS, ensure_slim, load_slim
from dymu.train.spec import resolve_specs
from dymu.train.stage0 import ANCHOR_JSON, ANCHOR_WEIGHTS, ensure_anchor, load_trained_anchor
from dymu.train.stage1 import EDGE_JSON, EDGE_WEIGHTS, stage1_hash, train_stage1
from dymu.train.stage2 import WEIGHT_JSON, WEIGHT_WEIGHTS, stage2_hash, train_stage2


def load_edge(run: Path, num_tasks: int, num_layers: int, cfg: Config) -> EdgeHypernet:
    edge = EdgeHypernet(
        num_tasks, num_layers, self_bias=cfg.stage1.self_bias, trunk=cfg.stage1.trunk
    )
    # min_budget is a saved buffer
    load_into(edge, run / EDGE_WEIGHTS, "edge hypernet", rerun_fix(run))
    return edge


def load_weights(run: Path, anchor: Anchor, cfg: Config) -> WeightHypernet:
    weights = build_weight_hypernet(
        len(anchor.tasks), anchor.streams, cfg.stage2.adapter_rank, cfg.stage2.task_rank
    )
    load_into(weights, run / WEIGHT_WEIGHTS, "weight hypernet", rerun_fix(run))
    return weights


@dataclass
class TrainedRun:
    """Everything a finished search leaves that later stages (sample, export) need."""

    cfg: Config
    streams: TreeStreams
    """The weights every tree runs, with the private-node rule (:class:`TreeStreams`)."""
    space: nx.DiGraph
    edge: EdgeHypernet
    weights: WeightHypernet
    baseline: Anchor
    """The stage-0 streams: the single-task yardstick of delta_m and of the loss scales."""
    slim: nx.DiGraph | None = None
    """The space priced at ``model.widths`` (None for trees alone)."""

    @property
    def derive(self) -> Derivation:
        """The configuration for each (preference, budget), as the report evaluated it."""
        return Derivation.of(self.edge, self.space, self.slim, self.cfg.slim)

    @property
    def anchor(self) -> Anchor:
        """The tuned streams (the joint stage's, else stage 0's): tasks, layers, heads."""
        return self.streams.tuned


SLIM_SPACE = "space_widths.json"
"""The run's space priced at ``model.widths`` (beside ``space.json``, its full widths)."""

ARTIFACTS = {  # stage -> (weights, record) in the run directory
    "stage0": (ANCHOR_WEIGHTS, ANCHOR_JSON),
    "joint": (JOINT_WEIGHTS, JOINT_JSON),
    "slim": (SLIM_WEIGHTS, SLIM_JSON),
    "stage1": (EDGE_WEIGHTS, EDGE_JSON),
    "stage2": (WEIGHT_WEIGHTS, WEIGHT_JSON),
}


def load_run(run_dir: str | Path) -> TrainedRun:
    """Load a finished ``dymu search`` run; one clear line when an artifact is missing,
    damaged, or was made from other inputs than the run's ``config.yaml`` resolves to (two
    runs written into one folder, a file copied in from another run, a run made by an
    earlier dymu)."""
    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise UserError(f"{run} is not a finished search run: config.yaml is missing")
    with run_lock(run, write=False):  # no search may write into it while it is read
        return _load_run(run)


def check_artifacts(run: Path, cfg: Config, stages: tuple[str, ...] = tuple(ARTIFACTS)) -> None:
    """Every training stage of ``stages`` has its files, and its record carries the hash of
    the spec ``cfg`` resolves to; else one line that says what to rerun. (A stage's spec
    names the hashes of those it builds on, so one record vouches for its whole chain.)"""
    rerun = f"rerun dymu search --run {run}"
    for stage, spec in resolve_specs(cfg).items():
        if stage not in ARTIFACTS or stage not in stages:
            continue
        weights, name = ARTIFACTS[stage]
        for f in (weights, name):
            if not (run / f).is_file():
                raise UserError(f"{run} is not a finished search run: {f} is missing; {rerun}")
        record = read_json(run / name, "record", rerun_fix(run))
        if "spec" not in record:
            raise UserError(
                f"{run / name} was written by an earlier dymu (it records no stage spec); "
                f"{rerun} (it retrains from {stage} on)"
            )
        if record.get("config_hash") != spec.hash:
            raise UserError(
                f"{run / weights} was made from other inputs than {run / 'config.yaml'} "
                f"resolves to (its record {name} says so); {rerun}"
            )


def _load_run(run: Path) -> TrainedRun:
    cfg = read_run_config(run)
    check_artifacts(run, cfg)
    if not (run / "space.json").is_file():
        raise UserError(f"{run} is not a finished search run: space.json is missing")
    anchor, _ = load_trained_anchor(cfg, run)
    joint = load_joint(anchor, run / JOINT_WEIGHTS) if cfg.joint.steps > 0 else None
    streams = tree_streams(cfg, anchor.eval(), joint)
    space, slim = load_space(run / "space.json"), load_slim_space(run, cfg)
    if slim is not None:
        narrow = load_slim(streams.tuned, run / SLIM_WEIGHTS)
        streams = TreeStreams(streams.tuned, streams.stage0, narrow)
    edge = load_edge(run, len(anchor.tasks), anchor.num_layers, cfg).eval()
    weights = load_weights(run, streams.tuned, cfg).eval()
    return TrainedRun(cfg, streams.eval(), space, edge, weights, anchor.eval(), slim)


def tree_streams(cfg: Config, stage0: Anchor, joint: Anchor | None) -> TreeStreams:
    """The weights trees run (the one place that decides): the joint stage's where it ran,
    with stage 0's for private nodes under ``joint.private_nodes``; else stage 0's alone."""
    if cfg.joint.steps == 0:
        return TreeStreams(stage0)
    return TreeStreams(joint, stage0 if cfg.joint.private_nodes else None)


def slim_space(cfg: Config, anchor: Anchor) -> nx.DiGraph | None:
    """The space priced at ``model.widths`` (None for trees alone); its full-width costs
    are those of the plain space stages 1 and 2 train on."""
    if cfg.model.widths == [1.0]:
        return None
    return anchor_space(anchor, input_size(cfg.data), cfg.model.widths)


def load_slim_space(run: Path, cfg: Config) -> nx.DiGraph | None:
    """The run's space priced at ``model.widths`` (None for trees alone); one line when a
    run with widths lacks it."""
    if cfg.model.widths == [1.0]:
        return None
    if not (run / SLIM_SPACE).is_file():
        raise UserError(f"{run} is not a finished search run: {SLIM_SPACE} is missing")
    return load_space(run / SLIM_SPACE)


def affinity_hash(cfg: Config) -> str:
    """What affinity.json depends on: the hash of its spec (:mod:`dymu.train.spec`)."""
    return resolve_specs(cfg)["affinity"].hash


def run_search(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """Run (or finish) the whole search in ``run_dir``; return the report.

    Under ``torchrun`` the three training stages are data-parallel over the ranks; the
    affinity estimate and the evaluation, short and written once, run on rank 0 while the
    others wait, then read its files, so every rank returns the same report.
    """
    run = start_run(cfg, run_dir)  # takes the run directory's lock
    try:
        return _search(cfg, run, resume)
    finally:
        unlock_run(run)


def _search(cfg: Config, run: Path, resume: bool) -> dict[str, Any]:
    device = resolve_device(cfg.run.device)
    dist.setup(device)
    main = dist.is_main()
    builder = get_builder(cfg.data.name)
    flips = {f"{k}.hflip": getattr(cfg, k).hflip for k in ("stage0", "joint", "stage2")}
    check_flips(builder.info_for(cfg.data), flips)  # before hours of stage 0
    anchor, _ = ensure_anchor(cfg, run, resume=resume)
    train, val, test = (builder.load(cfg.data, s) for s in ("train", "val", "test"))

    h = affinity_hash(cfg)
    path = run / "affinity.json"
    result = AffinityResult.load(path) if path.is_file() else None
    # Rank 0 writes the file alone: a rank that read it afterwards would skip the barrier.
    if dist.main_decides(result is None or result.meta.get("config_hash") != h):
        if main:
            result = estimate_affinity(anchor.to(device), train, cfg.affinity, device, cfg.run.seed)
            result.meta["config_hash"] = h
            result.save(path)
            affinity_png(result, run / "affinity.png")
        dist.barrier()
        result = result if main else AffinityResult.load(path)
    affinity = torch.tensor(result.mean, dtype=torch.float32)

    # The weights the trees run; `anchor` stays the single-task baseline of delta_m.
    scales = loss_scales(anchor, val, device)  # [N] w_i, once, for every later stage
    joint = ensure_joint(cfg, run, anchor, train, val, resume=resume, scales=scales)
    streams = tree_streams(cfg, anchor, joint)
    # The width stage's copy, for the configurations below the cheapest tree only.
    streams = ensure_slim(cfg, run, streams, train, val, resume=resume, scales=scales)

    space = anchor_space(anchor.cpu(), input_size(cfg.data))
    slim = slim_space(cfg, anchor.cpu())
    if main:
        save_space(space, run / "space.json")
        if slim is not None:
            save_space(slim, run / SLIM_SPACE)
    n, num_layers = len(anchor.tasks), anchor.num_layers

    if dist.main_decides(record_matches(run / EDGE_JSON, stage1_hash(cfg))):
        print(f"stage 1: using {run / EDGE_WEIGHTS} (config unchanged)")
        edge = load_edge(run, n, num_layers, cfg)
    else:
        edge, _ = train_stage1(cfg, run, streams, space, affinity, train, scales, resume=resume)
    if dist.main_decides(record_matches(run / WEIGHT_JSON, stage2_hash(cfg))):
        print(f"stage 2: using {run / WEIGHT_WEIGHTS} (config unchanged)")
        weights = load_weights(run, streams.tuned, cfg)
    else:
        weights, _ = train_stage2(cfg, run, streams, space, edge, train, scales, resume=resume)
    if main:
        derive = Derivation.of(edge, space, slim, cfg.slim)
        images = calibration_images(train, device) if slim is not None else None
        report = evaluate_search(
            cfg.evaluate, streams, derive, weights, test, device, anchor, val, images
        )
        write_report(run, report, derive.space)
    dist.barrier()
    return report if main else json.loads((run / "report.json").read_text())
