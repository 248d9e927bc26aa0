"""Latency tables: what each node of the space costs in milliseconds on one backend, device,
batch and input size, fitted from measured trees and checked on trees it has not seen.

FLOPs do not predict latency at small batches: launches, memory traffic and the fusions a
backend makes decide it. ``dymu profile`` (:func:`profile_run`) therefore measures trees of
the space as they ship, materialized with BatchNorm folded
(:func:`~dymu.compile.materialize.materialize`) and run on the backend, and fits

    latency(tree) = c + sum over the tree's used nodes below the last layer of t(node)

with every ``t >= 0`` (least squares, scikit-learn's ``LinearRegression(positive=True)``).
Every tree runs all nodes of the last layer and all heads, so their cost is part of ``c``
with the call's own overhead. Per-operator profilers (ONNX Runtime's, ``torch.profiler``)
attribute time to fused kernels, not to dymu's nodes, and a node timed alone misses what its
neighbours share (caches, launch queues); the fit prices each node as it runs inside trees.

The model is only additive to a point, so where it is fitted decides where it holds. Trees
are drawn in two kinds (:data:`KINDS`): uniform random parents, and trunk-branching trees
(every task leaves one trunk at some layer), which is what latency targets derive. A table
is fitted on both kinds plus the anchor tree and every stream's cheapest tree, and checked
on other trees of each kind separately: a fit checked on uniform trees alone once claimed
1.2% and missed a branching tree by 6.6%.

Measurement protocol (:func:`measure`): every tree gets ``warmup`` untimed calls; then
``rounds`` rounds visit all trees in a new random order (interleaved, so a slow spell of
the machine spreads over all trees instead of biasing a few) and time ``reps`` calls of
each; a tree's latency is the median over rounds of its per-round median. Its noise is the
spread of the round medians, (max - min) / median, stored next to every figure.

A run with widths (``model.widths``) gets a table that prices configurations as well
(:class:`WidthModel`): each node and head adds a term that scales with its FLOPs fraction
at its widths, and the random trees run every node at a random width.

The table then serves latency budgets (:func:`latency_space`): a copy of the space whose
node costs are the table's, in integer nanoseconds, so the FLOPs repair of
:func:`dymu.space.derive.repair` fits a tree to a latency target unchanged.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from dymu.errors import UserError
from dymu.space.graph import build_space, costs, space_shape, width_costs
from dymu.space.tree import TreeSpec

SCHEMA_VERSION = 2
"""2: fitted and checked on both :data:`KINDS` of random trees (1: uniform trees only)."""
BACKENDS = ("onnxruntime", "eager", "compiled", "aoti", "tensorrt")
"""What ``dymu profile --backend`` measures on: ONNX Runtime's CPU provider on the exported
ONNX file; the materialized tree in PyTorch, eager or through ``torch.compile``; its
AOTInductor package; its TensorRT engine (where TensorRT and a GPU are present)."""


KINDS = ("uniform", "branching")
"""How a table's random trees are drawn (:func:`draw_tree`)."""
KIND_TEXT = {
    "reference": "the anchor tree and every stream's cheapest tree",
    "uniform": "every parent drawn uniformly from the N streams",
    "branching": "every task leaves one random trunk at a uniformly random layer",
}
"""What each kind of tree in a table is (``tree_kinds`` in ``latency.json``)."""


@dataclass(frozen=True)
class Protocol:
    """How each tree is timed (module docstring)."""

    warmup: int = 3
    rounds: int = 5
    reps: int = 10


# --------------------------------------------------------------------------- identity


