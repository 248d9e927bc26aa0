"""``dymu export``: the trees that serve one budget, as checked, self-contained ONNX files.

For each preference asked for (one, or a grid on the simplex) the edge hypernet derives the
tree for ``(r, b)``. Every preference gets its own model: its tree materialized with the
weight hypernet's adaptation for that very preference
(:func:`dymu.compile.materialize.materialize`), so the device runs what the search's report
evaluated for r (checked on the golden input; METHOD.md 1.10, "Shipping it"). Each model is
counted by fvcore, exported and checked (:func:`dymu.compile.onnx_export.export_onnx`,
:func:`~dymu.compile.onnx_export.ort_parity`), evaluated on the test split, and run on a
fixed golden input whose outputs a device can compare against. With ``--target aoti``
each model is also compiled with AOTInductor for this machine (its CUDA GPU, else its
CPU; :mod:`dymu.compile.aoti`) and checked against PyTorch the same way. Everything is
written into a temporary folder that becomes ``OUT`` only when every model has passed, so
a failure never leaves a partial bundle.

Layout of ``OUT``::

    manifest.json              # one entry per model, a (tree, preference) (see export_bundle)
    dymu_runtime.py, README.md # standalone device runtime and steps (dymu.compile.bundle)
    golden_input.npy           # [G, 3, H, W] float32 test images
    <hash>/model.onnx          # the model (<tree hash>-<index>), weights inline
    <hash>/golden_outputs.npz  # PyTorch outputs on golden_input.npy, keyed by task
    <hash>/model.engine(.json) # with --target trt only: TensorRT engine and its metadata
    <hash>/model.pt2           # with --target aoti only: AOTInductor package for this machine
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dymu import __version__
from dymu.compile import aoti
from dymu.compile.bundle import write_bundle_files
from dymu.compile.latency import LatencyBudget, load_budget, make_runner, measure
from dymu.compile.materialize import materialize
from dymu.compile.onnx_export import export_onnx, ort_parity
from dymu.compile.trt_support import opset_for
from dymu.data import get_builder, input_size
from dymu.data.base import cache_root
from dymu.data.batches import iterate
from dymu.errors import RuntimeFailure, UserError
from dymu.io import atomic_dir, clean_stale, ensure_dir, sha256_file, write_json
from dymu.models.flops import count_flops, count_params
from dymu.search import TrainedRun, load_run
from dymu.space.derive import check_budget, preferred_trunks
from dymu.space.graph import anchor_flops
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet
from dymu.train.calibrate import calibrated, calibration_images
from dymu.train.loop import evaluate

TARGETS = ("onnx", "trt", "aoti")
"""What ``--target`` builds: ONNX files only, or ONNX plus TensorRT engines for this GPU, or
ONNX plus AOTInductor packages for this machine's device (its CUDA GPU, else its CPU)."""

GOLDEN_IMAGES = 4
"""Test images in ``golden_input.npy``."""

PARITY_ATOL = 1e-4
"""Largest ONNX Runtime (or AOTInductor) - PyTorch difference a tree may show (fp32)."""


def simplex_grid(num_tasks: int, k: int) -> np.ndarray:
    """Every preference ``c / k`` with non-negative integers ``c`` summing to ``k``: [P, N].

    P = C(k + N - 1, N - 1); k = 1 gives the N one-hot preferences.
    """
    if k < 1:
        raise UserError(f"--grid must be >= 1, got {k}")
    points = [
        c for c in itertools.product(range(k + 1), repeat=num_tasks) if sum(c) == k
    ]  # [P][N] integer compositions of k
    return np.array(points[::-1], dtype=np.float64) / k


def check_target(target: str) -> None:
    """Refuse an unknown target, TensorRT where it cannot run, or AOTInductor without a C++
    compiler, before any work."""
    if target not in TARGETS:
        raise UserError(f"unknown --target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            raise UserError(
                "--target trt: TensorRT is not installed here; export ONNX (--target onnx) "
                "and build the engines on the device (see the bundle's README)"
            )
        if not torch.cuda.is_available():
            raise RuntimeFailure("--target trt: TensorRT needs a CUDA GPU; none found")
    if target == "aoti":
        try:
            aoti.check_compiler()
        except UserError as exc:
            raise UserError(f"--target aoti: {exc}") from None


