"""Small self-auxiliary towers (Wang et al., "Small Towers Make Big Differences", METHOD.md 4).

For every task an under-parameterised tower reads the same shared representation as the
task's main head and is trained on the same label:

    loss = sum_t w_t (L_t + gamma * L_t_aux).

The towers only regularise the shared part: they are kept beside the model
(:class:`AuxTowers`), never inside it, so nothing that runs, counts, materializes or exports
the model can see them.

Size: ``size`` is the target ratio of a tower's parameters to its main head's. A tower is a
1x1 conv to ``hidden`` channels, BatchNorm, ReLU and a 1x1 conv to the task's channels (per
image for classification: global pooling first); ``hidden`` is the largest width whose
tower stays within ``size`` times the head's parameters. When even one hidden channel would
exceed it (or ``size`` is 0) the tower is linear: one 1x1 conv (a linear layer per image).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dymu.config import TowersConfig
from dymu.errors import UserError
from dymu.models.backbones import Backbone
from dymu.models.flops import count_params
from dymu.tasks import Task


def tower_hidden(in_channels: int, out_channels: int, budget_params: float) -> int:
    """The widest ``hidden`` whose tower has at most ``budget_params`` parameters (0 = linear).

    A hidden tower has ``C*h`` (conv, no bias) + ``2h`` (BN) + ``h*o + o`` (conv) parameters.
    """
    per_channel = in_channels + 2 + out_channels
    return max(0, int((budget_params - out_channels) // per_channel))


class SmallTower(nn.Module):
    """One task's auxiliary tower: ``[B, C, h, w]`` features -> the task's raw output."""

    def __init__(self, *, in_channels: int, out_channels: int, hidden: int, dense: bool) -> None:
        super().__init__()
        self.dense = dense
        if hidden > 0:
            self.body: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, out_channels, 1),
            )
        else:
            self.body = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, features: Tensor, out_size: tuple[int, int]) -> Tensor:
        if not self.dense:
            pooled = F.adaptive_avg_pool2d(features, 1)  # [B, C, 1, 1]
            return self.body(pooled).flatten(1)  # [B, out, 1, 1] -> [B, out]
        x = self.body(features)  # [B, out, h, w]
        return F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)


class AuxTowers(nn.Module):
    """The towers of every task, with the loss they add.

    Attributes:
        gamma: weight of the auxiliary loss.
        towers: task name -> :class:`SmallTower`.
        ratios: task name -> the tower's parameters / its main head's (what ``size`` gave).
    """

    def __init__(
        self,
        tasks: Sequence[Task],
        *,
        in_channels: int,
        heads: Mapping[str, nn.Module],
        gamma: float,
        size: float,
    ) -> None:
        super().__init__()
        if gamma <= 0:
            raise UserError(f"towers: gamma must be > 0 to build towers, got {gamma}")
        if not 0 <= size < 1:
            raise UserError(f"towers: size must be in [0, 1) (a fraction of the head), got {size}")
        self.gamma = float(gamma)
        self.towers = nn.ModuleDict()
        self.ratios: dict[str, float] = {}
        for task in tasks:
            head_params = count_params(heads[task.name])
            hidden = tower_hidden(in_channels, task.out_channels, size * head_params)
            tower = SmallTower(
                in_channels=in_channels,
                out_channels=task.out_channels,
                hidden=hidden,
                dense=task.dense,
            )
            self.towers[task.name] = tower
            self.ratios[task.name] = count_params(tower) / head_params
        self.tasks = list(tasks)

    def forward(
        self, features: Mapping[str, Tensor], out_size: tuple[int, int]
    ) -> dict[str, Tensor]:
        """Each task's tower on the representation its main head reads (task -> features)."""
        return {t.name: self.towers[t.name](features[t.name], out_size) for t in self.tasks}

    def losses(
        self, features: Mapping[str, Tensor], out_size: tuple[int, int], batch: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """``gamma * L_t_aux`` per task, to add to each task's main loss before weighting."""
        out = self(features, out_size)
        return {t.name: self.gamma * t.loss(out[t.name], batch[t.name]) for t in self.tasks}


def build_towers(
    tasks: Sequence[Task], backbone: Backbone, heads: Mapping[str, nn.Module], cfg: TowersConfig
) -> AuxTowers | None:
    """Towers on ``backbone``'s last layer as ``cfg`` asks, or None when ``cfg.gamma`` is 0.

    Used for the anchor's streams in stage 0 (every stream has the same widths) and for the
    shared model of the baselines.
    """
    if cfg.gamma == 0:
        return None
    return AuxTowers(
        tasks,
        in_channels=backbone.out_channels[-1],
        heads=heads,
        gamma=cfg.gamma,
        size=cfg.size,
    )
