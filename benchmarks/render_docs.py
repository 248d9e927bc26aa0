"""Render the results tables of README.md and docs/*.md from benchmarks/results/*.json.

Every table of measured figures in the docs sits between two markers, each on a line of
its own::

    <!-- results:NAME -->
    ...rendered: do not edit by hand...
    <!-- /results:NAME -->

``RENDERERS[NAME]`` names the JSON files the block is made from and turns them into the
block's lines (a table, sometimes a sentence, then a line naming the JSON). To re-render
after new results, and to check that the committed pages match the JSON:

    python benchmarks/render_docs.py            # rewrite the blocks in place (atomically)
    python benchmarks/render_docs.py --check    # exit 1 and print a diff where a page differs

Exit status: 0 when every block is up to date (or was rewritten); 1 when ``--check`` finds
a block that differs, or a renderer has no block in any page; 2 on bad input (a missing or
unreadable JSON, a marker without its end, an unknown block name), one line on stderr.

To add a table: write a function that takes the loaded JSON files and returns the block's
lines, register it with ``@renderer("NAME", "file.json", ...)``, put the two markers where
the table goes, and run the script.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dymu.errors import DymuError
from dymu.io import write_text

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WIDTH = 92
"""Prose lines in a block are wrapped at this width, as the pages are."""

MARKER = re.compile(r"^<!--\s*(/?)results:(\S*?)\s*-->\s*$")
NAME = re.compile(r"[A-Za-z0-9_.-]+")
FENCE = re.compile(r"^\s*(```|~~~)")
SCRIPT = "`benchmarks/render_docs.py`"


class RenderError(Exception):
    """Bad input: reported as one line, exit status 2."""


@dataclass(frozen=True)
class Renderer:
    fn: Callable[..., list[str]]
    sources: tuple[str, ...]
    source_line: bool = True


RENDERERS: dict[str, Renderer] = {}


def renderer(name: str, *sources: str, source_line: bool = True):
    """Register ``fn(*loaded_sources) -> lines`` as the renderer of block ``name``;
    ``sources`` are file names in benchmarks/results/. Unless ``source_line`` is false, the
    block ends with a line naming them."""

    def register(fn: Callable[..., list[str]]) -> Callable[..., list[str]]:
        if name in RENDERERS:
            raise ValueError(f"block {name!r} has two renderers")
        RENDERERS[name] = Renderer(fn, sources, source_line)
        return fn

    return register


def default_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- formatting


def num(x: float, decimals: int) -> str:
    return f"{x:.{decimals}f}"


def signed(x: float, decimals: int) -> str:
    return f"{x:+.{decimals}f}"


def delta(x: float) -> str:
    """A delta_m in %: signed, 2 decimals under 10 in magnitude, 1 from there on."""
    return signed(x, 2 if abs(x) < 10 else 1)


def two_digits(x: float) -> str:
    """Signed, with two significant digits (-2.8, +0.16)."""
    decimals = max(0, 1 - math.floor(math.log10(abs(x)))) if x else 1
    return signed(x, decimals)


def pct(fraction: float) -> str:
    """A fraction as a percentage: 1 decimal under 10%, none from there on."""
    value = 100 * fraction
    return f"{value:.1f}%" if value < 10 else f"{value:.0f}%"


def thousands(x: float) -> str:
    return f"{x:,.0f}"


def rate(x: float) -> str:
    """Images per second: 3,674 / 50.4 / 0.66."""
    if x >= 1000:
        return thousands(x)
    return num(x, 1 if x >= 1 else 2)


def value_range(lo: float, hi: float, decimals: int) -> str:
    """``lo-hi`` with ``decimals`` or more: enough that the two differ by at least 2 in
    their last place, so a range of hundredths still shows."""
    while decimals < 6:
        units = round((float(num(hi, decimals)) - float(num(lo, decimals))) * 10**decimals)
        if abs(units) >= 2:
            break
        decimals += 1
    return f"{num(lo, decimals)}-{num(hi, decimals)}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    return [line(header), line(["---"] * len(header)), *(line(row) for row in rows)]


def paragraph(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, break_long_words=False, break_on_hyphens=False)


def source_note(sources: tuple[str, ...]) -> list[str]:
    if len(sources) == 1:
        return paragraph(f"Rendered from `benchmarks/results/{sources[0]}` by {SCRIPT}.")
    files = ", ".join(f"`{s}`" for s in sources)
    return paragraph(f"Rendered by {SCRIPT} from `benchmarks/results/`: {files}.")


# ---------------------------------------------------------------- shared look-ups

BUDGETS = ("0.5", "0.75", "1")
"""The evaluation's budgets, as search_quality.py keys them."""


def budget_label(key: str) -> str:
    return "1.0" if float(key) == 1 else key


def static_subset(baselines: dict) -> tuple[int, int] | None:
    """(models trained, sweep size) when only part of the static set was trained."""
    subset = baselines["methods"]["static"].get("subset")
    return (subset["models"], subset["sweep"]) if subset else None


def static_label(baselines: dict) -> str:
    subset = static_subset(baselines)
    if subset is None:
        return "static shared models"
    return f"static shared models ({subset[0]} of the sweep's {subset[1]})"


def distinct_trees(points: list[dict]) -> int:
    return len({p["label"] for p in points})


# ---------------------------------------------------------------- README.md


@renderer("readme_default", "search_quality_default_cpu.json", "baselines_default_cpu.json")
def readme_default(quality: dict, baselines: dict) -> list[str]:
    subset = static_subset(baselines)
    static = "HV / static models" + (f" ({subset[0]} of {subset[1]})" if subset else "")
    header = ["budget", "FLOPs mean (of anchor)", "delta_m %", "HV", static, "HV / PHN-BN"]
    rows = []
    for key in BUDGETS:
        b = quality["budgets"][key]
        rows.append(
            [
                budget_label(key),
                num(b["flops_mean"], 3),
                two_digits(b["delta_m"]),
                num(b["hypervolume"], 1),
                num(b["hv_ratio_static"], 2),
                num(b["hv_ratio_phn_bn"], 2),
            ]
        )
    lines = table(header, rows)
    if subset:
        models, sweep = subset
        note = (
            f"HV / static models compares with {models} static models, trained for {models} "
            f"of the sweep's {sweep} preferences; all {sweep} would have at least their "
            "hypervolume, so the ratio is an upper bound."
        )
        lines += ["", *paragraph(note)]
    return lines


# ---------------------------------------------------------------- docs/search.md


