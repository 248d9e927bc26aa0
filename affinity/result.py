"""The affinity record written to ``affinity.json`` in the run directory.

The file is the hand-off between the affinity step and stage 1 (METHOD.md 1.5 weights
the active loss with A): a plain JSON object that a person can read, with the task names
that give the rows and columns their meaning::

    {"tasks": ["semseg", "depth", ...], "method": "rsa",
     "mean": [[...N...], ...N rows],
     "per_layer": [[[...]...], ...L matrices],
     "meta": {"images": 200, ...}}

``mean[i][j]`` is the affinity of task j seen from task i (row = reference task); for
"rsa" and "lookahead" it is not symmetric (see :mod:`dymu.affinity.rsa` and
:func:`dymu.affinity.gradients.lookahead_affinity`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dymu.errors import UserError
from dymu.io import write_json

__all__ = ["METHODS", "AffinityResult", "load"]

METHODS = ("rsa", "grad_cosine", "lookahead")
"""Estimator names, as in the config's ``affinity.method``."""

_KEYS = ("tasks", "method", "mean", "per_layer", "meta")


def _as_lists(x: Any) -> Any:
    """Tensors and numpy arrays become nested lists of Python floats; lists pass through."""
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).tolist()
    if hasattr(x, "tolist") and not isinstance(x, list):
        return x.tolist()
    return x


def _check_matrix(m: Any, n: int, what: str, where: str) -> list[list[float]]:
    """``m`` as an N x N list of finite floats, or a UserError saying what is wrong."""
    if not isinstance(m, list) or len(m) != n:
        raise UserError(f"{where}: {what} must be a list of {n} rows (one per task)")
    rows = []
    for r, row in enumerate(m):
        if not isinstance(row, list) or len(row) != n:
            raise UserError(f"{where}: {what} row {r} must be a list of {n} numbers")
        values = []
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UserError(f"{where}: {what} row {r} holds {v!r}, not a finite number")
            values.append(float(v))
        rows.append(values)
    return rows


@dataclass
class AffinityResult:
    """Task affinity of one run: the mean matrix, per-layer matrices and settings.

    Tensors (or numpy arrays) given for ``mean`` / ``per_layer`` are converted to nested
    lists of floats; every field is validated on construction, so a result that exists
    can always be saved and read back.

    Attributes:
        tasks: the N task names; index i names row i and column i.
        method: one of :data:`METHODS`.
        mean: N x N, the affinity used downstream.
        per_layer: L x N x N, one matrix per layer (RSA); may be empty (L = 0) for
            estimators without layers.
        meta: JSON-serialisable settings (images K, batches, lr, ...).
    """

    tasks: list[str]
    method: str
    mean: list[list[float]]
    per_layer: list[list[list[float]]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.mean = _as_lists(self.mean)
        self.per_layer = _as_lists(self.per_layer)
        self._validate("affinity result")

    def _validate(self, where: str) -> None:
        tasks = self.tasks
        if (
            not isinstance(tasks, list)
            or not tasks
            or not all(isinstance(t, str) and t for t in tasks)
        ):
            raise UserError(f"{where}: tasks must be a non-empty list of task names")
        if len(set(tasks)) != len(tasks):
            raise UserError(f"{where}: tasks has duplicate names: {tasks}")
        if self.method not in METHODS:
            raise UserError(
                f"{where}: unknown method {self.method!r}; choose one of {', '.join(METHODS)}"
            )
        n = len(tasks)
        self.mean = _check_matrix(self.mean, n, "mean", where)
        if not isinstance(self.per_layer, list):
            raise UserError(f"{where}: per_layer must be a list of {n}x{n} matrices")
        self.per_layer = [
            _check_matrix(m, n, f"per_layer[{li}]", where) for li, m in enumerate(self.per_layer)
        ]
        if not isinstance(self.meta, dict) or not all(isinstance(k, str) for k in self.meta):
            raise UserError(f"{where}: meta must be an object with string keys")
        try:
            json.dumps(self.meta, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise UserError(f"{where}: meta is not plain JSON: {exc}") from exc

    @classmethod
    def from_tensors(
        cls,
        tasks: list[str],
        method: str,
        mean: Tensor,
        per_layer: Tensor | None = None,
        meta: dict[str, Any] | None = None,
    ) -> AffinityResult:
        """Build from ``mean`` ``[N, N]`` and ``per_layer`` ``[L, N, N]`` (None: no layers)."""
        return cls(
            tasks=list(tasks),
            method=method,
            mean=mean,
            per_layer=[] if per_layer is None else per_layer,
            meta=dict(meta or {}),
        )

    @property
    def num_tasks(self) -> int:
        """N."""
        return len(self.tasks)

    def mean_tensor(self) -> Tensor:
        """The mean affinity as a float64 tensor ``[N, N]`` (rows and columns = tasks)."""
        return torch.tensor(self.mean, dtype=torch.float64)

    def per_layer_tensor(self) -> Tensor:
        """The per-layer affinities as a float64 tensor ``[L, N, N]`` (L may be 0)."""
        n = self.num_tasks
        return torch.tensor(self.per_layer, dtype=torch.float64).reshape(-1, n, n)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``affinity.json`` (plain lists, floats and strings)."""
        return {
            "tasks": list(self.tasks),
            "method": self.method,
            "mean": [list(row) for row in self.mean],
            "per_layer": [[list(row) for row in m] for m in self.per_layer],
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, obj: Any, where: str = "affinity result") -> AffinityResult:
        """Parse :meth:`to_json`'s object; ``where`` names the source in error messages."""
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object with keys {', '.join(_KEYS)}")
        missing = [k for k in _KEYS if k not in obj]
        unknown = sorted(set(obj) - set(_KEYS))
        if missing or unknown:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
                [f"unknown {', '.join(unknown)}"] if unknown else []
            )
            raise UserError(f"{where}: not an affinity record ({'; '.join(parts)})")
        result = cls.__new__(cls)
        result.tasks = obj["tasks"]
        result.method = obj["method"]
        result.mean = obj["mean"]
        result.per_layer = obj["per_layer"]
        result.meta = obj["meta"]
        result._validate(where)
        return result

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``affinity.json`` atomically (an interrupted run leaves the old file)."""
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> AffinityResult:
        """Read and validate a file written by :meth:`save`; UserError naming it if bad."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise UserError(f"{path}: affinity file not found") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot read affinity file: {exc}") from exc
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON ({exc})") from exc
        return cls.from_json(obj, where=str(path))


def load(path: str | os.PathLike) -> AffinityResult:
    """Same as :meth:`AffinityResult.load`."""
    return AffinityResult.load(path)