def device_name(device: str) -> str:
    """What a table was measured on: the GPU's name, or the CPU's model and the threads
    the backends use (the same CPU with other threads is another device here)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu: {cpu_model()} ({torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def backend_version(backend: str) -> str:
    """The version of the library that runs ``backend``."""
    package = {"onnxruntime": "onnxruntime", "tensorrt": "tensorrt"}.get(backend, "torch")
    try:
        return f"{package} {importlib.metadata.version(package)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{package} (not installed)"


# --------------------------------------------------------------------------- runners


def make_runner(
    backend: str,
    net,
    batch: int,
    size: tuple[int, int],
    device: str,
    workdir: Path,
    trt_version: str = "10.3",
    exporter: str = "legacy",
    dynamic_batch: bool = False,
) -> Callable[[], None]:
    """One call of the materialized tree ``net`` on ``backend`` at ``[batch, 3, *size]``.

    ``workdir`` holds what the backend needs on disk (ONNX file, package, engine). The ONNX
    file is written by ``exporter`` (``legacy``, the TorchScript exporter: the same network
    as the bundle's file, about 10x faster to write for the hundred-odd trees of a table;
    ``auto``: exactly the bundle's file) with a static or, as bundles have, dynamic batch.
    """
    import torch

    x = torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0))
    if backend == "onnxruntime":
        return _ort_call(net, x, workdir, trt_version, exporter, dynamic_batch)
    if backend == "aoti":
        from dymu.compile.aoti import compile_aoti, load_aoti

        package = workdir / "model.pt2"
        compile_aoti(net, package, input_shape=tuple(x.shape), dynamic_batch=False, device=device)
        run = load_aoti(package, device)
    elif backend == "tensorrt":
        run = _trt_runner(net, x, workdir, trt_version)
    else:
        run = net.to(device)
        if backend == "compiled":
            # Every tree is a new module with the same forward: without room for one
            # compiled graph per tree, dynamo would fall back to eager after 8 of them.
            limits = torch._dynamo.config
            limits.recompile_limit = max(limits.recompile_limit, 4096)
            limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, 4096)
            run = torch.compile(run, mode="reduce-overhead" if device != "cpu" else "default")
    x = x.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def call() -> None:
        with torch.inference_mode():
            run(x)
        sync()

    return call


def _ort_call(
    net, x, workdir: Path, trt_version: str, exporter: str, dynamic_batch: bool
) -> Callable[[], None]:
    """ONNX Runtime's CPU provider on the tree's ONNX file, threads as PyTorch's."""
    import torch

    from dymu.compile.onnx_export import export_onnx

    path = workdir / "model.onnx"
    export_onnx(
        net,
        path,
        input_shape=tuple(x.shape),
        target=trt_version,
        exporter=exporter,
        dynamic_batch=dynamic_batch,
    )
    session = ort_session(path, torch.get_num_threads())
    feed = {"image": x.numpy()}
    return lambda: session.run(None, feed)


def ort_session(path: Path, threads: int):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads that do not spin.

    Each session owns a thread pool whose threads spin for a while after every call; with
    many sessions timed in turn, the last one's spinning threads compete with the next one
    (the median spread of the round medians was 60% on 2 cores with spinning, against a few
    percent without)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _trt_runner(net, x, workdir: Path, trt_version: str):
    """The tree's TensorRT engine, built here (needs TensorRT and a GPU)."""
    from dymu.compile.onnx_export import export_onnx
    from dymu.compile.trt_engine import EngineRunner, build_engine

    batch = x.shape[0]
    shape = tuple(x.shape)
    export_onnx(net, workdir / "model.onnx", input_shape=shape, target=trt_version)
    build_engine(workdir / "model.onnx", workdir / "model.engine", opt_batch=batch, max_batch=batch)
    runner = EngineRunner(workdir / "model.engine")
    return lambda inp: runner(inp.cuda())


# --------------------------------------------------------------------------- measuring


def measure(
    calls: dict[str, Callable[[], None]],
    protocol: Protocol,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Interleaved timing of every call (module docstring): ``{key: {"ms", "spread"}}``."""
    from tqdm.auto import tqdm

    for call in calls.values():
        for _ in range(protocol.warmup):
            call()
    rng = np.random.default_rng(seed)
    keys = list(calls)
    per_round: dict[str, list[float]] = {k: [] for k in keys}
    for _ in tqdm(range(protocol.rounds), desc="measure", unit="round", disable=not progress):
        for i in rng.permutation(len(keys)):
            call, times = calls[keys[i]], []
            for _ in range(protocol.reps):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
            per_round[keys[i]].append(1e3 * statistics.median(times))
    out = {}
    for k, medians in per_round.items():
        ms = statistics.median(medians)
        out[k] = {"ms": ms, "spread": (max(medians) - min(medians)) / ms}
    return out


# --------------------------------------------------------------------------- the model


def features(tree: TreeSpec) -> np.ndarray:
    """[N * (L-1)] 1.0 where the tree runs node (l, j), l < L-1 (layer-major)."""
    used = tree.used()
    return np.array([float(u) for row in used[:-1] for u in row])


def fit(trees: Sequence[TreeSpec], measured_ms: Sequence[float]) -> tuple[float, np.ndarray]:
    """``(c, t [L-1, N])`` of the latency model, every cost >= 0, the constant too: it
    prices the heads in :func:`latency_space`, and noisy timings on a busy machine once fitted
    it at -0.35 ms (sklearn's ``positive`` leaves the intercept free, so it is a column)."""
    from sklearn.linear_model import LinearRegression

    x = np.stack([features(t) for t in trees])  # [K, N*(L-1)]
    x = np.hstack([np.ones((len(x), 1)), x])  # [K, 1 + N*(L-1)] the constant first
    model = LinearRegression(positive=True, fit_intercept=False)
    model.fit(x, np.asarray(measured_ms, dtype=np.float64))
    n, num_layers = trees[0].num_tasks, trees[0].num_layers
    return float(model.coef_[0]), model.coef_[1:].reshape(num_layers - 1, n)


@dataclass(frozen=True)
class WidthModel:
    """What a table of a slimmable space adds (METHOD.md 1.11): a node's latency is a fixed
    part plus a part that scales with its FLOPs, which fall with its own width and its
    parent's; a head's scales with the widths of the nodes it reads.

        latency = c + sum over used nodes (l, j) below the last layer of t[l][j]
                    + sum over used nodes (l, j) of s[l][j] * f_node(l, j)
                    + sum over heads j of h[j] * f_head(j)

    where f is the FLOPs of the node or head at its widths over its FLOPs at full width
    (the space's width costs, kept here so that the table prices configurations alone).
    ``t`` is the tree table's node cost; the last layer's and the heads' fixed parts stay
    in c (every configuration runs them), their parts that narrowing changes do not."""

    widths: tuple[float, ...]
    node_frac: list  # [L][N][a][b]: FLOPs at (parent width a, own width b) / at full width
    head_frac: list  # [N][a][c]: FLOPs at (last node width a, low-level width c) / full
    low_layers: tuple[int | None, ...]  # [N]
    node_scale_ms: list | None = None  # [L][N] s, once fitted
    head_scale_ms: list | None = None  # [N] h, once fitted

    @classmethod
    def of_space(cls, G: nx.DiGraph) -> WidthModel:
        """The FLOPs fractions of the slimmable space ``G`` (not yet fitted)."""
        wc = width_costs(G)
        if wc is None:
            raise ValueError("the space has no widths")

        def frac(table):  # every entry over the last one (full widths), 0 for a 0 entry
            top = table[-1][-1]
            return [[v / top if top else 0.0 for v in row] for row in table]

        return cls(
            widths=tuple(wc.widths),
            node_frac=[[frac(node) for node in layer] for layer in wc.node_flops],
            head_frac=[frac(head) for head in wc.head_flops],
            low_layers=tuple(wc.low_layers),
        )

    def levels(self, tree: TreeSpec) -> list[list[int]]:
        """``[L][N]`` each node's index into :attr:`widths` (the last: full width)."""
        top = len(self.widths) - 1
        if tree.widths is None:
            return [[top] * tree.num_tasks for _ in range(tree.num_layers)]
        index = {w: i for i, w in enumerate(self.widths)}
        return [[index[w] for w in row] for row in tree.widths]

    def features(self, tree: TreeSpec) -> np.ndarray:
        """[(L-1) N + L N + N]: the tree table's :func:`features`, then every node's FLOPs
        fraction where the tree uses it (0 where not; layer-major), then every head's,
        priced as :meth:`TreeSpec.flops` prices the configuration."""
        used, level = tree.used(), self.levels(tree)
        fracs = []
        for layer, row in enumerate(used):
            for j, runs in enumerate(row):
                a = 0 if layer == 0 else level[layer - 1][tree.parents[layer - 1][j]]
                fracs.append(self.node_frac[layer][j][a][level[layer][j]] if runs else 0.0)
        last = tree.num_layers - 1
        for j, low in enumerate(self.low_layers):
            c = 0 if low is None else level[low][tree.path(j)[low]]
            fracs.append(self.head_frac[j][level[last][j]][c])
        return np.concatenate([features(tree), np.asarray(fracs)])

    def to_json(self) -> dict[str, Any]:
        return {
            "widths": list(self.widths),
            "node_scale_ms": self.node_scale_ms,
            "head_scale_ms": self.head_scale_ms,
            "node_frac": self.node_frac,
            "head_frac": self.head_frac,
            "low_layers": list(self.low_layers),
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> WidthModel:
        return cls(
            widths=tuple(float(w) for w in obj["widths"]),
            node_frac=obj["node_frac"],
            head_frac=obj["head_frac"],
            low_layers=tuple(None if v is None else int(v) for v in obj["low_layers"]),
            node_scale_ms=[[float(v) for v in row] for row in obj["node_scale_ms"]],
            head_scale_ms=[float(v) for v in obj["head_scale_ms"]],
        )


def fit_widths(
    configs: Sequence[TreeSpec], measured_ms: Sequence[float], model: WidthModel
) -> tuple[float, np.ndarray, WidthModel]:
    """``(c, t [L-1, N], the fitted width model)``: :class:`WidthModel`'s form by least
    squares, every coefficient >= 0 (as :func:`fit`)."""
    from sklearn.linear_model import LinearRegression

    x = np.stack([model.features(t) for t in configs])  # [K, (L-1)N + LN + N]
    x = np.hstack([np.ones((len(x), 1)), x])  # [K, 1 + ...] the constant first
    reg = LinearRegression(positive=True, fit_intercept=False)
    reg.fit(x, np.asarray(measured_ms, dtype=np.float64))
    n, num_layers = configs[0].num_tasks, configs[0].num_layers
    fixed, scaled = 1 + (num_layers - 1) * n, 1 + (2 * num_layers - 1) * n
    fitted = dataclasses.replace(
        model,
        node_scale_ms=reg.coef_[fixed:scaled].reshape(num_layers, n).tolist(),
        head_scale_ms=reg.coef_[scaled:].tolist(),
    )
    return float(reg.coef_[0]), reg.coef_[1:fixed].reshape(num_layers - 1, n), fitted


@dataclass
class LatencyTable:
    """A fitted latency model and where it holds (``latency.json``)."""

    backend: str
    backend_version: str
    device: str
    batch: int
    input_size: tuple[int, int]
    precision: str
    tasks: list[str]
    const_ms: float
    node_ms: list[list[float]]  # [L-1][N], layers below the last
    info: dict[str, Any]  # fit, validation, noise, reference trees, protocol
    widths: WidthModel | None = None
    """The width terms of a slimmable space's table (None: full-width trees only)."""

    @property
    def num_layers(self) -> int:
        return len(self.node_ms) + 1

    def predict(self, tree: TreeSpec) -> float:
        """Predicted milliseconds of ``tree`` (a configuration with widths needs a table
        with :attr:`widths`)."""
        if self.widths is None:
            if tree.widths is not None:
                raise UserError(
                    "this latency table prices full-width trees only; run dymu profile on "
                    "the run with widths to price configurations with widths"
                )
            t = np.asarray(self.node_ms, dtype=np.float64).ravel()
            return self.const_ms + float(features(tree) @ t)
        w = self.widths
        coef = [np.ravel(self.node_ms), np.ravel(w.node_scale_ms), w.head_scale_ms]
        return self.const_ms + float(w.features(tree) @ np.concatenate(coef))

    def full_width_ms(self) -> tuple[float, list[list[float]]]:
        """``(c, t [L-1][N])`` of the full-width trees' form: with widths, the last layer's
        and the heads' scaled terms at full width join c (every tree runs them)."""
        if self.widths is None:
            return self.const_ms, self.node_ms
        scale = np.asarray(self.widths.node_scale_ms)  # [L, N]
        const = self.const_ms + float(scale[-1].sum()) + float(sum(self.widths.head_scale_ms))
        return const, (np.asarray(self.node_ms) + scale[:-1]).tolist()

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "backend": self.backend,
            "backend_version": self.backend_version,
            "device": self.device,
            "batch": self.batch,
            "input_size": list(self.input_size),
            "precision": self.precision,
            "tasks": self.tasks,
            "model": {
                "form": WIDTH_FORM if self.widths is not None else TREE_FORM,
                "const_ms": self.const_ms,
                "node_ms": self.node_ms,
                **({} if self.widths is None else {"widths": self.widths.to_json()}),
            },
            **self.info,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: Path) -> LatencyTable:
        """The table in ``obj`` (read from ``path``); one line when it is not one, or is
        one of schema 1, whose checked error held for uniform random trees only."""
        if isinstance(obj, dict) and obj.get("schema_version") == 1:
            raise UserError(
                f"{path} is a latency table of an older dymu (fitted and checked on uniform "
                "random trees only); re-run dymu profile to make it again"
            )
        try:
            if obj.get("schema_version") != SCHEMA_VERSION:
                raise KeyError("schema_version")
            model = obj["model"]
            table = cls(
                backend=str(obj["backend"]),
                backend_version=str(obj["backend_version"]),
                device=str(obj["device"]),
                batch=int(obj["batch"]),
                input_size=(int(obj["input_size"][0]), int(obj["input_size"][1])),
                precision=str(obj["precision"]),
                tasks=list(obj["tasks"]),
                const_ms=float(model["const_ms"]),
                node_ms=[[float(v) for v in row] for row in model["node_ms"]],
                info={k: v for k, v in obj.items() if k in _INFO},
                widths=WidthModel.from_json(model["widths"]) if "widths" in model else None,
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise UserError(
                f"{path} is not a dymu latency table (bad or missing {exc}); make one with "
                "dymu profile"
            ) from None
        return table

    def check(
        self,
        *,
        tasks: Sequence[str],
        num_layers: int,
        input_size: Sequence[int],
        backend: str | None = None,
        device: str | None = None,
        batch: int | None = None,
        path: str | os.PathLike = "latency.json",
    ) -> None:
        """Refuse, in one line, a table made for another space, input size or, when given,
        backend, device or batch."""
        wanted = [
            ("tasks", list(tasks), self.tasks),
            ("layers", num_layers, self.num_layers),
            ("input size", list(input_size), list(self.input_size)),
            ("backend", backend, self.backend),
            ("device", device, self.device),
            ("batch", batch, self.batch),
        ]
        for what, here, there in wanted:
            if here is not None and here != there:
                raise UserError(
                    f"{path} was measured for {what} {there}, not {here}; run dymu profile "
                    "for this one"
                )

    @property
    def protocol(self) -> Protocol:
        """How the table's trees were timed (defaults for keys it lacks)."""
        p = self.info.get("protocol", {})
        return Protocol(**{k: int(p[k]) for k in ("warmup", "rounds", "reps") if k in p})

    @property
    def cheapest_ms(self) -> float:
        """The measured latency of the fastest of the streams' cheapest trees: the low end
        of the space's latency range, as the anchor tree's is the high end."""
        return float(self.info["reference"]["cheapest_ms"])


TREE_FORM = "const_ms + sum of node_ms over the used nodes below the last layer"
WIDTH_FORM = (
    "const_ms + sum of node_ms over the used nodes below the last layer + sum over the used "
    "nodes of widths.node_scale_ms x the node's FLOPs fraction + sum over the heads of "
    "widths.head_scale_ms x the head's FLOPs fraction"
)

_INFO = (
    "command",
    "protocol",
    "tree_kinds",
    "fit",
    "validation",
    "noise",
    "reference",
    "trt_version",
)


def read_table(path: str | os.PathLike) -> LatencyTable:
    """The latency table in ``path``; one line when it is missing or damaged."""
    from dymu.artifacts import read_json

    path = Path(path)
    obj = read_json(path, "latency table", "make one with dymu profile")
    return LatencyTable.from_json(obj, path)


def latency_space(G: nx.DiGraph, table: LatencyTable) -> nx.DiGraph:
    """A copy of ``G`` whose node "FLOPs" are the table's latencies in integer nanoseconds
    (the last layer's 0; ``c`` on the first head), for :func:`dymu.space.derive.repair`."""
    n, _ = space_shape(G)
    _, params, _, hparams = costs(G)
    const, node_ms = table.full_width_ms()  # trees run full width here
    ns = [[round(1e6 * v) for v in row] for row in node_ms] + [[0] * n]  # [L][N]
    heads = [round(1e6 * const)] + [0] * (n - 1)
    return build_space(list(G.graph["tasks"]), ns, params, heads, hparams)


# --------------------------------------------------------------------------- profiling


def reference_trees(
    n: int, num_layers: int, widths: Sequence[float] = (1.0,)
) -> dict[str, TreeSpec]:
    """The anchor tree and every stream's cheapest tree (the ends of the latency range),
    and with ``widths`` below full width each of them at the narrowest too."""
    trees = {"anchor": TreeSpec.no_sharing(n, num_layers)}
    for k in range(n):
        trees[f"trunk{k}"] = TreeSpec.all_sharing(n, num_layers, k).canonical()
    if min(widths) < 1.0:
        narrowest = [[min(widths)] * n for _ in range(num_layers)]  # [L][N]
        for name, tree in list(trees.items()):
            trees[f"{name}@narrowest"] = TreeSpec(tree.parents, narrowest).canonical()
    return trees


def draw_tree(
    kind: str,
    n: int,
    num_layers: int,
    rng: np.random.Generator,
    widths: Sequence[float] = (1.0,),
) -> TreeSpec:
    """One random tree of ``kind`` (canonical): ``uniform``, every parent drawn from the N
    streams; ``branching``, a random trunk that every task leaves at a uniformly random
    layer 0..L-1 (:meth:`TreeSpec.branching`), as the trees between the cheapest and the
    anchor tree that budgets derive. With ``widths`` beyond full width, every node then
    runs at a width drawn uniformly from them."""
    if kind == "uniform":
        tree = TreeSpec.random(n, num_layers, rng).canonical()
    elif kind == "branching":
        trunk = int(rng.integers(n))
        split = rng.integers(0, num_layers, size=n).tolist()  # [N] layers 0..L-1
        tree = TreeSpec.branching(n, num_layers, trunk, split)
    else:
        raise ValueError(f"unknown kind of tree {kind!r}; choose from {', '.join(KINDS)}")
    if len(widths) == 1:
        return tree
    at = rng.choice(np.asarray(widths), size=(num_layers, n)).tolist()  # [L][N]
    return TreeSpec(tree.parents, at).canonical()


def random_trees(
    kind: str,
    n: int,
    num_layers: int,
    count: int,
    rng: np.random.Generator,
    avoid: set[str],
    widths: Sequence[float] = (1.0,),
) -> list[TreeSpec]:
    """``count`` distinct random trees of ``kind`` (at random ``widths``) whose hashes are
    not in ``avoid`` (fewer when the space has fewer)."""
    out: dict[str, TreeSpec] = {}
    for _ in range(100 * count):
        if len(out) == count:
            break
        tree = draw_tree(kind, n, num_layers, rng, widths)
        if tree.hash() not in avoid:
            out.setdefault(tree.hash(), tree)
    return list(out.values())


def per_kind(count: int) -> dict[str, int]:
    """``count`` random trees shared between the kinds: half each, uniform takes the odd
    one (the measuring time stays that of ``count`` trees)."""
    return {"uniform": count - count // 2, "branching": count // 2}


def profile_trees(
    n: int,
    num_layers: int,
    calibrate: int,
    validate: int,
    seed: int,
    widths: Sequence[float] = (1.0,),
) -> tuple[dict[str, TreeSpec], dict[str, list[TreeSpec]], dict[str, list[TreeSpec]]]:
    """The trees a table is fitted on (:func:`reference_trees` and ``calibrate`` random
    ones) and the ``validate`` other random trees it is checked on, all distinct; the
    random ones as ``{kind: trees}`` (:func:`per_kind`), at random ``widths``."""
    rng = np.random.default_rng(seed)
    refs = reference_trees(n, num_layers, widths)
    known = {t.hash() for t in refs.values()}
    drawn: list[dict[str, list[TreeSpec]]] = []
    for count in (calibrate, validate):
        drawn.append({})
        for kind, k in per_kind(count).items():
            drawn[-1][kind] = random_trees(kind, n, num_layers, k, rng, known, widths)
            known |= {t.hash() for t in drawn[-1][kind]}
    return refs, drawn[0], drawn[1]


def profile_run(
    run_dir: str | os.PathLike,
    *,
    backend: str,
    batch: int,
    device: str = "cpu",
    calibrate: int = 60,
    validate: int = 50,
    protocol: Protocol = Protocol(),
    seed: int = 0,
    trt_version: str = "10.3",
    progress: bool = True,
) -> LatencyTable:
    """Measure, fit and validate the latency table of a finished run's space.

    ``calibrate`` random trees, half of each kind (:func:`per_kind`), plus the reference
    trees (:func:`reference_trees`) are fitted; ``validate`` other random trees, half of
    each kind, are predicted and compared with their measurement, kind by kind.
    """
    from dymu.data import input_size
    from dymu.search import load_run

    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    run = load_run(run_dir)
    n, num_layers = space_shape(run.space)
    size = input_size(run.cfg.data)
    width_model = None if run.slim is None else WidthModel.of_space(run.slim)
    widths = (1.0,) if width_model is None else width_model.widths
    refs, calib, valid = profile_trees(n, num_layers, calibrate, validate, seed, widths)
    kinds = {t.hash(): "reference" for t in refs.values()}
    kinds |= {t.hash(): k for group in (calib, valid) for k, ts in group.items() for t in ts}
    fit_trees = [*refs.values(), *(t for ts in calib.values() for t in ts)]
    valid_trees = [t for ts in valid.values() for t in ts]
    trees = {t.hash(): t for t in (*fit_trees, *valid_trees)}  # one anchor/trunk when N = 1
    settings = (backend, batch, size, device, trt_version)
    timed, seconds = _measure_trees(run, list(trees.values()), settings, protocol, seed, progress)
    measured = [timed[t.hash()]["ms"] for t in fit_trees]
    if width_model is None:
        const, node = fit(fit_trees, measured)
    else:
        const, node, width_model = fit_widths(fit_trees, measured, width_model)
    table = LatencyTable(
        backend=backend,
        backend_version=backend_version(backend),
        device=device_name(device),
        batch=batch,
        input_size=size,
        precision="fp32",
        tasks=list(run.space.graph["tasks"]),
        const_ms=const,
        node_ms=node.tolist(),
        info={},
        widths=width_model,
    )
    table.info = _summary(table, refs, fit_trees, valid_trees, kinds, timed, protocol, seconds)
    if backend in ("onnxruntime", "tensorrt"):
        table.info["trt_version"] = trt_version
    return table


def _measure_trees(run, trees, settings, protocol, seed, progress):
    """Every tree materialized and made runnable on the backend, then timed together
    (:func:`measure`): ``({hash: {"ms", "spread"}}, seconds spent timing)``."""
    import torch
    from tqdm.auto import tqdm

    from dymu.compile.materialize import materialize
    from dymu.train.calibrate import calibrated

    backend, batch, size, device, trt_version = settings
    calls: dict[str, Callable[[], None]] = {}
    # Narrowed nodes need calibrated statistics to materialize; their values do not change
    # what a network costs, so random images serve.
    images = [torch.rand(8, 3, *size, generator=torch.Generator().manual_seed(seed))]
    with tempfile.TemporaryDirectory(prefix="dymu-profile-") as tmp:
        for tree in tqdm(trees, desc=f"build ({backend})", disable=not progress):
            with torch.no_grad():
                stats = calibrated(run.streams, tree, images).bn_stats if tree.widths else None
                net = materialize(run.streams, tree, None, stats)
            work = Path(tmp) / tree.hash()
            work.mkdir()
            calls[tree.hash()] = make_runner(backend, net, batch, size, device, work, trt_version)
        start = time.perf_counter()
        timed = measure(calls, protocol, seed, progress)
        return timed, time.perf_counter() - start


def _summary(table, refs, fit_trees, valid, kinds, timed, protocol, seconds) -> dict[str, Any]:
    """The table's record: fit and validation errors (all trees, then by kind), noise,
    reference trees, protocol."""

    def rows(trees):
        out = []
        for t in trees:
            m, p = timed[t.hash()]["ms"], table.predict(t)
            out.append(
                {"tree": t.hash(), "kind": kinds[t.hash()], "measured_ms": m,
                 "predicted_ms": p, "rel_err": (p - m) / m, "spread": timed[t.hash()]["spread"]}
            )  # fmt: skip
        return out

    fit_rows = rows(fit_trees)
    trunks = [t for name, t in refs.items() if name.startswith("trunk") and "@" not in name]
    cheapest = min(trunks, key=lambda t: timed[t.hash()]["ms"])
    narrow = [t for name, t in refs.items() if name.endswith("@narrowest")]
    spreads = [v["spread"] for v in timed.values()]
    order = "interleaved, a new random order every round"
    noise = {"median_spread": float(np.median(spreads)), "max_spread": float(max(spreads))}
    noise["spread"] = "(max - min) / median of a tree's round medians"
    kinds_text = dict(KIND_TEXT)
    if narrow:  # a slimmable space's table
        kinds_text["reference"] += ", each also at the narrowest width"
        for kind in KINDS:
            kinds_text[kind] += "; every node at a width drawn uniformly from the space's"
    return {
        "protocol": {**protocol.__dict__, "order": order, "measure_s": round(seconds, 1)},
        "tree_kinds": kinds_text,
        "fit": _errors(fit_rows, ("reference", *KINDS), keep_rows=False),
        "validation": _errors(rows(valid), KINDS, keep_rows=True) if valid else None,
        "noise": noise,
        "reference": {
            "anchor_ms": timed[refs["anchor"].hash()]["ms"],
            "cheapest_ms": timed[cheapest.hash()]["ms"],
            "cheapest_tree": cheapest.hash(),
            **({"narrowest_ms": min(timed[t.hash()]["ms"] for t in narrow)} if narrow else {}),
        },
    }


def _errors(rows: list[dict], kinds: Sequence[str], keep_rows: bool) -> dict[str, Any]:
    """Error statistics of ``rows`` together, then ``by_kind`` (with the rows themselves
    there when ``keep_rows``)."""
    out = _stats(rows)
    out["by_kind"] = {}
    for kind in kinds:
        mine = [r for r in rows if r["kind"] == kind]
        out["by_kind"][kind] = {**_stats(mine), **({"rows": mine} if keep_rows else {})}
    return out


def _stats(rows: list[dict]) -> dict[str, Any]:
    """Trees, median and largest absolute relative error (None without rows)."""
    e = np.abs([r["rel_err"] for r in rows])
    return {
        "trees": len(rows),
        "median_abs_rel_err": float(np.median(e)) if len(e) else None,
        "max_abs_rel_err": float(np.max(e)) if len(e) else None,
    }


def summary_lines(obj: dict[str, Any]) -> list[str]:
    """What ``dymu profile`` prints about a table (``latency.json`` as a dict): where it was
    measured, its range, the fit's and the check's errors by kind of tree, the noise."""

    def pct(stats: dict[str, Any]) -> str:
        if not stats["trees"]:
            return "no trees"
        return (
            f"{stats['trees']} trees, median |error| {100 * stats['median_abs_rel_err']:.1f}%, "
            f"worst {100 * stats['max_abs_rel_err']:.1f}%"
        )

    ref, fitted, val, noise = obj["reference"], obj["fit"], obj["validation"], obj["noise"]
    lines = [
        f"{obj['backend']} ({obj['backend_version']}) on {obj['device']}, batch "
        f"{obj['batch']}, input {obj['input_size'][0]}x{obj['input_size'][1]}",
        f"  anchor tree {ref['anchor_ms']:.3f} ms, fastest cheapest tree "
        f"{ref['cheapest_ms']:.3f} ms; constant {obj['model']['const_ms']:.3f} ms",
    ]
    if "widths" in obj["model"]:
        lines.append(
            f"  widths {obj['model']['widths']['widths']}: fastest configuration measured "
            f"{ref['narrowest_ms']:.3f} ms (the cheapest trees at the narrowest width)"
        )
    lines.append(f"  fit: {pct(fitted)}")
    lines += [f"    {kind}: {pct(s)}" for kind, s in fitted["by_kind"].items()]
    if val is not None:
        lines.append(f"  check on other trees: {pct(val)}")
        lines += [f"    {kind}: {pct(s)}" for kind, s in val["by_kind"].items()]
    lines.append(
        f"  noise (spread of round medians): median {100 * noise['median_spread']:.1f}%, "
        f"worst {100 * noise['max_spread']:.1f}%"
    )
    return lines


# --------------------------------------------------------------------------- budgets


def parse_target_ms(text: Any) -> float:
    """A latency target in milliseconds (> 0, finite), or one line saying what was given."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise UserError(f"--latency-ms must be a number of milliseconds, got {text!r}") from None
    if not (value > 0 and np.isfinite(value)):
        raise UserError(f"--latency-ms must be > 0, got {text!r}")
    return value


def load_budget(
    G: nx.DiGraph, path: str | os.PathLike, target_ms: Any, input_size, *, here: bool = False
) -> LatencyBudget:
    """The latency target ``target_ms`` on the table at ``path`` for the space ``G``.

    Refused in one line: a bad target, a missing or damaged table, one made for another
    space or input size, or, with ``here`` (a caller that measures on this machine), on
    another device; a target below the fastest tree (:class:`LatencyBudget`).
    """
    import torch

    target = parse_target_ms(target_ms)
    table = read_table(path)
    _, num_layers = space_shape(G)
    device = None
    if here:
        kind = "cpu" if table.device.startswith("cpu") else "cuda"
        usable = kind == "cpu" or torch.cuda.is_available()
        device = device_name(kind) if usable else "no CUDA device"
    tasks = list(G.graph["tasks"])
    table.check(tasks=tasks, num_layers=num_layers, input_size=input_size, device=device, path=path)
    return LatencyBudget(G, table, target)


class LatencyBudget:
    """A latency target on one table: derive trees by predicted latency, as FLOPs budgets do.

    The edge hypernet is conditioned on a FLOPs budget; a latency target conditions it on
    the FLOPs budget at the same place in the space's range (the fastest tree to the anchor
    tree, mapped onto the cheapest tree to the anchor in FLOPs). Its argmax tree is then
    repaired by predicted latency (:func:`latency_space`, :func:`dymu.space.derive.repair`).

    Raises:
        UserError: a target below the fastest tree, naming its measured latency.
    """

    def __init__(self, G: nx.DiGraph, table: LatencyTable, target_ms: float) -> None:
        from dymu.space.graph import anchor_flops, min_flops

        self.table, self.target_ms = table, target_ms
        self.space = latency_space(G, table)
        self.full, self.fastest = anchor_flops(self.space), min_flops(self.space)  # [ns]
        floor = max(table.cheapest_ms, self.fastest / 1e6)
        if target_ms < floor:
            raise UserError(
                f"--latency-ms {target_ms:g} is below the fastest tree of this space on "
                f"{table.device} ({table.backend}, batch {table.batch}): "
                f"{table.cheapest_ms:.3f} ms measured, {self.fastest / 1e6:.3f} ms predicted"
            )
        low = min_flops(G) / anchor_flops(G)
        place = min(1.0, (1e6 * target_ms - self.fastest) / max(self.full - self.fastest, 1))
        self.flops_budget = low + (1.0 - low) * place
        """The FLOPs budget the edge hypernet is asked at (in [cheapest, 1])."""

    def describe(self) -> dict[str, Any]:
        """The target and the table it is measured by (for manifests)."""
        t = self.table
        return {
            "target_ms": self.target_ms,
            "flops_budget_asked": self.flops_budget,
            "table": {
                "backend": t.backend,
                "backend_version": t.backend_version,
                "device": t.device,
                "batch": t.batch,
                "input_size": list(t.input_size),
            },
        }

    def fraction(self, cap_ns: float) -> float:
        """``cap_ns`` as a fraction of the anchor tree's predicted latency that the repair
        accepts (at most 1, at least the fastest tree's)."""
        import math

        frac = min(1.0, max(cap_ns, self.fastest) / self.full)
        while frac * self.full < self.fastest:  # rounding: the repair must accept it
            frac = math.nextafter(frac, math.inf)
        return frac

    def derive(self, alpha: Any, preference: Any = None) -> TreeSpec:
        """The argmax tree of ``alpha`` repaired to the target's predicted latency (shared
        nodes on the preferred task's stream with a ``preference``, as
        :func:`~dymu.space.derive.derive_tree`)."""
        from dymu.space.derive import derive_tree

        return derive_tree(alpha, self.space, self.fraction(1e6 * self.target_ms), preference)

    def predicted_ms(self, tree: TreeSpec) -> float:
        return self.table.predict(tree)

    def faster(self, tree: TreeSpec, alpha: Any = None) -> TreeSpec | None:
        """The tree the repair reaches below ``tree``'s predicted latency (one or more
        merges), or None when ``tree`` is already the fastest."""
        from dymu.space.derive import repair

        cost = tree.flops(self.space)
        if cost <= self.fastest:
            return None
        return repair(tree, self.space, self.fraction(cost - 1), alpha)
