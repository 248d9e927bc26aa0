"""Load (and write) torchvision-format weights into a :class:`~dymu.models.backbones.Backbone`.

Our backbones cut torchvision's models into layers, so only the prefix of a key changes:
``layer2.1.conv1.weight`` (ResNet) becomes ``layers.4.conv1.weight`` and
``features.5.conv.1.0.weight`` (MobileNetV2) becomes ``layers.5.conv.1.0.weight``. Each
backbone carries its prefix table (``Backbone.torchvision_prefixes``; any module with that
attribute will do, so this module does not import the backbones); this module only
renames and checks. The classifier (``fc.*``, ``classifier.*``) is not part of a backbone
and is skipped.

Loading never executes code from the file (``torch.load(weights_only=True)`` or
safetensors) and is strict: every parameter and buffer of the backbone must come from the
file, and every non-classifier key of the file must land in the backbone, else a one-line
:class:`~dymu.errors.UserError` names the first offending key and the file. The one
exception is ``num_batches_tracked``: torchvision's older checkpoints (ResNet-18/34) were
saved before BN had that buffer, and torch itself accepts its absence.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from dymu.errors import UserError

IGNORED_PREFIXES = ("fc.", "classifier.")
"""torchvision keys that belong to the classifier, not to the backbone."""

OPTIONAL_SUFFIX = "num_batches_tracked"


def _rename(key: str, table: dict[str, str]) -> str | None:
    """Swap the one prefix of ``key`` found in ``table``; None when no prefix matches.

    Every prefix ends with a dot, so ``layer1.1.`` never matches ``layer1.10.x``.
    """
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def from_torchvision(
    backbone: nn.Module, state: dict[str, Tensor], source: str
) -> dict[str, Tensor]:
    """Rename a torchvision-format state dict to ``backbone``'s keys, checking coverage.

    Args:
        backbone: the model the weights are for (provides the prefix table and the keys).
        state: torchvision-format state dict (classifier keys are skipped).
        source: where ``state`` came from, for error messages.

    Returns:
        A state dict ``backbone.load_state_dict(..., strict=False)`` accepts; only
        ``num_batches_tracked`` buffers may be missing from it.

    Raises:
        UserError: on the first unexpected key, missing key or shape mismatch.
    """
    table = backbone.torchvision_prefixes
    if not table:
        raise UserError(f"{type(backbone).__name__} has no torchvision counterpart ({source})")
    ours = backbone.state_dict()
    renamed: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        new = _rename(key, table)
        if new is None or new not in ours:
            raise UserError(f"unexpected key {key!r} in {source}: no such backbone weight")
        if not isinstance(value, Tensor):
            raise UserError(f"key {key!r} in {source} is not a tensor")
        if value.shape != ours[new].shape:
            raise UserError(
                f"key {key!r} in {source} has shape {tuple(value.shape)}, "
                f"the backbone expects {tuple(ours[new].shape)}"
            )
        renamed[new] = value
    inverse = {new: old for old, new in table.items()}
    for key in ours:
        if key not in renamed and not key.endswith(OPTIONAL_SUFFIX):
            tv_key = _rename(key, inverse) or key
            raise UserError(f"missing key {tv_key!r} in {source}")
    return renamed


def to_torchvision(backbone: nn.Module) -> dict[str, Tensor]:
    """``backbone``'s state dict under torchvision's key names (no classifier keys)."""
    inverse = {new: old for old, new in backbone.torchvision_prefixes.items()}
    if not inverse:
        raise UserError(f"{type(backbone).__name__} has no torchvision counterpart")
    out = {}
    for key, value in backbone.state_dict().items():
        tv_key = _rename(key, inverse)
        if tv_key is None:  # every key of a backbone lives under some layer's prefix
            raise RuntimeError(f"no torchvision name for {key!r}")
        out[tv_key] = value
    return out


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file, never executing code."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file {p} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p), device="cpu")
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or a pickle with code in it
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read weights file {p}: {msg}") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise UserError(f"weights file {p} does not hold a state dict (name -> tensor)")
    return state


def load_torchvision_weights(backbone: nn.Module, path: str | Path) -> nn.Module:
    """Load a torchvision-format checkpoint (``.pth`` or ``.safetensors``) into ``backbone``.

    Raises:
        UserError: the file is missing or unreadable, or its keys or shapes do not match
            (the message names the first offending key and the file).
    """
    state = read_state_dict(path)
    renamed = from_torchvision(backbone, state, str(path))
    backbone.load_state_dict(renamed, strict=False)
    return backbone
