"""What every exporter shares: the eval-mode check of the module before export, and one
comparison of a deployed artifact's outputs with PyTorch's.

ONNX Runtime (:func:`dymu.compile.onnx_export.ort_parity`) and AOTInductor
(:func:`dymu.compile.aoti.aoti_parity`) run their artifact and the module on the same random
inputs; this module turns those output pairs into one report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import nn

from dymu.errors import RuntimeFailure, UserError

_TRAINING_SENSITIVE = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)
"""Modules whose output depends on ``.training``. Others (``nn.Identity`` left by BN
folding, activations) may carry a stale flag harmlessly, so only these and the root count."""


def check_eval_mode(module: nn.Module, needs: str) -> None:
    """Refuse, in one line naming ``needs`` (the exporter), a module in training mode (the
    root or a submodule whose output depends on it)."""
    training = [
        name or "<root>"
        for name, m in module.named_modules()
        if m.training and (m is module or isinstance(m, _TRAINING_SENSITIVE))
    ]
    if training:
        raise UserError(
            f"{needs} needs an eval-mode module (call .eval()); in training mode: {training[:3]}"
        )


def parity_report(
    pairs: Iterable[tuple[int, Mapping[str, np.ndarray], Mapping[str, np.ndarray]]],
    names: Sequence[str],
    *,
    atol: float,
    rtol: float,
    backend: str,
) -> dict[str, Any]:
    """Max abs difference per task over ``(batch, artifact outputs, PyTorch outputs)`` pairs.

    Returns:
        ``{"per_task": {task: max abs err}, "overall": float, "batch_sizes": [...],
        "allclose": bool}``: errors are maxima over all batch sizes and elements.

    Raises:
        RuntimeFailure: output names or shapes differ between the artifact and PyTorch.
    """
    per_task = dict.fromkeys(names, 0.0)
    close, sizes = True, []
    for b, got, want in pairs:
        sizes.append(b)
        if set(want) != set(names) or set(got) != set(names):
            raise RuntimeFailure(
                f"{backend} outputs {sorted(got)} differ from module outputs {sorted(want)}"
            )
        for name in names:
            g, w = np.asarray(got[name]), np.asarray(want[name])
            if g.shape != w.shape:
                raise RuntimeFailure(
                    f"batch {b}, output {name}: {backend} shape {g.shape} != PyTorch {w.shape}"
                )
            per_task[name] = max(per_task[name], float(np.abs(g - w).max(initial=0.0)))
            close &= bool(np.allclose(g, w, atol=atol, rtol=rtol))
    return {
        "per_task": per_task,
        "overall": max(per_task.values(), default=0.0),
        "batch_sizes": sizes,
        "allclose": close,
    }