def check_out(out: str | Path) -> Path:
    """``out`` must not exist (empty or not: a bundle is only ever a whole new folder), and
    its parent must take new files (:func:`~dymu.io.ensure_dir` tries for real). Removes
    staging folders that a killed export left for this name."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise UserError(f"{out} already exists; remove it or choose another --out")
    try:
        ensure_dir(out.parent)
    except UserError as exc:
        raise UserError(f"cannot write {out}: {exc}") from None
    clean_stale(out.parent, name=out.name)
    return out


def export_bundle(
    run_dir: str | Path,
    out: str | Path,
    *,
    budget: float | None,
    preferences: Sequence[Sequence[float]],
    target: str = "onnx",
    trt_version: str = "10.3",
    dynamic_batch: bool = True,
    latency_ms: float | None = None,
    latency_table: str | Path | None = None,
) -> dict[str, Any]:
    """Derive, materialize, export and check the trees serving ``budget``; write ``out``.

    Args:
        run_dir: a finished ``dymu search`` run.
        out: the bundle folder to create (must not exist, or be empty).
        budget: FLOPs fraction of the anchor in (0, 1], at least the cheapest tree's; None
            with ``latency_ms``.
        latency_ms, latency_table: a latency target instead of ``budget``, on the backend,
            device and batch of a ``dymu profile`` table measured on this machine. Trees are
            repaired by predicted latency, then each is measured on the table's backend
            and repaired further while its measured median exceeds the target
            (:func:`_settle_latency`).
        preferences: [P, N] preferences (rows on the simplex), e.g. :func:`simplex_grid`.
        target: ``onnx``; ``trt`` to also build TensorRT engines on this machine's GPU;
            ``aoti`` to also compile AOTInductor packages for this machine's device (CUDA
            when available, else CPU), each checked against PyTorch like the ONNX file.
        trt_version: the device's TensorRT version; picks the ONNX opset and exporter
            (:mod:`dymu.compile.trt_support`).
        dynamic_batch: export with a dynamic batch axis (else batch 1).

    Returns:
        The manifest (also written as ``out/manifest.json``): ``trees``, one entry per
        model (a tree with the adaptation for one preference) with ``hash`` (the model's
        folder), ``tree`` (the tree's hash), ``preferences`` (the one it serves) and
        ``budget``, ``flops`` (the space's count), ``flops_fraction``, ``flops_counted``
        (fvcore on the materialized module), ``params``, ``files`` (name -> sha256),
        ``parity`` (ONNX Runtime against PyTorch), ``parity_evaluated`` (the model against
        the search's evaluation of its preference) and ``metrics`` (test split), and for
        target ``aoti`` an ``aoti`` record (``file``, ``device``, ``torch_version``,
        ``parity``, ``compile_s`` and the rest of :class:`~dymu.compile.aoti.AotiResult`);
        plus the anchor's FLOPs, tasks and input size.

    Raises:
        UserError: bad budget or target, a run that is not finished, an existing or
            unwritable ``out``.
        RuntimeFailure: a tree fails a check (ONNX Runtime or AOTInductor parity above
            1e-4, FLOPs over the budget), or an AOTInductor compile fails.
    """
    check_target(target)
    opset_for(trt_version)  # an unknown TensorRT version fails before any work
    out = check_out(out)
    run = load_run(run_dir)
    space, anchor = run.derive.space, run.anchor  # with widths, the space that prices them
    full = anchor_flops(space)
    prefs = np.asarray(preferences, dtype=np.float64)
    if prefs.ndim != 2 or prefs.shape[1] != len(anchor.tasks):
        raise UserError(f"preferences must be [P, {len(anchor.tasks)}], got {list(prefs.shape)}")
    cfg = run.cfg
    size = input_size(cfg.data)
    lat = None
    if latency_ms is not None:
        lat = _latency_budget(run, latency_table, latency_ms, size)
        budget = lat.flops_budget
    budget = check_budget(budget, space)
    served, alphas = _derive_trees(run, prefs, budget, lat)
    timings = {}
    if lat is not None:
        settings = (size, trt_version, dynamic_batch)
        served, timings = _settle_latency(run, served, alphas, lat, *settings)

    builder = get_builder(cfg.data.name)
    test = builder.load(cfg.data, "test")
    golden = next(iterate(test, GOLDEN_IMAGES, shuffle=False))["image"].float()  # [G, 3, H, W]
    images = None  # the report's calibration images, for configurations with widths
    if any(tree.widths is not None for tree, _ in served.values()):
        images = run_calibration_images(run)
    entries = []
    with atomic_dir(out) as tmp:
        np.save(tmp / "golden_input.npy", golden.numpy())
        settings = (budget, size, trt_version, dynamic_batch, target)
        jobs = [
            _TreeJob(tree, r, f"{h}-{i}", *settings)
            for h, (tree, rs) in served.items()
            if tree.widths is None
            for i, r in enumerate(rs)
        ]  # one model per (tree, preference): the weights the report evaluates for r
        jobs += [  # no adaptation with widths: one model serves all of a configuration's
            _TreeJob(tree, rs[0], f"{h}-0", *settings, served=rs)
            for h, (tree, rs) in served.items()
            if tree.widths is not None
        ]
        for job in tqdm(jobs, desc="export", unit="model", leave=False):
            job.check_flops = lat is None  # a latency target may spend any FLOPs
            entries.append(_export_tree(job, run, tmp / job.name, golden, test, images))
            if lat is not None:
                entries[-1]["latency"] = timings[job.tree.hash()]
            if target == "trt":
                _build_engine(tmp / job.name, dynamic_batch, cache_root(cfg.data) / "trt")
                entries[-1]["files"] = _hashes(tmp / job.name, tmp)
        manifest = {
            "dymu_version": __version__,
            "tasks": anchor.task_names,
            "input": {"name": "image", "shape": [1, 3, *size], "dynamic_batch": dynamic_batch},
            "budget": budget,
            "anchor_flops": full,
            "flops_counting": "fvcore, one fused multiply-add = 1 FLOP, BatchNorm folded",
            "trt_version": trt_version,
            "target": target,
            "golden_input": {
                "file": "golden_input.npy",
                "sha256": sha256_file(tmp / "golden_input.npy"),
            },
            "trees": entries,
        }
        if lat is not None:
            manifest["latency"] = {**lat.describe(), "table_file": str(latency_table)}
            # A latency target may spend more FLOPs than the budget the hypernets were
            # asked at: the bundle's budget is what its trees cost, as the runtime expects.
            manifest["budget"] = max(e["flops_fraction"] for e in entries)
        manifest["runtime"] = write_bundle_files(tmp, manifest)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _derive_trees(run: TrainedRun, prefs: np.ndarray, budget: float, lat):
    """The tree of every preference at ``budget`` (repaired by predicted latency with
    ``lat``): ``{hash: (tree, its preferences)}`` and, with ``lat``, ``{hash: alpha of
    its first}`` (what the measure-and-repair loop ranks merges by)."""
    served: dict[str, tuple[Any, list[np.ndarray]]] = {}
    alphas: dict[str, Any] = {}
    with torch.no_grad():
        for r in prefs:
            rt = torch.tensor(r, dtype=torch.float32)
            if lat is None:
                tree = run.derive(rt, budget)
            else:
                alpha = run.edge.alpha(rt, budget)
                tree = lat.derive(alpha, run.edge.trunk_preference(rt))
                alphas.setdefault(tree.hash(), alpha)
            served.setdefault(tree.hash(), (tree, []))[1].append(r)
    return served, alphas


@dataclass
class _TreeJob:
    """One model to export: a tree with the weights adapted to one preference."""

    tree: TreeSpec
    preference: np.ndarray
    name: str  # the model's folder and manifest hash: ``<tree hash>-<index>``
    budget: float
    size: tuple[int, int]
    trt_version: str
    dynamic_batch: bool
    target: str = "onnx"
    check_flops: bool = True
    served: list[np.ndarray] | None = None
    """Every preference the model answers (None: ``preference`` alone)."""


def _hashes(folder: Path, root: Path) -> dict[str, str]:
    """``{path relative to root: sha256}`` of every file in ``folder``."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(folder.iterdir())}


def run_calibration_images(run: TrainedRun) -> list[torch.Tensor]:
    """The images the search calibrated its configurations with widths on (the training
    split's first, :func:`~dymu.train.calibrate.calibration_images`), on the CPU."""
    cfg = run.cfg
    train = get_builder(cfg.data.name).load(cfg.data, "train")
    return calibration_images(train, torch.device("cpu"))


def model_of(run: TrainedRun, tree: TreeSpec, r, budget: float, images=None):
    """``(materialized module, TreeNet, offsets)`` of what the report evaluates for ``tree``
    at preference ``r`` ([N]) and ``budget``: the weight hnet's offsets for a full-width tree;
    none, and statistics calibrated on ``images``, for a configuration with widths."""
    with torch.no_grad():
        if tree.widths is None:
            offsets = run.weights(torch.as_tensor(r, dtype=torch.float32), budget, tree)
            return (
                materialize(run.streams, tree, offsets),
                TreeNet(run.streams, tree).eval(),
                offsets,
            )
        if images is None:
            raise ValueError("a configuration with widths needs calibration images")
        tree_net = calibrated(run.streams, tree, images).eval()
        return materialize(run.streams, tree, None, tree_net.bn_stats), tree_net, None


def _export_tree(
    job: _TreeJob, run: TrainedRun, folder: Path, golden, test, images=None
) -> dict[str, Any]:
    """Materialize, count, export, check, run on the golden input and evaluate one model:
    ``job.tree`` with the weight hypernet's adaptation for ``job.preference`` at the
    budget, exactly what the search's report evaluates for that preference (checked on the
    golden input against :class:`~dymu.space.treenet.TreeNet`). A configuration with widths
    takes no adaptation and the statistics the report calibrated on ``images``."""
    space, anchor, h = run.derive.space, run.anchor, job.name
    full = anchor_flops(space)
    r = torch.tensor(job.preference, dtype=torch.float32)
    with torch.no_grad():
        net, tree_net, offsets = model_of(run, job.tree, r, job.budget, images)
        evaluated = tree_net(golden, offsets)
    counted = count_flops(net, torch.zeros(1, 3, *job.size))
    if job.check_flops and counted > job.budget * full:
        raise RuntimeFailure(
            f"tree {h}: fvcore counts {counted} FLOPs, over the budget's "
            f"{job.budget * full:.0f}; the space's table does not match the model"
        )
    folder.mkdir()
    result = export_onnx(
        net,
        folder / "model.onnx",
        input_shape=(1, 3, *job.size),
        target=job.trt_version,
        dynamic_batch=job.dynamic_batch,
    )
    batches = (1, 2, 3) if job.dynamic_batch else (1,)
    parity = ort_parity(net, folder / "model.onnx", batch_sizes=batches)
    if not parity["overall"] < PARITY_ATOL:
        raise RuntimeFailure(
            f"tree {h}: ONNX Runtime differs from PyTorch by {parity['overall']:.2e}"
        )
    with torch.no_grad():
        outputs = net(golden)
    as_evaluated = max(float((outputs[k] - v).abs().max()) for k, v in evaluated.items())
    if not as_evaluated < PARITY_ATOL:
        raise RuntimeFailure(
            f"model {h}: differs from the search's evaluation of its preference by "
            f"{as_evaluated:.2e}"
        )
    np.savez(folder / "golden_outputs.npz", **{k: v.numpy() for k, v in outputs.items()})
    compiled = _compile_aoti(net, folder, job) if job.target == "aoti" else None
    cfg = run.cfg
    metrics = evaluate(net, test, anchor.tasks, cfg.evaluate.batch_size, torch.device("cpu"))
    entry = {
        "hash": h,
        "tree": job.tree.hash(),
        "parents": [list(p) for p in job.tree.parents],
        **({} if job.tree.widths is None else {"widths": [list(w) for w in job.tree.widths]}),
        "budget": job.budget,
        "preferences": [
            [round(float(x), 6) for x in p]
            for p in ([job.preference] if job.served is None else job.served)
        ],
        "weights_at": [float(x) for x in r] if job.tree.widths is None else None,
        "flops": job.tree.flops(space),
        "flops_fraction": job.tree.flops(space) / full,
        "flops_counted": counted,
        "params": count_params(net),
        "files": _hashes(folder, folder.parent),
        # The file relative to the bundle: the absolute path is the temporary folder's.
        "onnx": {
            **{k: v for k, v in result.to_json().items() if k != "path"},
            "file": f"{h}/model.onnx",
        },
        "parity": parity,
        "parity_evaluated": as_evaluated,
        "metrics": metrics,
    }
    if compiled is not None:
        entry["aoti"] = compiled
    return entry


def _latency_budget(run: TrainedRun, path, target_ms: float, size) -> LatencyBudget:
    """The target on the table at ``path``, which must also have been measured on this
    machine: export measures each tree here."""
    if path is None:
        raise UserError("a latency target needs the latency table of dymu profile (--latency)")
    return load_budget(run.space, path, target_ms, list(size), here=True)


def _settle_latency(run, served, alphas, lat, size, trt_version, dynamic_batch):
    """Measure every tree on the table's backend, device and batch (for ONNX Runtime the
    very file the bundle gets) and repair it further, to the next tree below its predicted
    latency, while the measured median exceeds the target. Preferences whose trees meet
    share them again. Returns the settled trees and each one's latency record.

    Raises:
        UserError: the fastest tree itself measures above the target (names its latency).
    """
    import tempfile

    t = lat.table
    device = "cpu" if t.device.startswith("cpu") else "cuda"
    settled: dict[str, tuple[Any, list[np.ndarray]]] = {}
    records: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="dymu-latency-") as tmp:

        def timed(tree) -> dict[str, float]:
            work = Path(tmp) / f"{tree.hash()}-{len(list(Path(tmp).iterdir()))}"
            work.mkdir()
            with torch.no_grad():
                net = materialize(run.streams, tree)
            call = make_runner(
                t.backend, net, t.batch, size, device, work, trt_version, "auto", dynamic_batch
            )
            return measure({"tree": call}, t.protocol)["tree"]

        for h, (tree, rs) in tqdm(served.items(), desc="latency", unit="tree", leave=False):
            got, repairs = timed(tree), 0
            while got["ms"] > lat.target_ms:
                faster = lat.faster(tree, alphas[h])
                if faster is None:
                    raise UserError(
                        f"--latency-ms {lat.target_ms:g}: the fastest tree of this space "
                        f"measures {got['ms']:.3f} ms here ({t.backend}, batch {t.batch})"
                    )
                tree, repairs = faster, repairs + 1
                got = timed(tree)
            for r in rs:  # a merge changes which tasks a node serves: trunks again
                mine = _preferred(run, tree, r, lat) if repairs else tree
                settled.setdefault(mine.hash(), (mine, []))[1].append(r)
                records[mine.hash()] = {
                    "target_ms": lat.target_ms,
                    "predicted_ms": lat.predicted_ms(mine),
                    "measured_ms": got["ms"],
                    "spread": got["spread"],
                    "repairs_after_measuring": repairs,
                }
    return settled, records


def _preferred(run: TrainedRun, tree, r: np.ndarray, lat: LatencyBudget):
    """``tree`` with its shared nodes on the streams ``r`` prefers (``stage1.trunk:
    preference``), as the edge hypernet's own derivation places them; ``tree`` itself
    where the moved tree is predicted slower (streams of unequal cost), since its
    measured latency is what met the target. Moving trunks keeps the branching, so the
    measurement of ``tree`` stands for it."""
    pref = run.edge.trunk_preference(torch.tensor(r, dtype=torch.float32))
    if pref is None:
        return tree
    moved = preferred_trunks(tree, pref, lat.space)
    return moved if lat.predicted_ms(moved) <= lat.predicted_ms(tree) else tree


def _compile_aoti(net, folder: Path, job: _TreeJob) -> dict[str, Any]:
    """``folder/model.pt2`` for this machine's device, checked against PyTorch on the
    batch sizes the ONNX file was; its manifest record (file relative to the bundle)."""
    device = aoti.default_device()
    path = folder / aoti.PACKAGE_NAME
    result = aoti.compile_aoti(
        net,
        path,
        input_shape=(1, 3, *job.size),
        dynamic_batch=job.dynamic_batch,
        device=device,
    )
    batches = (1, 2, 3) if job.dynamic_batch else (1,)
    parity = aoti.aoti_parity(net, path, batch_sizes=batches, device=device)
    if not parity["overall"] < PARITY_ATOL:
        raise RuntimeFailure(
            f"tree {job.tree.hash()}: AOTInductor ({device}) differs from PyTorch by "
            f"{parity['overall']:.2e}"
        )
    record = result.to_json()
    del record["path"]  # a temporary folder's path; "file" is where it lives in the bundle
    return {"file": str(path.relative_to(folder.parent)), **record, "parity": parity}


def _build_engine(folder: Path, dynamic_batch: bool, cache_dir: Path) -> None:
    """TensorRT engine for this machine's GPU, with one timing cache per device in
    ``cache_dir`` shared by every tree (and every later export)."""
    from dymu.compile import trt_engine

    device = trt_engine.current_device()
    trt_engine.build_engine(
        folder / "model.onnx",
        folder / "model.engine",
        precision="fp32",
        min_batch=1,
        opt_batch=1,
        max_batch=32 if dynamic_batch else 1,
        timing_cache=trt_engine.timing_cache_path(cache_dir, device),
    )
