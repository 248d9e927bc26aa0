"""``dymu baselines``: train every comparison method on the search's data, backbone and sweep.

Reads a finished search run (its anchor, loss scales and ``report.json``) and trains, into
``RUN/baselines/``, each method named in ``baselines.methods``:

- ``static``: one shared-backbone model per preference of the evaluation sweep, trained on
  ``sum_i r_i w_i L_i`` (the K models stacked, :class:`dymu.pareto.stacked.ParetoSet`);
- ``transfer``: the same K models trained jointly with parameter transfer (METHOD.md 3);
- ``phn`` / ``phn_bn``: a Pareto hypernetwork generating all, or only the normalisation,
  parameters of the shared model from the preference (METHOD.md 2);
- ``weighting``: one shared model per strategy in ``baselines.weightings`` (not
  preference-controllable: one point each);
- ``ecmt``: a slimmable shared encoder with task decoders, evaluated with ECMT's rule at
  each of ``baselines.ecmt_budgets`` (:mod:`dymu.baselines.ecmt`; opt-in).

Each method is written to ``baselines/<method>.json`` when it finishes and skipped on a
later call when that file matches the config, so an interrupted call loses at most one
method; the stacked sets also keep their last finished epoch (``<method>.ckpt.pt``) and
go on from it. The comparison (:mod:`dymu.baselines.report`) is rebuilt from those files.

Under ``torchrun`` every method trains data-parallel: each rank holds its part of every
global batch, batch norms use the global batch, and gradients are averaged over the ranks
before each step (the gradient-combining weightings combine the global batch's task
gradients), so the result is the single-process one. The stacked sets then run their models
in turn (``loop``), PHN's EPO solver is refused, every rank evaluates (the same numbers)
and rank 0 alone writes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from dymu import dist
from dymu.artifacts import read_json, rerun_fix
from dymu.baselines.shared import epoch_bar, train_shared
from dymu.config import Config, section_hash
from dymu.data.batches import endless, iterate, num_batches, to_device
from dymu.errors import UserError
from dymu.evaluate.metrics import preference_sweep
from dymu.io import clean_stale, ensure_dir, write_json
from dymu.lock import lock_run, unlock_run
from dymu.models.flops import count_flops, count_params
from dymu.models.shared import SharedNet, build_shared_net
from dymu.models.towers import build_towers
from dymu.run import resolve_device
from dymu.search import load_run
from dymu.space.graph import anchor_flops
from dymu.train import parallel
from dymu.train.checkpoint import record_matches
from dymu.train.loop import evaluate_model
from dymu.train.stage0 import load_splits, stage0_hash
from dymu.train.stage1 import EDGE_JSON

FOLDER = "baselines"
CHECKPOINT_SUFFIX = ".ckpt.pt"
"""``baselines/<method>.ckpt.pt``: the last finished epoch of a stacked set still training."""

CURVE_REFERENCE = 4.0
"""Per-task reference of the per-epoch validation hypervolume of the stacked sets, in scaled
losses (1 = the single-task loss on the training split); generous so early epochs count."""


SETTINGS = {
    "static": ("stacked_models",),
    "transfer": ("transfer_neighbours", "transfer_strength", "stacked_models"),
    "phn": ("phn_solver", "phn_alpha"),
    "phn_bn": ("phn_solver", "phn_alpha"),
    "weighting": ("weightings", "towers"),
    "ecmt": ("ecmt_widths", "ecmt_budgets"),
}
"""The ``baselines.*`` settings each method depends on, besides epochs, batch size and lr."""


def method_hash(cfg: Config, method: str) -> str:
    """What one method's results depend on: its own settings, the sweep and the stage-0
    anchor (which also fixes the loss scales every method uses, :mod:`dymu.train.scales`);
    not the other methods' settings, nor the joint stage's or the hypernetworks'."""
    import hashlib

    b = cfg.baselines
    own = {k: getattr(b, k) for k in ("epochs", "batch_size", "lr", *SETTINGS[method])}
    # Nested settings (towers) are dataclasses: written as their fields.
    blob = json.dumps({"method": method, **own}, sort_keys=True, default=dataclasses.asdict)
    mine = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return mine + "-" + section_hash(cfg, "evaluate") + "-" + stage0_hash(cfg)


