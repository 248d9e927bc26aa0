"""Models: backbones cut into searchable layers, task heads, and their FLOPs.

:func:`build_backbone` and :func:`build_head` build from the registries :data:`BACKBONES`
and :data:`HEADS`; :mod:`dymu.models.flops` prices layers and heads with fvcore (one fused
multiply-add = one FLOP); :mod:`dymu.models.torchvision_weights` loads torchvision
checkpoints.
"""

from __future__ import annotations

from dymu.models.backbones import BACKBONES, STACKABLE_MODULES, Backbone, build_backbone
from dymu.models.flops import count_flops, count_params, head_cost, layer_costs
from dymu.models.heads import HEADS, Head, build_head

__all__ = [
    "BACKBONES",
    "HEADS",
    "STACKABLE_MODULES",
    "Backbone",
    "Head",
    "build_backbone",
    "build_head",
    "count_flops",
    "count_params",
    "head_cost",
    "layer_costs",
]
