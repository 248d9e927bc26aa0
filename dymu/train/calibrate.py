"""BatchNorm statistics for configurations that narrow nodes (METHOD.md 1.11).

A node in a narrowed context (narrower than full width, or after such a node on its path)
normalises with statistics of its own configuration
(:class:`~dymu.space.treenet.TreeNet`). They are calibrated after training, as universally
slimmable networks recalibrate each width: the configuration runs on a fixed set of
training images with batch statistics, and the population mean and variance of the input
of every such node's BatchNorms are kept. Evaluation and export both calibrate on the same
images, so what is evaluated is what ships.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from dymu.data.base import MultiTaskDataset
from dymu.data.batches import iterate, to_device
from dymu.models.anchor import Anchor
from dymu.models.streams import TreeStreams
from dymu.space.tree import TreeSpec
from dymu.space.treenet import TreeNet

CALIBRATION_IMAGES = 512
"""Training images a configuration's statistics are calibrated on (the split's first)."""


def calibration_images(
    ds: MultiTaskDataset,
    device: torch.device,
    count: int = CALIBRATION_IMAGES,
    batch_size: int = 128,
) -> list[Tensor]:
    """The first ``count`` images of ``ds`` (its own order, no flips) in batches on ``device``."""
    out, seen = [], 0
    for batch in iterate(ds, batch_size, shuffle=False):
        image = to_device(batch, device)["image"][: count - seen]
        out.append(image)
        seen += image.shape[0]
        if seen >= count:
            break
    return out


def calibrated(
    streams: TreeStreams | Anchor,
    tree: TreeSpec,
    images: list[Tensor],
    bn_offsets: Mapping[tuple[int, int], Mapping[str, Tensor]] | None = None,
) -> TreeNet:
    """``TreeNet(streams, tree)`` with the statistics of its nodes in a narrowed context
    calibrated on ``images`` under ``bn_offsets`` (a full-width tree needs none)."""
    net = TreeNet(streams, tree)
    if tree.widths is not None:
        net.bn_stats = net.calibrate(images, bn_offsets)
    return net
