"""The anchor: N single-task streams (one per task) with their heads.

:class:`Anchor` holds the canonical per-stream weights; its ``forward`` runs every stream
on its own, the reference semantics that trees and compiled models are checked against.
:class:`StackedAnchor` runs the same weights with each layer of all streams as one batched
op (:mod:`dymu.models.stacked`), which is how stage 0 trains them.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from dymu.artifacts import load_into, rerun_fix
from dymu.config import ModelConfig
from dymu.io import atomic_path
from dymu.models.backbones import BACKBONES, Backbone, build_backbone
from dymu.models.heads import Head, build_head
from dymu.models.stacked import StackedLayers, split_streams
from dymu.tasks import Task, TaskSpec, build_task


class Anchor(nn.Module):
    """N streams (backbones cut into layers) and one head per task.

    Attributes:
        tasks: the :class:`~dymu.tasks.Task` of each stream, in stream order.
        streams: stream j is task j's backbone.
        heads: task name -> head reading the last layer (and a low-level layer) of its stream.
    """

    def __init__(
        self, tasks: Sequence[Task], streams: Sequence[Backbone], heads: Mapping[str, Head]
    ):
        super().__init__()
        if len(tasks) != len(streams) or [t.name for t in tasks] != list(heads):
            raise ValueError("anchor needs one stream and one head per task, in task order")
        self.tasks = list(tasks)
        self.streams = nn.ModuleList(streams)
        self.heads = nn.ModuleDict(heads)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    @property
    def num_layers(self) -> int:
        return len(self.streams[0].layers)

    def run_head(
        self, j: int, path_features: Sequence[Tensor], out_size: tuple[int, int]
    ) -> Tensor:
        """Task j's head on the features of the nodes along its path (one per layer)."""
        head = self.heads[self.tasks[j].name]
        low = path_features[head.low_layer] if head.low_layer is not None else None
        return head(path_features[-1], low, out_size)

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """Every task's raw head output, each stream run on its own (the reference)."""
        size = (image.shape[-2], image.shape[-1])
        return {
            t.name: self.run_head(j, self.streams[j](image), size) for j, t in enumerate(self.tasks)
        }


class StackedAnchor(nn.Module):
    """The anchor's streams executed stacked; shares the anchor's heads."""

    def __init__(self, anchor: Anchor) -> None:
        super().__init__()
        self.tasks = anchor.tasks
        self.backbone = StackedLayers(anchor.streams)
        self.heads = anchor.heads

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return self.forward_with_features(image)[0]

    def forward_with_features(self, image: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(every task's head output, the last-layer features its head read), keyed by task."""
        size = (image.shape[-2], image.shape[-1])
        n = len(self.tasks)
        per_layer = [split_streams(f, n) for f in self.backbone(image)]  # [L][N] of [B,C,H,W]
        out, feats = {}, {}
        for j, task in enumerate(self.tasks):
            head = self.heads[task.name]
            # The stream views are strided; convolutions on them are many times slower.
            low = per_layer[head.low_layer][j].contiguous() if head.low_layer is not None else None
            feats[task.name] = per_layer[-1][j].contiguous()
            out[task.name] = head(feats[task.name], low, size)
        return out, feats

    def write_back(self, anchor: Anchor) -> None:
        """Copy the trained stacked backbone weights into the anchor's streams."""
        self.backbone.unstack_into(anchor.streams)


def _backbone_kwargs(model: ModelConfig) -> dict[str, Any]:
    """The config values the chosen backbone builder accepts (``width`` only some do)."""
    kwargs: dict[str, Any] = {"weights": model.weights}
    if "width" in inspect.signature(BACKBONES.get(model.backbone)).parameters:
        kwargs["width"] = model.width
    return kwargs


def build_anchor(model: ModelConfig, specs: Sequence[TaskSpec], seed: int = 0) -> Anchor:
    """A freshly initialised anchor for ``specs``.

    Backbones start from the same weights (seed ``seed``) when ``model.shared_init``, else
    stream j from seed ``seed + j``; head j is always seeded with ``seed + j``.
    """
    tasks = [build_task(s) for s in specs]
    streams, heads = [], {}
    for j, task in enumerate(tasks):
        torch.manual_seed(seed if model.shared_init else seed + j)
        backbone = build_backbone(model.backbone, **_backbone_kwargs(model))
        torch.manual_seed(seed + j)
        name = model.dense_head if task.dense else model.class_head
        low_layer = backbone.low_level_layer if task.dense else None
        heads[task.name] = build_head(
            name,
            in_channels=backbone.out_channels[-1],
            low_channels=backbone.out_channels[low_layer] if low_layer is not None else None,
            low_layer=low_layer,
            out_channels=task.out_channels,
        )
        streams.append(backbone)
    return Anchor(tasks, streams, heads)


def save_anchor(anchor: Anchor, path: str | Path, meta: Mapping[str, Any]) -> Path:
    """Write the anchor's weights as safetensors (with ``meta`` as JSON metadata), atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in anchor.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"dymu": json.dumps(dict(meta), sort_keys=True)})
    return Path(path)


def load_anchor_weights(
    anchor: Anchor, path: str | Path, what: str = "anchor weights"
) -> dict[str, Any]:
    """Load weights saved by :func:`save_anchor` into ``anchor``; return the metadata.

    safetensors holds only tensors, so loading never executes code from the file. A file
    for another architecture or task set fails with one line naming the first mismatch.
    """
    return load_into(anchor, path, what, rerun_fix(Path(path).parent))
