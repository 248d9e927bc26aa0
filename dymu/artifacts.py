"""Reading artifacts back: one loader for every file dymu writes.

A run directory can be damaged in every way a file can: truncated by a full disk, emptied,
overwritten with random bytes, or swapped with another model's file. Every reader goes
through these functions, which turn any such file into one :class:`~dymu.errors.UserError`
line that names the file and says what to do: never internal-error text, never a
multi-line library message, and never torch's advice to retry with ``weights_only=False``
(a checkpoint that only loads that way carries code, which dymu never runs).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dymu.errors import UserError

if TYPE_CHECKING:  # torch is imported where a tensor is read: config files need none
    import torch

_REASON_CHARS = 100


def reason(exc: BaseException) -> str:
    """A library error as a short single line (its first line, cut to 100 characters)."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].strip()
    text = text.split(". ")[0] or type(exc).__name__
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


def rerun_fix(run_dir: str | Path) -> str:
    """What to do about a damaged artifact of a search run."""
    return f"delete it and rerun dymu search --run {run_dir}"


def _damaged(what: str, path: Path, why: str, fix: str) -> UserError:
    return UserError(f"{what} {path} is damaged ({why}); {fix}")


def read_text(path: str | Path, what: str, fix: str) -> str:
    """The UTF-8 text of ``path``; one line naming it when it is missing or not text."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} not found")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _damaged(what, p, "not UTF-8 text", fix) from None
    except OSError as exc:
        raise UserError(f"cannot read {what} {p}: {exc.strerror or reason(exc)}") from None


def read_json(path: str | Path, what: str, fix: str, kind: type = dict) -> Any:
    """The JSON value in ``path``, which must be a ``kind`` (a dict unless told)."""
    p = Path(path)
    text = read_text(p, what, fix)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _damaged(what, p, f"not valid JSON: {reason(exc)}", fix) from None
    if not isinstance(value, kind):
        raise _damaged(what, p, f"holds a {type(value).__name__}, not a {kind.__name__}", fix)
    return value


def read_safetensors(
    path: str | Path, what: str, fix: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, dymu metadata) of a safetensors file; the metadata is the JSON object saved
    under the ``dymu`` header key ({} when absent)."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _damaged(what, p, f"not a safetensors file: {reason(exc)}", fix) from None
    try:
        meta = json.loads(header.get("dymu", "{}"))
    except ValueError:
        raise _damaged(what, p, "its dymu header is not JSON", fix) from None
    if not isinstance(meta, dict):
        raise _damaged(what, p, "its dymu header is not a JSON object", fix)
    return state, meta


def check_state(
    own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str, path: Path, fix: str
) -> None:
    """Refuse a state dict that does not fit a model, in one line naming the first missing,
    unexpected or wrongly shaped tensor and how many there are."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if not (missing or unexpected or shapes):
        return
    if missing:
        first = f"lacks {len(missing)} tensor(s), e.g. {missing[0]!r}"
    elif unexpected:
        first = f"has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}"
    else:
        key = shapes[0]
        first = (
            f"{len(shapes)} tensor(s) have other shapes, e.g. {key!r} is "
            f"{tuple(state[key].shape)}, not {tuple(own[key].shape)}"
        )
    raise UserError(f"{what} {path} was made for another model: it {first}; {fix}")


def load_into(module: torch.nn.Module, path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """Load a safetensors file into ``module`` (every tensor must fit); return its metadata."""
    p = Path(path)
    state, meta = read_safetensors(p, what, fix)
    check_state(module.state_dict(), state, what, p, fix)
    module.load_state_dict(state)
    return meta


def read_checkpoint(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """A ``torch.save`` dict read with ``weights_only=True``: a file that holds code (a
    pickle payload) or is damaged is refused in one line, and its code never runs."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p} not found")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on odd files
            warnings.simplefilter("ignore")
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure gets the same kind of answer
        text = str(exc)
        if "GLOBAL" in text:  # a class or function reference: code that is never run
            why = "it holds code or objects, which dymu never loads"
        elif "Weights only load failed" in text:
            why = "not a checkpoint dymu wrote"
        else:
            why = f"unreadable: {reason(exc)}"
        raise _damaged(what, p, why, fix) from None
    if not isinstance(state, dict):
        raise _damaged(what, p, f"holds a {type(state).__name__}, not a checkpoint", fix)
    return state
