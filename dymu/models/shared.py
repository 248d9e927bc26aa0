"""The shared-backbone multi-task model: hard parameter sharing on the anchor's parts.

One backbone, built exactly like a stream of the anchor, feeds one head per task, built
exactly like the anchor's heads. This is the "static multi-task model" of the baselines
(one per preference, or one per weighting strategy) and the target network of the Pareto
hypernetworks, so every method is compared on the same backbone, heads and input size.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dymu.config import ModelConfig
from dymu.models.anchor import build_anchor
from dymu.models.backbones import Backbone
from dymu.models.heads import Head
from dymu.tasks import Task, TaskSpec


class SharedNet(nn.Module):
    """One backbone, one head per task; ``forward`` returns raw outputs keyed by task name.

    Attributes:
        tasks: the :class:`~dymu.tasks.Task` of each head, in order.
        backbone: the shared feature extractor (all layers shared by every task).
        heads: task name -> head.
    """

    def __init__(self, tasks: Sequence[Task], backbone: Backbone, heads: nn.ModuleDict) -> None:
        super().__init__()
        if [t.name for t in tasks] != list(heads):
            raise ValueError("shared net needs one head per task, in task order")
        self.tasks = list(tasks)
        self.backbone = backbone
        self.heads = heads

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def features(self, image: Tensor) -> list[Tensor]:
        """The backbone's layer outputs, ``[L]`` of ``[B, C_l, H_l, W_l]``."""
        return self.backbone(image)

    def heads_on(self, feats: Sequence[Tensor], out_size: tuple[int, int]) -> dict[str, Tensor]:
        """Every head on the shared features."""
        out = {}
        for task in self.tasks:
            head: Head = self.heads[task.name]
            low = feats[head.low_layer] if head.low_layer is not None else None
            out[task.name] = head(feats[-1], low, out_size)
        return out

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        return self.heads_on(self.features(image), (image.shape[-2], image.shape[-1]))


def build_shared_net(model: ModelConfig, specs: Sequence[TaskSpec], seed: int = 0) -> SharedNet:
    """A shared net initialised as the anchor's first stream and the anchor's heads would be.

    With ``model.shared_init`` every stream starts from the same backbone weights, so the
    shared backbone starts where each single-task stream started.
    """
    anchor = build_anchor(model, specs, seed=seed)
    return SharedNet(anchor.tasks, anchor.streams[0], anchor.heads)