@renderer("search_default", "search_quality_default_cpu.json", "baselines_default_cpu.json")
def search_default(quality: dict, baselines: dict) -> list[str]:
    header = [
        "budget",
        "mean FLOPs (of anchor)",
        "delta_m %",
        "weighted delta_m %",
        "HV",
        "HV / static",
        "HV / PHN-BN",
        "distinct trees / 20",
    ]
    cheapest = min(quality["budgets"], key=float)
    rows = []
    for key in (cheapest, *BUDGETS):
        b = quality["budgets"][key]
        label = f"{num(float(key), 3)} (cheapest tree)" if key == cheapest else budget_label(key)
        rows.append(
            [
                label,
                num(b["flops_mean"], 3),
                delta(b["delta_m"]),
                delta(b["delta_m_weighted"]),
                num(b["hypervolume"], 2),
                num(b["hv_ratio_static"], 3),
                num(b["hv_ratio_phn_bn"], 3),
                str(b["distinct_trees"]),
            ]
        )
    hv = quality["hypervolume"]
    static, phn_bn = baselines["methods"]["static"], baselines["methods"]["phn_bn"]
    before = baselines["methods"]["dymu@1"]
    before_hv = hv["before:dymu@1"]
    rows += [
        [
            static_label(baselines),
            num(static["flops_fraction"], 3),
            delta(static["delta_m"]),
            "",
            num(hv["static"], 2),
            "1",
            "",
            "",
        ],
        [
            "PHN-BN",
            num(phn_bn["flops_fraction"], 3),
            delta(phn_bn["delta_m"]),
            "",
            num(hv["phn_bn"], 2),
            "",
            "1",
            "",
        ],
        [
            "the paper's recipe, budget 1 (before this work)",
            num(before["flops_fraction"], 3),
            delta(before["delta_m"]),
            "",
            num(before_hv, 2),
            num(before_hv / hv["static"], 3),
            num(before_hv / hv["phn_bn"], 3),
            str(distinct_trees(baselines["points"]["dymu@1"])),
        ],
    ]
    return table(header, rows)


METRIC_NAMES = {
    "miou": "mIoU",
    "abs_err": "abs. error",
    "mean_angle": "mean angle",
    "f_measure": "F-measure",
}
METRIC_DECIMALS = {"abs_err": 4}
"""Decimals of a metric's range (2 unless listed; more where the range needs them)."""


@renderer("search_controllability", "search_quality_default_cpu.json")
def search_controllability(quality: dict) -> list[str]:
    keys = ("0.5", "0.75")
    ranges = quality["budgets"][keys[0]]["control_range"]
    header = ["budget"] + [
        f"{task} ({METRIC_NAMES.get(r['metric'], r['metric'])})" for task, r in ranges.items()
    ]
    rows = []
    for key in keys:
        b = quality["budgets"][key]
        cells = [budget_label(key)]
        for task, r in b["control_range"].items():
            decimals = METRIC_DECIMALS.get(r["metric"], 2)
            span = value_range(r["min"], r["max"], decimals)
            cells.append(f"{signed(b['controllability'][task], 2)} ({span})")
        rows.append(cells)
    return table(header, rows)


def _spearmans(values: dict[str, float]) -> str:
    return " / ".join(signed(v, 2) for v in values.values())


@renderer(
    "search_stage2_valtest",
    "search_quality_default_valtest_cpu.json",
    "search_quality_ablation_stage2_no_flips_valtest_cpu.json",
    "search_quality_ablation_stage2_no_task_floor_valtest_cpu.json",
)
def search_stage2_valtest(*runs: dict) -> list[str]:
    names = ("default", "`stage2.hflip=false`", "`stage2.task_floor=0`")
    tasks = " / ".join(next(iter(runs[0]["budgets"].values()))["controllability"])
    header = ["stage 2", "budget", "delta_m %: val / test"]
    header += [f"controllability on metrics, val: {tasks}", "test"]
    rows = []
    for name, run in zip(names, runs, strict=True):
        for key in BUDGETS:
            b = run["budgets"][key]
            val = b["validation"]
            rows.append(
                [
                    f"{name} ({' / '.join(tasks)})",
                    budget_label(key) if len(key) < 6 else f"{float(key):.3f} (cheapest)",
                    f"{signed(val['delta_m'], 2)} / {signed(b['delta_m'], 2)}",
                    _spearmans(val["controllability"]),
                    _spearmans(b["controllability"]),
                ]
            )
    return table(header, rows)


@renderer("search_valtest", "search_quality_default_valtest_cpu.json")
def search_valtest(quality: dict) -> list[str]:
    tasks = " / ".join(next(iter(quality["budgets"].values()))["controllability"])
    header = ["budget", "FLOPs", "trees / 20", "delta_m %: test / val"]
    header += [f"controllability on metrics, test: {tasks}", "val"]
    header += ["on losses, test", "val"]
    rows = []
    for key, b in quality["budgets"].items():
        val = b["validation"]
        label = budget_label(key) if key in BUDGETS else f"{float(key):.3f} (cheapest)"
        rows.append(
            [
                label,
                num(b["flops_mean"], 3),
                str(b["distinct_trees"]),
                f"{signed(b['delta_m'], 2)} / {signed(val['delta_m'], 2)}",
                _spearmans(b["controllability"]),
                _spearmans(val["controllability"]),
                _spearmans(b["controllability_loss"]),
                _spearmans(val["controllability_loss"]),
            ]
        )
    return table(header, rows)


@renderer(
    "search_seeds", "search_quality_default_cpu.json", "search_quality_default_run_seed1_cpu.json"
)
def search_seeds(seed0: dict, seed1: dict) -> list[str]:
    tasks = " / ".join(seed0["budgets"]["0.5"]["controllability"])
    header = ["seed", "budget", "FLOPs", "delta_m %", "trees / 20"]
    header += [f"controllability on metrics: {tasks}", "on losses"]
    rows = []
    for seed, quality, keys in ((0, seed0, ("0.5", "0.75")), (1, seed1, BUDGETS)):
        for key in keys:
            b = quality["budgets"][key]
            controls = ["", ""]  # the goals ask for controllability below budget 1 only
            if float(key) < 1:
                controls = [_spearmans(b["controllability"]), _spearmans(b["controllability_loss"])]
            rows.append(
                [
                    str(seed),
                    budget_label(key),
                    num(b["flops_mean"], 3),
                    delta(b["delta_m"]),
                    str(b["distinct_trees"]),
                    *controls,
                ]
            )
    return table(header, rows)


