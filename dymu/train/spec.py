"""One resolved spec per stage: what each stage of ``dymu search`` consumes, hashed.

A stage's artifact is valid exactly while everything it was made from is unchanged. Rather
than a hand-kept chain of config-section hashes, :func:`resolve_specs` writes down, once,
what each stage consumes: its own settings, the seed and precision, which weights its
trees' nodes run (the upstream artifacts, by their spec hashes), and how the tasks' losses
are scaled. The stage's artifact hash is the hash of that spec, and its record holds the
spec itself, so a reader can see what an artifact was made from.

Settings a stage does not use are left out of its spec, so changing them reuses the
artifact: the joint settings when ``joint.steps`` is 0, the towers when their weight is 0,
the space's widths for every stage but the width stage (which runs only when there are
widths to train), where the dataset cache lives, and every
later stage's settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from dymu.config import Config
from dymu.hypernet.weight import ADAPTATION

LOSS_SCALES = "w_i = 1 / (the stage-0 anchor's mean loss on task i over the whole validation split)"
"""How every stage after stage 0 scales the task losses (METHOD.md 1.5 [choice])."""


@dataclass(frozen=True)
class StageSpec:
    """What one stage consumes; ``hash`` names its artifact."""

    stage: str
    inputs: dict[str, Any]

    @property
    def hash(self) -> str:
        """12 hex digits of the SHA-256 of the spec's canonical JSON."""
        blob = json.dumps({"stage": self.stage, **self.inputs}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, **self.inputs}


def _section(cfg: Config, name: str, *drop: str) -> dict[str, Any]:
    """A config section as a plain dict, without the keys in ``drop``."""
    values = dataclasses.asdict(getattr(cfg, name))
    for key in drop:
        values.pop(key, None)
    return values


def _slim_section(cfg: Config) -> dict[str, Any]:
    """The width stage's keys: ``fill`` acts only after training, and so does ``strength``
    unless the stage samples widths by the preference rule."""
    drop = ("fill",) if cfg.slim.sample == "preference" else ("strength", "fill")
    return _section(cfg, "slim", *drop)


def _stage0(cfg: Config) -> StageSpec:
    stage0 = _section(cfg, "stage0")
    if stage0["towers"]["gamma"] == 0:  # towers that are off change nothing
        del stage0["towers"]
    return StageSpec(
        "stage0",
        {
            "data": _section(cfg, "data", "cache_dir"),  # where the cache lives: no input
            "model": _section(cfg, "model", "widths"),  # stage 0 trains full widths
            "stage0": stage0,
            "seed": cfg.run.seed,
            "precision": cfg.run.precision,
        },
    )


def resolve_specs(cfg: Config) -> dict[str, StageSpec]:
    """The spec of every stage ``cfg`` runs, in order (no ``joint`` when its steps are 0,
    no ``slim`` while ``model.widths`` is full width only).

    The stages after the joint stage name the weights their trees run: ``tuned`` (the joint
    stage's, else stage 0's) and, under the private-node rule, ``private`` (stage 0's).
    Stages 1 and 2 train full-width trees, which never run the width stage's weights: their
    specs do not depend on the widths, so adding widths to a run trains the width stage
    alone, and every budget a full-width tree fits keeps its tree and its figures.
    """
    specs = {"stage0": _stage0(cfg)}
    h0 = specs["stage0"].hash
    specs["affinity"] = StageSpec(
        "affinity", {"anchor": h0, "affinity": _section(cfg, "affinity"), "seed": cfg.run.seed}
    )
    # What every training stage after stage 0 consumes besides its own settings.
    trained = {
        "workers": cfg.stage0.workers,
        "loss_scales": LOSS_SCALES,
        "seed": cfg.run.seed,
        "precision": cfg.run.precision,
    }
    streams: dict[str, Any] = {"tuned": f"stage0 {h0}", "private": None}
    if cfg.joint.steps > 0:
        specs["joint"] = StageSpec(
            "joint", {"anchor": h0, "joint": _section(cfg, "joint"), **trained}
        )
        streams["tuned"] = f"joint {specs['joint'].hash}"
        if cfg.joint.private_nodes:
            streams["private"] = f"stage0 {h0}"
    if cfg.model.widths != [1.0]:  # a slimmable space; full widths leave specs as they were
        specs["slim"] = StageSpec(
            "slim",
            {
                "streams": dict(streams),
                "joint": _section(cfg, "joint"),  # its optimizer, batch, trunk and flips
                "slim": _slim_section(cfg),
                "widths": list(cfg.model.widths),
                **trained,
            },
        )
    specs["stage1"] = StageSpec(
        "stage1",
        {
            "streams": streams,
            "affinity": specs["affinity"].hash,
            "stage1": _section(cfg, "stage1"),
            **trained,
        },
    )
    specs["stage2"] = StageSpec(
        "stage2",
        {
            "streams": streams,
            "edge_hnet": specs["stage1"].hash,
            "stage2": _section(cfg, "stage2"),
            "adaptation": ADAPTATION,
            **trained,
        },
    )
    return specs