class _Context:
    """What every method needs: data, tasks, loss scales, the sweep, sizes, the device."""

    def __init__(self, cfg: Config, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = resolve_device(cfg.run.device)
        self.part = dist.shard()
        trained = load_run(run_dir)
        self.anchor = trained.anchor
        self.tasks = self.anchor.tasks
        self.anchor_flops = anchor_flops(trained.space)
        with dist.main_first():  # rank 0 makes a dataset cache, the others then read it
            self.specs, self.splits = load_splits(cfg)
        # [T] w_i as every stage of the search used them (recorded by stage 1), so the
        # objectives match DYMU's.
        edge = json.loads((run_dir / EDGE_JSON).read_text())
        self.scales = torch.tensor(edge["loss_scales"], dtype=torch.float32)
        self.preferences = preference_sweep(
            len(self.tasks), cfg.evaluate.preferences, cfg.evaluate.seed
        )
        self.image = next(iterate(self.splits.test, 1, shuffle=False))["image"].float()  # [1,3,H,W]

    def steps(self) -> int:
        b = self.cfg.baselines
        return b.epochs * num_batches(self.splits.train, b.batch_size, drop_last=True)

    def batches(self, seed: int) -> Iterator[dict[str, Tensor]]:
        return (
            to_device(batch, self.device)
            for batch in endless(
                self.splits.train, self.cfg.baselines.batch_size, seed, shard=self.part
            )
        )

    def val_batches(self) -> Iterator[dict[str, Tensor]]:
        return iterate(self.splits.val, self.cfg.evaluate.batch_size, shuffle=False)

    def to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return to_device(batch, self.device)

    def scaled_losses(self, out: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """``[T]`` task losses times their scales ``w_i``."""
        losses = torch.stack([t.loss(out[t.name], batch[t.name]) for t in self.tasks])
        return losses * self.scales.to(losses.device)

    def shared_net(self) -> SharedNet:
        """A fresh shared model; every method starts from the same weights."""
        return build_shared_net(self.cfg.model, self.specs, seed=self.cfg.run.seed)

    def point(self, model: Callable[[Tensor], dict[str, Tensor]], label: str, pref=None) -> dict:
        """One evaluated point: test metrics and mean (unscaled) test losses."""
        metrics, losses = evaluate_model(
            model, self.splits.test, self.tasks, self.cfg.evaluate.batch_size, self.device
        )
        return {
            "label": label,
            "preference": None if pref is None else [round(float(x), 6) for x in pref],
            "losses": losses,
            "metrics": metrics,
        }

    def cost(self, net: torch.nn.Module) -> dict[str, float]:
        flops = count_flops(net.cpu(), self.image)
        net.to(self.device)
        return {
            "flops": flops,
            "flops_fraction": flops / self.anchor_flops,
            "params": count_params(net),
        }


# ----------------------------------------------------------------------------- methods


def _static_or_transfer(ctx: _Context, transfer: bool) -> dict[str, Any]:
    """K shared models on the sweep's preferences, stacked; with or without transfer.

    Both modes see the same batches and steps, so their per-epoch validation hypervolumes
    (kept in ``log``) compare transfer against independent training.
    """
    from dymu.pareto.stacked import ParetoSet
    from dymu.pareto.transfer import evaluate_losses, train_pareto_set

    b = ctx.cfg.baselines
    sweep = len(ctx.preferences)
    chosen = ctx.preferences[: b.stacked_models or sweep]  # the first K of the sweep
    prefs = torch.tensor(chosen, dtype=torch.float32)  # [K, T]
    # One batched computation on a GPU; on a CPU the stacked set runs its models in turn,
    # which measured faster there (benchmarks/results/transfer_pareto.json). Global batch
    # norms communicate, which vmap cannot batch: data-parallel sets run in turn too.
    vmap = ctx.device.type == "cuda" and not dist.is_distributed()
    execution = "vmap" if vmap else "loop"
    pset = ParetoSet(ctx.shared_net(), len(prefs), init="same", execution=execution)
    pset.to(ctx.device)

    per_epoch = num_batches(ctx.splits.train, b.batch_size, drop_last=True)
    name = "transfer" if transfer else "static"
    # Hours on a CPU: every finished epoch is kept, and a later call goes on from there.
    checkpoint, h = ctx.run_dir / FOLDER / f"{name}{CHECKPOINT_SUFFIX}", method_hash(ctx.cfg, name)
    _keep_if_matching(checkpoint, h, name)
    batches = _epoch_batches(ctx, name, per_epoch)

    def show(epoch: dict[str, Any]) -> None:
        if dist.is_main():
            tqdm.write(f"{name} epoch {epoch['epoch']}: validation HV {epoch['hv']:.4f}")

    def val_losses(model_set) -> np.ndarray:
        val = ((x["image"], x) for x in map(ctx.to_device, ctx.val_batches()))
        return evaluate_losses(model_set, val, ctx.scaled_losses)  # [K, T] ~1 = single-task

    dist.barrier()  # rank 0 has decided whether the checkpoint stays
    with parallel.global_batch(pset.stacked, ctx.device):
        log = train_pareto_set(
            pset,
            prefs.to(ctx.device),
            batches,
            ctx.scaled_losses,
            epochs=b.epochs,
            lr=b.lr,
            optimizer="adam",
            weight_decay=1e-4,
            schedule="cosine",
            steps_per_epoch=per_epoch,
            transfer=transfer,
            neighbours=b.transfer_neighbours,
            strength=b.transfer_strength,
            eval_fn=val_losses,
            reference=[CURVE_REFERENCE] * len(ctx.tasks),
            log=show,
            checkpoint=checkpoint,
            checkpoint_hash=h,
        )
    if dist.is_main():
        checkpoint.unlink(missing_ok=True)  # the method's json, written next, now holds the result
    seconds = log["history"][-1]["elapsed_s"]
    points = [ctx.point(pset.model(k).eval(), f"r{k}", r) for k, r in enumerate(chosen)]
    cost = ctx.cost(pset.model(0))
    return {
        "points": points,
        "train_seconds": seconds,
        **cost,
        "params_stored": cost["params"] * len(prefs),
        "models": len(prefs),
        "sweep": sweep,
        # Models that ran in turn cost the same time each: the whole sweep's time follows.
        "train_seconds_sweep": seconds * sweep / len(prefs) if execution == "loop" else None,
        "log": {"history": log["history"], "execution": execution},
    }


def _keep_if_matching(checkpoint: Path, config_hash: str, name: str) -> None:
    """Keep a Pareto set's checkpoint of the same settings (its training loop says that it
    goes on from there); remove a damaged one or one that other ``baselines.*`` settings
    left."""
    if not (checkpoint.is_file() and dist.is_main()):
        return
    try:
        kept = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file: train from the start
        kept = {}
    if not (isinstance(kept, dict) and kept.get("config_hash") == config_hash):
        print(
            f"baselines: {name}'s checkpoint {checkpoint} was made with other settings or "
            "is damaged; training from the start"
        )
        checkpoint.unlink()


def _epoch_batches(ctx: _Context, name: str, per_epoch: int):
    """``epoch -> (image, batch) pairs`` of that epoch's shuffle of this rank's part of the
    training split, on the device, with a progress bar."""
    b = ctx.cfg.baselines

    def batches(epoch: int):
        desc = f"{name} epoch {epoch + 1}/{b.epochs}"
        bar = epoch_bar(ctx.splits.train, b.batch_size, ctx.cfg.run.seed, epoch, desc, per_epoch)
        for batch in bar:
            batch = to_device(batch, ctx.device)
            yield batch["image"], batch

    return batches


def _phn(ctx: _Context, bn_only: bool) -> dict[str, Any]:
    """A Pareto hypernetwork over the shared model (all parameters, or BN only)."""
    from dymu.pareto.phn import ParetoHypernet, phn_bn, train_phn

    b = ctx.cfg.baselines
    target = ctx.shared_net()
    n = len(ctx.tasks)
    torch.manual_seed(ctx.cfg.run.seed)
    model = phn_bn(target, num_tasks=n) if bn_only else ParetoHypernet(target, num_tasks=n)
    model.to(ctx.device)
    tick = time.perf_counter()
    with parallel.global_batch(target, ctx.device):
        log = train_phn(
            model,
            ctx.batches(ctx.cfg.run.seed),
            ctx.scaled_losses,
            steps=ctx.steps(),
            lr=b.lr,
            solver=b.phn_solver,
            alpha=b.phn_alpha,
            seed=ctx.cfg.run.seed,
            desc="phn_bn" if bn_only else "phn",
            run_dir=ctx.run_dir / FOLDER,
        )
    seconds = time.perf_counter() - tick
    model.eval()
    points = []
    for k, r in enumerate(ctx.preferences):
        ray = torch.tensor(r, dtype=torch.float32, device=ctx.device)
        points.append(ctx.point(lambda x, ray=ray: model(x, ray), f"r{k}", r))
    cost = ctx.cost(target)
    return {
        "points": points,
        "train_seconds": seconds,
        **cost,
        "params_stored": count_params(model),
        "log": {k: v for k, v in log.items() if k not in ("rays", "losses", "weights", "step_s")},
    }


def _weighting(ctx: _Context) -> dict[str, Any]:
    """One shared model per weighting strategy; each gives one (uncontrollable) point."""
    from dymu.weighting import build_weighting

    b = ctx.cfg.baselines
    points, logs, seconds = [], {}, 0.0
    cost: dict[str, float] = {}
    for name in b.weightings:
        net = ctx.shared_net()
        weighting = build_weighting(name, num_tasks=len(ctx.tasks))
        towers = build_towers(net.tasks, net.backbone, net.heads, b.towers)
        log = train_shared(
            net,
            weighting,
            ctx.splits.train,
            scales=ctx.scales,
            epochs=b.epochs,
            batch_size=b.batch_size,
            lr=b.lr,
            seed=ctx.cfg.run.seed,
            device=ctx.device,
            towers=towers,
            desc=name,
            run_dir=ctx.run_dir / FOLDER,
        )
        seconds += log["seconds"]
        logs[name] = log
        points.append(ctx.point(net, name))
        cost = ctx.cost(net)
    return {
        "points": points,
        "train_seconds": seconds,
        **cost,
        "params_stored": cost["params"],
        "log": logs,
    }


def _ecmt(ctx: _Context) -> dict[str, Any]:
    """The ECMT-style slimmable network, one entry per budget (:mod:`dymu.baselines.ecmt`)."""
    from dymu.baselines.ecmt import train_ecmt

    if dist.world_size() > 1:
        raise UserError("baselines: ecmt trains in one process (no torchrun) so far")
    b = ctx.cfg.baselines
    return train_ecmt(ctx, b.ecmt_widths, b.ecmt_budgets)


METHODS: dict[str, Callable[[_Context], dict[str, Any]]] = {
    "static": lambda ctx: _static_or_transfer(ctx, transfer=False),
    "transfer": lambda ctx: _static_or_transfer(ctx, transfer=True),
    "phn": lambda ctx: _phn(ctx, bn_only=False),
    "phn_bn": lambda ctx: _phn(ctx, bn_only=True),
    "weighting": _weighting,
    "ecmt": _ecmt,
}


def run_baselines(cfg: Config, run_dir: str | Path) -> dict[str, Any]:
    """Train the configured methods (skipping finished ones); write and return the report."""
    run = Path(run_dir)
    if not (run / "report.json").is_file():
        raise UserError(f"{run} is not a finished search run: report.json is missing")
    if dist.is_main():
        lock_run(run, write=True)  # baselines/ is written into the run directory
        clean_stale(run / FOLDER, recursive=True)
    try:
        return _run_baselines(cfg, run)
    finally:
        unlock_run(run)


def _run_baselines(cfg: Config, run: Path) -> dict[str, Any]:
    from dymu.baselines.report import build_report

    fix = rerun_fix(run)
    anchor_json = read_json(run / "anchor.json", "stage-0 record", fix)
    if anchor_json.get("config_hash") != stage0_hash(cfg):
        raise UserError(
            f"{run} was searched with other data, model or stage-0 settings than this config; "
            "pass the config of the search (-c) and change only baselines.* keys"
        )
    if "weighting" in cfg.baselines.methods:
        from dymu.weighting import WEIGHTINGS

        for name in cfg.baselines.weightings:
            WEIGHTINGS.get(name)  # an unknown strategy fails before anything trains
    stacked = {"static", "transfer"} & set(cfg.baselines.methods)
    if stacked and cfg.baselines.stacked_models > cfg.evaluate.preferences:
        raise UserError(
            f"baselines.stacked_models={cfg.baselines.stacked_models} is more than the sweep's "
            f"{cfg.evaluate.preferences} preferences (evaluate.preferences)"
        )
    dist.per_rank_batch(cfg.baselines.batch_size, "baselines.batch_size")
    dist.setup(resolve_device(cfg.run.device))
    main = dist.is_main()
    folder = ensure_dir(run / FOLDER)
    hashes = {method: method_hash(cfg, method) for method in METHODS}
    todo = []  # decided before anything is written, so that every rank decides alike
    for method in cfg.baselines.methods:
        path = folder / f"{method}.json"
        if record_matches(path, hashes[method]):
            if main:
                print(f"baselines: {method} already trained with this config ({path})")
        else:
            todo.append(method)
    dist.barrier()
    ctx: _Context | None = None
    for method in todo:
        ctx = ctx or _Context(cfg, run)
        if main:
            print(f"baselines: training {method}")
        result = METHODS[method](ctx)
        if main:
            write_json(
                folder / f"{method}.json",
                {"method": method, "config_hash": hashes[method], **result},
            )
    report = build_report(run, hashes) if main else None
    dist.barrier()  # every rank returns the report rank 0 wrote
    return report if main else json.loads((folder / "report.json").read_text())