ABLATION_FILES = {
    "independent": "search_quality_ablation_independent_streams_cpu.json",
    "v1_bn": "search_quality_ablation_bn_only_cpu.json",
    "v1": "search_quality_ablation_anchor_tree_in_sandwich_cpu.json",
    "joint600": "search_quality_ablation_joint600_cpu.json",
    "paper": "search_quality_ablation_paper_objective_cpu.json",
    "uniform": "search_quality_ablation_uniform_random_trees_cpu.json",
    "joint_weights": "search_quality_ablation_stage1_joint_weights_cpu.json",
    "no_flips": "search_quality_ablation_stage2_no_flips_cpu.json",
    "no_floor": "search_quality_ablation_stage2_no_task_floor_cpu.json",
    "earlier": "search_quality_earlier_stage1_cpu.json",
    "default": "search_quality_default_cpu.json",
}
ADAPTERS = "BatchNorm + adapters"
BRANCH = "joint (branch trees) + private nodes"
ABLATION_ROWS = [
    # (stage 1 objective, streams the trees run on, stage 2, key of ABLATION_FILES or
    # "before": the paper's recipe kept in baselines_default_cpu.json)
    ("paper", "independent stage 0", "BatchNorm only", "before"),
    ("budget", "independent stage 0 (`joint.steps=0`)", ADAPTERS, "independent"),
    ("budget", "joint v1 + private nodes", "BatchNorm only", "v1_bn"),
    ("budget", "joint v1 + private nodes", ADAPTERS, "v1"),
    ("budget", "joint 600 + private nodes", ADAPTERS, "joint600"),
    (
        "paper (`stage1.objective=paper`)",
        "joint (uniform random trees) + private nodes",
        ADAPTERS,
        "paper",
    ),
    ("budget", "joint (uniform random trees) + private nodes", ADAPTERS, "uniform"),
    (
        "budget, stage 1 on the joint weights (`stage1.private=false`)",
        BRANCH,
        ADAPTERS,
        "joint_weights",
    ),
    ("budget (earlier code)", BRANCH, f"{ADAPTERS}, no flips (`stage2.hflip=false`)", "no_flips"),
    (
        "budget (earlier code)",
        BRANCH,
        f"{ADAPTERS}, flips, no task floor (`stage2.task_floor=0`)",
        "no_floor",
    ),
    ("budget (earlier code)", BRANCH, f"{ADAPTERS}, flips", "earlier"),
    ("budget", BRANCH, f"{ADAPTERS}, flips (default, from scratch)", "default"),
]


@renderer("search_ablation", "baselines_default_cpu.json", *ABLATION_FILES.values())
def search_ablation(baselines: dict, *qualities: dict) -> list[str]:
    by_key = dict(zip(ABLATION_FILES, qualities, strict=True))
    header = ["stage 1 objective", "streams the trees run on", "stage 2"]
    header += ["delta_m % at 0.5 / 0.75 / 1", "HV at 0.5 / 0.75 / 1"]
    rows = []
    for objective, streams, stage2, key in ABLATION_ROWS:
        if key == "before":
            cells = [baselines["methods"][f"dymu@{b}"] for b in BUDGETS]
        else:
            cells = [by_key[key]["budgets"][b] for b in BUDGETS]
        deltas = " / ".join(delta(c["delta_m"]) for c in cells)
        hvs = " / ".join(num(c["hypervolume"], 1) for c in cells)
        rows.append([objective, streams, stage2, deltas, hvs])
    return table(header, rows)


NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}


@renderer("search_quick", "search_quick.json", source_line=False)
def search_quick(quick: dict) -> list[str]:
    tasks = len(next(iter(quick["report"]["controllability"].values())))
    trees = {float(k): v for k, v in quick["one_hot_distinct_trees"].items()}
    others = ", ".join(f"{trees[b]} at {b:g}" for b in (0.5, 1.0))
    text = (
        "`python benchmarks/search_quick.py` (`dymu search -c configs/quick.yaml` from an "
        "empty run directory and dataset cache, `benchmarks/results/search_quick.json`): "
        f"{num(quick['wall_s'], 1)} s on {quick['cpu_count']} CPU cores (stage 0 "
        f"{num(quick['stage0_s'], 1)} s, joint stage {num(quick['joint_s'], 1)} s, stage 1 "
        f"{num(quick['stage1_s'], 1)} s, stage 2 {num(quick['stage2_s'], 1)} s), and the "
        f"{NUMBER_WORDS.get(tasks, str(tasks))} one-hot preferences derive {trees[0.75]} "
        f"distinct trees at budget 0.75 ({others})."
    )
    return paragraph(text)


# ---------------------------------------------------------------- docs/baselines.md


@renderer("baselines_default", "baselines_default_cpu.json")
def baselines_default(baselines: dict) -> list[str]:
    header = ["method", "points", "hypervolume", "uniformity", "delta_m %", "FLOPs / anchor"]
    header += ["params (one model)", "params stored", "training s"]
    rows = []
    for m in baselines["methods"].values():
        uniformity = "-" if m["uniformity"] is None else num(m["uniformity"], 3)
        rows.append(
            [
                m["label"],
                str(m["points"]),
                num(m["hypervolume"], 4),
                uniformity,
                signed(m["delta_m"], 2),
                num(m["flops_fraction"], 3),
                thousands(m["params"]),
                thousands(m["params_stored"]),
                num(m["train_seconds"], 0),
            ]
        )
    return table(header, rows)


@renderer("baselines_ratios", "baselines_default_cpu.json")
def baselines_ratios(baselines: dict) -> list[str]:
    comparison = baselines["comparison"]
    rows = [
        [
            name,
            f"x{num(comparison[key]['hv_ratio'], 3)}",
            f"x{num(comparison[key]['time_ratio'], 2)}",
        ]
        for name, key in (("PHN-BN", "phn_bn"), ("PHN", "phn"))
    ]
    static = comparison["static"]
    hv, time = f"x{num(static['hv_ratio'], 3)}", f"x{num(static['time_ratio'], 3)}"
    subset = static_subset(baselines)
    if subset:
        models, sweep = subset
        seconds = baselines["methods"]["static"]["subset"]["train_seconds_sweep"]
        hv = f"at most {hv} (against {models} of the {sweep})"
        time = (
            f"{time} against the {models}; x{num(static['time_ratio_sweep'], 3)} against "
            f"all {sweep} ({thousands(seconds).replace(',', ' ')} s, extrapolated)"
        )
    rows.append(["static models", hv, time])
    return table(["", "hypervolume", "training time"], rows)


@renderer("transfer_pareto", "transfer_pareto.json")
def transfer_pareto(result: dict) -> list[str]:
    runs = result["runs"]
    history = {name: {h["epoch"]: h for h in runs[name]["history"]} for name in runs}
    last = max(history["independent"])
    header = ["epoch", "HV independent", "training s", "HV with transfer", "training s"]
    rows = []
    for epoch in (1, 2, 3, 4, last):
        cells = [str(epoch)]
        for name in ("independent", "transfer"):
            h = history[name][epoch]
            cells += [num(h["hv"], 4), num(h["elapsed_s"], 1)]
        rows.append(cells)
    return table(header, rows)


