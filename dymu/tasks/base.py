"""What a task is: its spec (name, kind, classes) and the conventions for its targets.

Target conventions (the tensors a dataset returns for one sample; a batch adds dim 0):

=================  ==========================  =====================================
kind               target                      invalid / ignored
=================  ==========================  =====================================
semseg, parts      int64   [H, W] class ids     -1
depth              float32 [1, H, W]            0 (no measurement)
normals            float32 [3, H, W] unit vecs  all three components 0
edges, saliency    float32 [1, H, W] in [0, 1]  -1
classification     int64   [] class id          -1 (sample has no label for this task)
=================  ==========================  =====================================

The image is float32 [3, H, W] in [0, 1] under the key ``"image"``; each task's target
is under the task's *name* (several tasks may share a kind, e.g. two segmentations).
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -1
"""Class id (and float value for edges/saliency) that marks an ignored target."""


@dataclass(frozen=True)
class TaskSpec:
    """A task as a dataset declares it.

    Attributes:
        name: key of the target in a sample and of the head's output (``"semseg"``).
        kind: key in the task-kind registry (``semseg``, ``parts``, ``depth``,
            ``normals``, ``edges``, ``saliency``, ``classification``).
        num_classes: number of classes for ``semseg``/``parts``/``classification``.
        class_names: optional names of those classes, for plots and reports.
    """

    name: str
    kind: str
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