@renderer("multimnist_phn", "multimnist_phn.json")
def multimnist_phn(result: dict) -> list[str]:
    reference = re.search(r"reference point (\([^)]*\))", result["protocol"]["hypervolume"])
    if reference is None:
        raise ValueError("protocol.hypervolume names no reference point")
    rays = result["test_rays"]
    picks = (0, len(rays) // 2, len(rays) - 1)
    left = [f"{round(rays[i][0], 3):g}" for i in picks]
    header = ["method", f"HV, ref {reference.group(1)}", "train time", "ms / step"]
    header += [f"CE left / right at r_left = {left[0]}", f"at {left[1]}", f"at {left[2]}"]
    header += [f"accuracy left / right at {left[1]}"]
    rows = []
    for name, m in result["methods"].items():
        losses = [" / ".join(num(x, 3) for x in m["test_losses"][i]) for i in picks]
        accuracy = " / ".join(num(x, 3) for x in m["test_accuracy"][picks[1]])
        rows.append(
            [
                name,
                num(m["hypervolume"], 4),
                f"{num(m['train_s'], 0)} s",
                num(m["ms_per_step"], 0),
                *losses,
                accuracy,
            ]
        )
    return table(header, rows)


def _budget_label(run: dict, key: str) -> str:
    """A preference_control.py budget key, ``0.606 (cheapest)`` for the cheapest tree's."""
    cheapest = abs(float(key) - run["min_flops"]) < 1e-4  # keys are rounded (:g)
    return f"{float(key):.3f} (cheapest)" if cheapest else key


def _target_lines(prefix: str, checks: dict) -> list[str]:
    """``<prefix>: k of n targets met; missed: ...; not measured: ...`` and a blank line."""
    missed = [k for k, c in checks.items() if c["met"] is False]
    unmeasured = [k for k, c in checks.items() if c["met"] is None]
    met = sum(c["met"] is True for c in checks.values())
    text = f"{prefix}: {met} of {len(checks)} targets met"
    text += f"; missed: {', '.join(missed)}" if missed else ""
    text += f"; not measured: {', '.join(unmeasured)}" if unmeasured else ""
    return [*paragraph(text + "."), ""]


def _control_rows(name: str, result: dict) -> list[list[str]]:
    """One row per (seed, budget) of a preference_control.py result."""
    rows = []
    for run in result["runs"]:
        for key, b in run["budgets"].items():
            gains = b["corner_gain"]["tasks"]
            label = _budget_label(run, key)
            rows.append(
                [
                    name,
                    str(run["seed"]),
                    label,
                    str(b["distinct_trees"]),
                    signed(b["delta_m"], 2),
                    _spearmans(b["spearman"]),
                    " / ".join(signed(g["vs_others"], 2) for g in gains.values()),
                    " / ".join(signed(g["gain"], 2) for g in gains.values()),
                ]
            )
    return rows


@renderer(
    "preference_control_two_task",
    "preference_control_multimnist_cpu.json",
    "preference_control_multifashion_cpu.json",
)
def preference_control_two_task(mnist: dict, fashion: dict) -> list[str]:
    tasks = " / ".join(next(iter(mnist["runs"][0]["budgets"].values()))["spearman"])
    header = ["config", "seed", "budget", "trees / 20", "delta_m %"]
    header += [f"Spearman: {tasks}", "own corner - other corner, points", "own corner - uniform"]
    rows = _control_rows("MultiMNIST", mnist) + _control_rows("MultiFashion", fashion)
    lines = [*table(header, rows), ""]
    for name, result in (("MultiMNIST", mnist), ("MultiFashion", fashion)):
        for run in result["runs"]:
            hv = run["budgets"].get("0.75", {}).get("hv_shared_reference")
            if hv:
                labels = run["budgets"]["0.75"]["baseline_labels"]
                others = ", ".join(f"{labels[m]} {num(v, 2)}" for m, v in hv.items() if m != "dymu")
                text = (
                    f"{name}, seed {run['seed']}, budget 0.75, hypervolume on the baselines "
                    f"report's reference point (`dymu baselines`, 2 epochs each): DYMU "
                    f"{num(hv['dymu'], 2)}; {others}."
                )
                span = run.get("static_span")
                if span:
                    text += " The static models' own lever, each task's metric under the model "
                    text += "with the most weight on it minus under the one with the least: "
                    text += "; ".join(
                        f"{t} {num(v['at_most'], 2)} at {num(v['most_weight'], 2)} - "
                        f"{num(v['at_least'], 2)} at {num(v['least_weight'], 2)} = "
                        f"{signed(v['gap'], 2)}"
                        for t, v in span.items()
                    )
                    text += "."
                lines += [*paragraph(text), ""]
        for seed, checks in result["targets"].items():
            lines += _target_lines(f"{name}, {seed}", checks)
    return lines[:-1]  # no blank line before the source note's own


@renderer(
    "two_task_hypervolume",
    "preference_control_multimnist_cpu.json",
    "preference_control_multifashion_cpu.json",
)
def two_task_hypervolume(mnist: dict, fashion: dict) -> list[str]:
    """DYMU's hypervolume at 0.75 against the baselines of the same anchor, per run."""
    rows, subset = [], None
    for name, result in (("MultiMNIST", mnist), ("MultiFashion", fashion)):
        for run in result["runs"]:
            b = run["budgets"].get("0.75", {})
            hv = b.get("hv_shared_reference")
            if not hv:
                continue
            subset = re.search(r"\((\d+ of .*)\)", b["baseline_labels"]["static"])
            dm = b["baseline_delta_m"]
            rows.append(
                [
                    f"{name} seed {run['seed']}",
                    f"{num(b['flops_mean'], 3)}",
                    num(hv["dymu"], 3),
                    num(hv["static"], 3),
                    num(hv["dymu"] / hv["static"], 3),
                    num(hv["phn_bn"], 3),
                    f"{signed(b['delta_m'], 2)} / {signed(dm['static'], 2)} / "
                    f"{signed(dm['phn_bn'], 2)}",
                ]
            )
    models = f"static models ({subset.group(1)})" if subset else "static models"
    header = ["run", "DYMU FLOPs at 0.75", "DYMU HV", models, "DYMU / static", "PHN-BN"]
    header += ["delta_m %: DYMU / static / PHN-BN"]
    return table(header, rows)


CANDIDATES = {
    ("MultiMNIST", 0): "recipe_candidates_multimnist_seed0_cpu.json",
    ("MultiMNIST", 1): "recipe_candidates_multimnist_seed1_cpu.json",
    ("MultiFashion", 0): "recipe_candidates_multifashion_seed0_cpu.json",
    ("MultiFashion", 1): "recipe_candidates_multifashion_seed1_cpu.json",
}


@renderer("recipe_candidates", *CANDIDATES.values())
def recipe_candidates(*results: dict) -> list[str]:
    """The recipe beside the longer stages it could spend time on, at budget 0.75: validation
    figures (the choice) and test figures (the report), per dataset and seed."""
    rows = []
    for (name, seed), result in zip(CANDIDATES, results, strict=True):
        row = result["validation_choice"]["0.75"]
        for run, v in row.items():
            if run == "reference_point":
                continue
            setting = ", ".join(f"`{k}: {x}`" for k, x in v["setting"].items()) or "the recipe"
            rows.append(
                [
                    f"{name} {seed}",
                    f"{run}: {setting}",
                    num(v["hypervolume"], 4),
                    f"{signed(v['delta_m'], 2)} / {signed(v['test_delta_m'], 2)}",
                    f"{_spearmans(v['spearman'])} ; {_spearmans(v['test_spearman'])}",
                    " / ".join(signed(x, 2) for x in v["vs_others"].values())
                    + " ; "
                    + " / ".join(signed(x, 2) for x in v["test_vs_others"].values()),
                ]
            )
    header = ["config, seed", "run: how it differs", "HV, val (one reference point per row group)"]
    header += ["delta_m %: val / test", "Spearman left / right: val ; test"]
    header += ["own corner - other corner, points: val ; test"]
    return table(header, rows)


@renderer(
    "adaptation_ceiling",
    "adaptation_ceiling_multimnist_cpu.json",
    "adaptation_ceiling_multifashion_cpu.json",
)
def adaptation_ceiling(*results: dict) -> list[str]:
    """What an adaptation trained for each corner alone moves, beside the hypernetwork."""
    rows = []
    for name, result in zip(("MultiMNIST", "MultiFashion"), results, strict=True):
        gap = result["corner_gap"]
        within = [
            " / ".join(signed(v, 2) for v in row["ceiling"].values()) for row in result["trees"]
        ]
        rows.append(
            [
                f"{name} ({result['run']}, budget {num(result['budget'], 2)})",
                " ; ".join(within),
                " / ".join(signed(g["trained_for_corner"], 2) for g in gap.values()),
                " / ".join(signed(g["hypernet_at_corner"], 2) for g in gap.values()),
            ]
        )
    tasks = " / ".join(results[0]["corner_gap"])
    header = ["config", f"within each corner tree, trained for each corner: {tasks}"]
    header += ["own corner - other corner, trained for each corner", "the weight hypernetwork"]
    return table(header, rows)


@renderer("width_space", "width_space_default_cpu.json", "width_space_multimnist_cpu.json")
def width_space(*results: dict) -> list[str]:
    """How far widths reach, what greedy widening spends, and price / export checks."""
    budgets = list(results[0]["greedy_spend"])
    rows = []
    for name, result in zip(("default", "MultiMNIST"), results, strict=True):
        spend = result["greedy_spend"]
        checks = result["configurations"]
        rows.append(
            [
                name,
                num(result["cheapest_tree_full_width"], 3),
                num(result["cheapest_configuration"], 3),
                " / ".join(num(spend[b]["best"], 3) for b in budgets),
                f"{sum(c['price'] == c['fvcore'] for c in checks)} / {len(checks)}",
                f"{result['onnx_max_abs_diff']:.1e}",
            ]
        )
    header = ["config", "cheapest tree, full width", "cheapest configuration"]
    header += [f"greedy widening reaches, at budgets {' / '.join(budgets)}"]
    header += ["price = fvcore count", "ONNX Runtime vs PyTorch, max abs"]
    return table(header, rows)


WEIGHT_SETS = ("joint with widths", "joint, trees only (the run's)", "stage 0")
"""The weight sets ``benchmarks/width_joint.py`` (commit 0ba00ec, the first width design)
measured each configuration on."""

SLIM_SETS = ("width stage", "joint, sliced (the run's)")
"""The weight sets ``benchmarks/width_stage.py`` measures each configuration on."""


@renderer("width_stage", "width_stage_default_cpu.json", "width_stage_multimnist_cpu.json")
def width_stage(*results: dict) -> list[str]:
    """delta_m of the cheapest and the no-sharing tree at each width: the width stage's copy
    beside the run's joint weights sliced."""
    return _width_table(results, SLIM_SETS)


@renderer("width_joint", "width_joint_default_cpu.json", "width_joint_multimnist_cpu.json")
def width_joint(*results: dict) -> list[str]:
    """delta_m of the cheapest and the no-sharing tree at each width, per weight set."""
    return _width_table(results, WEIGHT_SETS)


def _width_table(results: tuple[dict, ...], sets: tuple[str, ...]) -> list[str]:
    """One row per (config, configuration): its FLOPs and delta_m on each weight set."""
    rows = []
    for name, result in zip(("default", "MultiMNIST"), results, strict=True):
        for row in result["configurations"]:
            cells = [signed(row[w]["delta_m"], 2) for w in sets]
            label = f"{row['tree']} tree, width {num(row['width'], 2)}"
            rows.append([name, label, num(row["flops_fraction"], 3), *cells])
    header = ["config", "configuration", "FLOPs"]
    header += [f"delta_m % (val): {w}" for w in sets]
    return table(header, rows)


@renderer("width_control", "width_control_multimnist_cpu.json")
def width_control(result: dict) -> list[str]:
    """Corner gaps and Spearmans with widths beside the run's full-width trees."""
    rows = []
    for budget, sides in result["budgets"].items():
        for side, summary in sides.items():
            tasks = list(summary["val"]["corner_gap"])
            cells = []
            for split in ("val", "test"):
                gaps = summary[split]["corner_gap"]
                cells.append(" / ".join(signed(gaps[t], 2) for t in tasks))
                rho = summary[split]["spearman"]
                cells.append(
                    " / ".join("-" if rho[t] is None else signed(rho[t], 2) for t in tasks)
                )
            flops = summary["flops_fraction"]
            rows.append(
                [budget, side, str(summary["configurations"]), num(flops["mean"], 3), *cells]
            )
    first = next(iter(next(iter(result["budgets"].values())).values()))
    names = " / ".join(first["val"]["corner_gap"])
    header = ["budget", "configurations from", "distinct", "mean FLOPs"]
    header += [f"{what}, {split}: {names}" for split in ("val", "test") for what in
               ("corner gap", "Spearman")]  # fmt: skip
    return table(header, rows)


WIDTH_SEARCHES = {
    "default": "search_widths_default_cpu.json",
    "MultiMNIST": "search_widths_multimnist_cpu.json",
}
"""Searches with widths summarised by search_quality.py, by config."""


@renderer("search_widths", *WIDTH_SEARCHES.values())
def search_widths(*results: dict) -> list[str]:
    """Per budget: what runs, FLOPs, delta_m on both splits, and control on validation."""
    rows = []
    for name, result in zip(WIDTH_SEARCHES, results, strict=True):
        cheapest = result["widths"]["cheapest_tree"]
        for key, row in result["budgets"].items():
            val = row["validation"]
            tasks = list(val["controllability_loss"])
            gains = val["corner_gain"]["tasks"]
            rows.append(
                [
                    f"{name} ({' / '.join(tasks)})",
                    budget_label(key) if len(key) < 6 else f"{float(key):.3f} (cheapest)",
                    "widths" if float(key) < cheapest else "tree",
                    num(row["flops_mean"], 3),
                    num(row["budget_adherence"], 2),
                    str(row["distinct_trees"]),
                    f"{delta(row['delta_m'])} ({delta(val['delta_m'])})",
                    " / ".join(signed(val["controllability_loss"][t], 2) for t in tasks),
                    " / ".join(signed(round(gains[t]["vs_others"], 3) + 0.0, 3) for t in tasks),
                ]
            )
    header = ["config", "budget", "runs", "mean FLOPs", "adherence", "configurations",
              "delta_m % test (val)", "Spearman on losses, val", "corner gap, val"]  # fmt: skip
    return table(header, rows)


@renderer("preference_trunk_choice", "preference_control_multimnist_cpu.json")
def preference_trunk_choice(mnist: dict) -> list[str]:
    return _choice_table(mnist["validation_choice"])


@renderer("preference_choice_multifashion", "preference_control_multifashion_cpu.json")
def preference_choice_multifashion(fashion: dict) -> list[str]:
    return _choice_table(fashion["validation_choice"])


def _choice_table(choice: dict) -> list[str]:
    """A two-task run beside the runs it was chosen against, on validation, per budget below 1
    (a budget that derives the same trees as one shown is named, not repeated)."""
    rows, shown, same = [], [], []
    for key, row in choice.items():
        if float(key) >= 1:
            continue
        if any(choice[k] == row for k in shown):  # a budget that derives the same trees
            same.append(key)
            continue
        shown.append(key)
        for name, v in row.items():
            if name == "reference_point":
                continue
            setting = ", ".join(f"`{k}: {x}`" for k, x in v["setting"].items()) or "the recipe"
            rows.append(
                [
                    f"{float(key):.3f}" if key != "0.75" else key,
                    f"{name}: {setting}",
                    str(v["distinct_trees"]),
                    num(v["hypervolume"], 4),
                    signed(v["delta_m"], 2),
                    _spearmans(v["spearman"]),
                    " / ".join(signed(x, 2) for x in v["vs_others"].values()),
                ]
            )
    header = ["budget", "run: how it differs", "trees / 20", "HV (one reference point)"]
    header += ["delta_m %", "Spearman", "own corner - other corner, points"]
    lines = table(header, rows)
    if same:
        budgets = " and ".join(same)
        lines += ["", f"Budget {budgets} gives the same figures for every run (the same trees)."]
    return lines


@renderer("ablation_valtest", "ablation_validation_default_cpu.json")
def ablation_valtest(result: dict) -> list[str]:
    """The deciding comparisons of the ablation, run again on one anchor and decided on
    validation; test's delta_m beside, as reported."""
    return _validation_choice(result)


@renderer("ablation_valtest_joint", "ablation_validation_joint_default_cpu.json")
def ablation_valtest_joint(result: dict) -> list[str]:
    """The joint-stage rows of the ablation, run again and decided on validation."""
    return _validation_choice(result)


@renderer("ablation_valtest_joint_steps", "ablation_validation_joint_steps_default_cpu.json")
def ablation_valtest_joint_steps(result: dict) -> list[str]:
    """The joint stage's length, run again and decided on validation (a run of its own:
    one reference point with runs this far apart would flatten the close comparisons)."""
    return _validation_choice(result)


def _validation_choice(result: dict) -> list[str]:
    """``preference_control.py --against``'s comparison: per budget, each run's setting,
    trees, validation hypervolume, delta_m on both splits and validation Spearmans."""
    choice, rows = result["validation_choice"], []
    for key, row in choice.items():
        for name, v in row.items():
            if name == "reference_point":
                continue
            setting = ", ".join(f"`{k}={x}`" for k, x in v["setting"].items()) or "the default"
            rows.append(
                [
                    budget_label(key) if key in BUDGETS else f"{float(key):.3f} (cheapest)",
                    f"{name}: {setting}",
                    str(v["distinct_trees"]),
                    num(v["hypervolume"] * 1e4, 3),
                    f"{signed(v['delta_m'], 2)} / {signed(v['test_delta_m'], 2)}",
                    _spearmans(v["spearman"]),
                ]
            )
    some = next(v for row in choice.values() for n, v in row.items() if n != "reference_point")
    tasks = " / ".join(some["spearman"])
    header = ["budget", "run: how it differs", "trees / 20", "HV x 1e4, val (one reference point)"]
    header += ["delta_m %: val / test", f"controllability, val: {tasks}"]
    return table(header, rows)


def _joint_sweep(sweep: dict) -> list[str]:
    first = sweep["settings"][0]
    trunks = list(first["trunks"])
    tasks = list(first["trunks"][trunks[0]]["val_losses"])
    header = ["setting"]
    owner = {t: f"{t}'" if t.endswith("s") else f"{t}'s" for t in trunks}  # edges' trunk
    header += [f"{owner[t]} trunk: {' / '.join(tasks)} loss" for t in trunks]
    header += ["weighted loss: mean / best trunk", "joint stage s"]
    rows = []
    for s in sweep["settings"]:
        row = [" ".join(f"`{o}`" for o in s["overrides"]) or "the run's config"]
        for t in trunks:
            row.append(" / ".join(num(v, 4) for v in s["trunks"][t]["val_losses"].values()))
        row += [f"{num(s['mean_weighted'], 3)} / {num(s['best_weighted'], 3)}"]
        row.append(num(s["seconds"], 0))
        rows.append(row)
    return table(header, rows)


@renderer("joint_sweep_multimnist", "joint_sweep_multimnist_cpu.json")
def joint_sweep_multimnist(sweep: dict) -> list[str]:
    return _joint_sweep(sweep)


@renderer("joint_sweep_multimnist_steps", "joint_sweep_multimnist_steps_cpu.json")
def joint_sweep_multimnist_steps(sweep: dict) -> list[str]:
    return _joint_sweep(sweep)


@renderer("joint_sweep_default", "joint_sweep_default_cpu.json")
def joint_sweep_default(sweep: dict) -> list[str]:
    return _joint_sweep(sweep)


@renderer("joint_step", "joint_step_default_cpu.json", "joint_step_multimnist_cpu.json")
def joint_step(default: dict, mnist: dict) -> list[str]:
    header = ["config", "trees per step", "batch", "shared nodes, ms/step"]
    header += ["each tree on its own, ms/step", "speed-up"]
    rows = []
    for name, r in (("default", default), ("MultiMNIST", mnist)):
        trees = 1 + r["joint"]["random_trees"] + (0 if r["joint"]["private_nodes"] else 1)
        ms = r["ms_per_step"]
        rows.append(
            [
                name,
                str(trees),
                str(r["batch_size"]),
                num(ms["shared"], 1),
                num(ms["separate"], 1),
                f"x{num(r['speedup'], 2)}",
            ]
        )
    return table(header, rows)


@renderer("preference_control_default", "preference_control_default_cpu.json")
def preference_control_default(result: dict) -> list[str]:
    tasks = list(next(iter(result["runs"][0]["budgets"].values()))["spearman"])
    choice = result.get("validation_choice", {})
    first, *others = next(iter(choice.values()), {"reference_point": None})
    before = [name for name in others if name != "reference_point"]
    header = ["seed", "budget", "FLOPs", "trees / 20", "delta_m % (test)"]
    header += [f"validation delta_m %: this version / {name}" for name in before[:1]]
    header += [f"Spearman: {' / '.join(tasks)}", f"corner loss gain: {' / '.join(tasks)}"]
    rows = []
    for run in result["runs"]:
        for key, b in run["budgets"].items():
            gains = b["corner_gain"]["tasks"]
            label = _budget_label(run, key)
            row = [str(run["seed"]), label, num(b["flops_mean"], 3), str(b["distinct_trees"])]
            row.append(delta(b["delta_m"]))
            if before:  # the comparison is of the first run (its anchor) only
                compared = key in choice and run is result["runs"][0]
                row.append(
                    f"{delta(choice[key][first]['delta_m'])} / "
                    f"{delta(choice[key][before[0]]['delta_m'])}"
                    if compared
                    else "-"
                )
            row.append(_spearmans(b["spearman"]))
            row.append(" / ".join(f"{gains[t]['loss_gain']:+.1e}" for t in tasks))
            rows.append(row)
    lines = [*table(header, rows), ""]
    for seed, checks in result["targets"].items():
        lines += _target_lines(seed, checks)
    return lines[:-1]


# ---------------------------------------------------------------- docs/deploy.md


@renderer("bundle_switch", "bundle_switch_multimnist_cpu.json")
def bundle_switch(result: dict) -> list[str]:
    header = ["models (preferences)", "trees", "bundle MB", "one model per tree, MB"]
    header += ["switch, first load, ms", "switch, loaded, ms", "latency batch 1, ms"]
    header += ["largest difference from the report's evaluation"]
    lat = result["latency_b1_ms"]
    row = [
        str(result["preferences"]),
        str(result["trees"]),
        num(result["bundle_bytes"] / 1e6, 2),
        num(result["bundle_bytes_one_model_per_tree"] / 1e6, 2),
        num(result["switch_cold_ms"]["median"], 1),
        num(result["switch_warm_ms"]["median"], 3),
        f"{num(lat['median'], 3)} ({value_range(lat['min'], lat['max'], 3)})",
        f"{result['parity_evaluated_max']:.1e}",
    ]
    return table(header, [row])


BACKENDS = {
    "onnxruntime": "ONNX Runtime",
    "compiled": "`torch.compile`",
    "eager": "PyTorch eager",
    "aoti": "AOTInductor",
    "aoti_cudagraph": "AOTInductor + CUDA graphs",
    "tensorrt": "TensorRT",
}


@renderer("bench_default", "bench_default_cpu.json")
def bench_default(bench: dict) -> list[str]:
    order = list(BACKENDS)
    rows_in = sorted(bench["rows"], key=lambda r: (r["budget"], order.index(r["backend"])))
    header = ["budget", "tree FLOPs (of anchor)", "backend", "batch 1 p50"]
    header += [f"batch {bench['batch']} throughput", "peak RSS"]
    rows = [
        [
            num(r["budget"], 1),
            num(r["flops_fraction"], 3),
            BACKENDS[r["backend"]],
            f"{num(r['latency_ms_p50'], 2)} ms",
            f"{num(r['throughput_img_s'], 0)} img/s",
            f"{num(r['peak_rss_mb'], 0)} MB",
        ]
        for r in rows_in
    ]
    ort = {r["budget"]: r for r in rows_in if r["backend"] == "onnxruntime"}
    small, large = ort[min(ort)], ort[max(ort)]
    text = (
        f"With ONNX Runtime at batch {bench['batch']} the {num(small['budget'], 1)} tree takes "
        f"{num(large['throughput_img_s'] / small['throughput_img_s'], 2)}x the time of the "
        f"{num(large['budget'], 1)} tree (the anchor tree), close to their FLOPs ratio of "
        f"{num(small['flops_fraction'] / large['flops_fraction'], 3)}; at batch 1, "
        f"{num(small['latency_ms_p50'] / large['latency_ms_p50'], 2)}x."
    )
    return [*table(header, rows), "", *paragraph(text)]


LATENCY_BACKENDS = {
    "onnxruntime": "ONNX Runtime",
    "eager": "eager PyTorch",
    "compiled": "`torch.compile`",
    "aoti": "AOTInductor",
    "tensorrt": "TensorRT",
}


def _backend_version(table_: dict) -> str:
    version = re.search(r"\d+\.\d+", table_["backend_version"])
    name = LATENCY_BACKENDS.get(table_["backend"], table_["backend"])
    return f"{name} {version.group(0)}" if version else name


@renderer("latency_b8", "latency_onnxruntime_b8_cpu.json", "latency_eager_b8_cpu.json")
def latency_b8(*tables: dict) -> list[str]:
    def counts(t: dict) -> tuple:
        kinds = t["validation"]["by_kind"]
        return t["fit"]["trees"], kinds["uniform"]["trees"], kinds["branching"]["trees"]

    fits = {counts(t) for t in tables}
    if len(fits) != 1:
        raise ValueError(f"the tables were fitted and checked on different counts: {fits}")
    fitted, uniform, branching = fits.pop()
    header = ["backend", "anchor tree", "fastest tree", "c"]
    header += [f"fit, {fitted} trees: median / worst error"]
    header += [f"check, {uniform} other uniform trees: median / worst"]
    header += [f"check, {branching} other branching trees: median / worst"]
    header += ["noise: median / worst spread"]
    rows = []
    for t in tables:
        fit, kinds, noise = t["fit"], t["validation"]["by_kind"], t["noise"]
        rows.append(
            [
                _backend_version(t),
                f"{num(t['reference']['anchor_ms'], 1)} ms",
                f"{num(t['reference']['cheapest_ms'], 1)} ms",
                f"{num(t['model']['const_ms'], 1)} ms",
                f"{pct(fit['median_abs_rel_err'])} / {pct(fit['max_abs_rel_err'])}",
                *(
                    f"{pct(kinds[k]['median_abs_rel_err'])} / {pct(kinds[k]['max_abs_rel_err'])}"
                    for k in ("uniform", "branching")
                ),
                f"{pct(noise['median_spread'])} / {pct(noise['max_spread'])}",
            ]
        )
    return table(header, rows)


@renderer(
    "latency_widths",
    "latency_widths_onnxruntime_b8_cpu.json",
    "latency_widths_onnxruntime_b8_r15_cpu.json",
)
def latency_widths(*tables: dict) -> list[str]:
    """Tables of a run with widths: how well the width terms predict configurations."""
    header = ["rounds", "anchor tree", "fastest tree / configuration", "fit: median / worst"]
    header += ["check, all: median / worst", "uniform", "branching", "noise: median / worst"]
    rows = []
    for t in tables:
        fit, val, noise, ref = t["fit"], t["validation"], t["noise"], t["reference"]

        def err(s: dict) -> str:
            return f"{pct(s['median_abs_rel_err'])} / {pct(s['max_abs_rel_err'])}"

        rows.append(
            [
                str(t["protocol"]["rounds"]),
                f"{num(ref['anchor_ms'], 1)} ms",
                f"{num(ref['cheapest_ms'], 1)} / {num(ref['narrowest_ms'], 1)} ms",
                f"{err(fit)} ({fit['trees']} configurations)",
                f"{err(val)} ({val['trees']})",
                *(err(val["by_kind"][k]) for k in ("uniform", "branching")),
                f"{pct(noise['median_spread'])} / {pct(noise['max_spread'])}",
            ]
        )
    return table(header, rows)


# ---------------------------------------------------------------- docs/scale.md


@renderer("data_throughput", "data_throughput.json")
def data_throughput(result: dict) -> list[str]:
    synth, nyu = result["results"]["synthscenes"], result["results"]["nyuv2_npy"]
    header = ["data", "loader", "loader images/s", "step images/s", "loading share"]
    loader = synth["loader"]["workers=0"]
    flips = f"same, with stage 0's random flips ({num(synth['hflip']['ms_per_batch'], 1)} ms/batch)"
    rows = [
        [
            f"`synthscenes` {synth['size'][0]}x{synth['size'][1]}, default config, "
            f"batch {synth['batch']}",
            "in memory",
            f"{rate(loader['images_per_s'])} ({num(loader['ms_per_batch'], 1)} ms/batch)",
            f"{rate(synth['step']['images_per_s'])} "
            f"({thousands(synth['step']['ms_per_batch'])} ms/batch)",
            pct(synth["loader_share"]["share"]),
        ],
        [
            flips,
            "in memory",
            "",
            "",
            pct(synth["loader_and_hflip_share"]["share"]),
        ],
    ]
    for i, (workers, stats) in enumerate(nyu["loader"].items()):
        data = f"NYU-v2 `.npy` {nyu['size'][0]}x{nyu['size'][1]}, {nyu['train_images']} images"
        step = f"{rate(nyu['step']['images_per_s'])} (batch {nyu['step']['batch']})"
        rows.append(
            [
                f"{data}, batch {nyu['batch']}" if i == 0 else "same",
                f"`{workers}`",
                rate(stats["images_per_s"]),
                step if i == 0 else "",
                pct(nyu["loader_share"][workers]["share"]),
            ]
        )
    return table(header, rows)


@renderer("paper_scale", "paper_scale_cpu.json")
def paper_scale(result: dict) -> list[str]:
    stages = result["stages"]
    tree = stages["stage2"]["dymu"]["tree_flops_fraction_mean"]
    names = {
        "stage0": "0 (anchor)",
        "stage1": "1 (edge hnet)",
        "stage2": f"2 (weight hnet; trees at {num(tree, 2)} of the anchor on average)",
    }
    header = ["stage", "dymu images/s", "looped images/s", "speed-up"]
    header += ["dymu peak MiB", "looped peak MiB"]
    rows = [
        [
            names[key],
            num(s["dymu"]["images_per_s"], 3),
            num(s["looped"]["images_per_s"], 3),
            f"{num(s['speedup'], 2)}x",
            thousands(s["dymu"]["peak_memory_mib"]),
            thousands(s["looped"]["peak_memory_mib"]),
        ]
        for key, s in stages.items()
    ]
    return table(header, rows)


# ---------------------------------------------------------------- blocks in pages


@dataclass(frozen=True)
class Block:
    name: str
    start: int
    """Index of the start marker's line."""
    end: int
    """Index of the end marker's line."""


def find_blocks(lines: list[str], where: str) -> list[Block]:
    """The marked blocks of a page (its lines), in order; markers inside fenced code are
    text. Raises RenderError on an unknown name, a nested, unterminated or stray marker."""
    blocks: list[Block] = []
    opened: tuple[str, int] | None = None
    fenced = False
    for i, line in enumerate(lines):
        if FENCE.match(line):
            fenced = not fenced
        match = None if fenced else MARKER.match(line.rstrip("\n"))
        if match is None:
            continue
        closing, name = match.group(1) == "/", match.group(2)
        at = f"{where}:{i + 1}"
        if not NAME.fullmatch(name):
            raise RenderError(f"{at}: bad block name {name!r} (letters, digits, _ . -)")
        if closing:
            if opened is None or opened[0] != name:
                raise RenderError(f"{at}: <!-- /results:{name} --> has no start marker before it")
            blocks.append(Block(name, opened[1], i))
            opened = None
            continue
        if opened is not None:
            raise RenderError(
                f"{at}: block {name!r} starts inside block {opened[0]!r} "
                f"(line {opened[1] + 1}), which has no end marker before it"
            )
        if name not in RENDERERS:
            raise RenderError(f"{at}: unknown block {name!r}; known: {', '.join(RENDERERS)}")
        opened = (name, i)
    if opened is not None:
        name, start = opened
        raise RenderError(
            f"{where}:{start + 1}: <!-- results:{name} --> has no end marker "
            f"<!-- /results:{name} -->"
        )
    return blocks


def load(source: str, block: str) -> dict:
    path = RESULTS / source
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RenderError(f"block {block}: missing results file {_shown(path)}") from None
    except OSError as exc:
        raise RenderError(f"block {block}: cannot read {_shown(path)}: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RenderError(
            f"block {block}: {_shown(path)} is not valid JSON (line {exc.lineno}: {exc.msg})"
        ) from None


def render(name: str) -> list[str]:
    """The lines of block ``name`` (without its markers)."""
    r = RENDERERS[name]
    data = [load(source, name) for source in r.sources]
    try:
        lines = r.fn(*data)
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise RenderError(
            f"block {name}: cannot render from {', '.join(r.sources)} ({type(exc).__name__}: {exc})"
        ) from None
    return [*lines, "", *source_note(r.sources)] if r.source_line else lines


@dataclass
class PageResult:
    path: Path
    text: str
    """The page as it would be rendered."""
    diffs: list[str]
    """One unified diff per block that differs from what it renders."""
    names: list[str]


def render_page(path: Path) -> PageResult:
    where = _shown(path)
    try:
        old = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RenderError(f"cannot read {where}: {exc.strerror or exc}") from None
    lines = old.splitlines(keepends=True)
    out, diffs, last = [], [], 0
    blocks = find_blocks(lines, where)
    for block in blocks:
        committed = lines[block.start + 1 : block.end]
        rendered = [line + "\n" for line in render(block.name)]
        out += lines[last : block.start + 1] + rendered
        last = block.end
        if committed != rendered:
            diff = difflib.unified_diff(
                committed,
                rendered,
                fromfile=f"{where} [{block.name}] (committed)",
                tofile=f"{where} [{block.name}] (rendered)",
            )
            diffs.append("".join(diff))
    out += lines[last:]
    return PageResult(path, "".join(out), diffs, [b.name for b in blocks])


def run(pages: list[Path], *, check: bool, all_pages: bool) -> int:
    results = [render_page(p) for p in pages]  # everything renders before anything is written
    status = 0
    for r in results:
        for diff in r.diffs:
            if check:
                print(diff, end="" if diff.endswith("\n") else "\n")
        if r.diffs and not check:
            write_text(r.path, r.text)
            print(f"{_shown(r.path)}: re-rendered {len(r.diffs)} block(s)")
    differing = sum(len(r.diffs) for r in results)
    blocks = sum(len(r.names) for r in results)
    if check and differing:
        print(
            f"{differing} of {blocks} block(s) differ from benchmarks/results; "
            "run python benchmarks/render_docs.py to re-render them"
        )
        status = 1
    elif not differing:
        print(f"{blocks} block(s) up to date")
    if all_pages:
        used = {n for r in results for n in r.names}
        for name in RENDERERS:
            if name not in used:
                print(f"block {name} has a renderer but no markers in README.md or docs/*.md")
                status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Render the results tables of README.md and docs/*.md from "
        "benchmarks/results/*.json (the blocks between <!-- results:NAME --> markers)."
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 and print a diff for every block that differs",
    )
    parser.add_argument(
        "pages", nargs="*", type=Path, help="pages to render (default: README.md, docs/*.md)"
    )
    args = parser.parse_args(argv)
    try:
        return run(args.pages or default_pages(), check=args.check, all_pages=not args.pages)
    except RenderError as exc:
        print(f"render_docs: {exc}", file=sys.stderr)
        return 2
    except (OSError, DymuError) as exc:
        print(f"render_docs: cannot write: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
