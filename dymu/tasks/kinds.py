"""Task kinds: the loss, post-processing and metrics of each kind of output.

A :class:`Task` wraps a :class:`~dymu.tasks.base.TaskSpec` (what the dataset declares)
with everything training and evaluation need to know about it, so that models, trainers
and evaluators stay generic over tasks. Kinds are registered in :data:`TASK_KINDS`;
:func:`build_task` picks the class from ``spec.kind``.

Every loss averages over the *valid* pixels (or samples) of the whole batch, pooled
(a pixel-weighted mean, not a mean of per-image means), skips invalid targets as
:mod:`dymu.tasks.base` marks them, and returns a zero that still carries a gradient (never
NaN) for a batch without any valid element, so a multi-task step where one task happens to
be unlabelled still back-propagates the others.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from dymu.errors import UserError
from dymu.registry import Registry
from dymu.tasks.base import IGNORE_INDEX, TaskSpec
from dymu.tasks.metrics import (
    SALIENCY_BETA2,
    SALIENCY_CONVENTIONS,
    AccuracyMetric,
    ConfusionMatrixMetric,
    DepthMetric,
    EdgeFMeasure,
    MetricAccumulator,
    NormalsMetric,
    SaliencyMaxF,
    check_shapes,
)

TASK_KINDS: Registry[type[Task]] = Registry("task kind")
"""Task classes by kind: ``semseg``, ``parts``, ``depth``, ``normals``, ``edges``,
``saliency``, ``classification``."""


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over ``valid`` (same shape); 0 with a gradient when none is valid.

    ``torch.where`` rather than a multiplication, so a non-finite value at an invalid pixel
    cannot leak into the result.
    """
    picked = torch.where(valid, values, torch.zeros_like(values))
    return picked.sum() / valid.sum().clamp_min(1)


class Task:
    """One output of the network: its loss, its post-processing and its metrics.

    Subclasses set the class constants ``KIND``, ``DENSE``, ``METRICS`` (metric -> higher is
    better), ``PRIMARY`` and either ``CHANNELS`` or ``NEEDS_CLASSES``.

    Attributes:
        spec: the task as the dataset declares it.
        name: key of the target and of the head output (``spec.name``).
        kind: key in :data:`TASK_KINDS` (``spec.kind``).
        dense: whether the task predicts per pixel (``[B, C, H, W]``) or per image (``[B, C]``).
        out_channels: channels the head must output.
        metric_directions: metric name -> whether higher is better, the keys ``compute()``
            of :meth:`new_metric` returns.
        primary_metric: the one metric that stands for the task (e.g. in one-metric delta_m).
        conventions: metric name -> how it was computed, for metrics whose definition
            differs between papers (METHOD.md 6); result files should record it.
    """

    KIND: ClassVar[str] = ""
    DENSE: ClassVar[bool] = True
    METRICS: ClassVar[dict[str, bool]] = {}
    PRIMARY: ClassVar[str] = ""
    CHANNELS: ClassVar[int] = 0
    NEEDS_CLASSES: ClassVar[bool] = False

    def __init__(self, spec: TaskSpec) -> None:
        if spec.kind != self.KIND:
            raise UserError(f"task {spec.name!r} has kind {spec.kind!r}, not {self.KIND!r}")
        if self.NEEDS_CLASSES:
            n = spec.num_classes
            if n is None or isinstance(n, bool) or not isinstance(n, int) or n < 2:
                raise UserError(
                    f"task {spec.name!r} of kind {spec.kind!r} needs num_classes >= 2, got {n!r}"
                )
            if spec.class_names is not None and len(spec.class_names) != n:
                raise UserError(
                    f"task {spec.name!r}: {len(spec.class_names)} class_names for num_classes={n}"
                )
        self.spec = spec
        self.name = spec.name
        self.kind = spec.kind
        self.dense = self.DENSE
        self.out_channels: int = spec.num_classes if self.NEEDS_CLASSES else self.CHANNELS
        self.metric_directions: dict[str, bool] = dict(self.METRICS)
        self.primary_metric: str = self.PRIMARY
        self.conventions: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, out_channels={self.out_channels})"

    def _check(self, pred: Tensor, target: Tensor, target_channels: int | None) -> None:
        check_shapes(
            pred,
            target,
            channels=self.out_channels,
            target_channels=target_channels,
            dense=self.dense,
        )

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Scalar training loss of a raw head output against a batched target."""
        raise NotImplementedError

    def predict(self, pred: Tensor) -> Tensor:
        """Post-process a raw head output into target space (what a deployed model returns)."""
        raise NotImplementedError

    def new_metric(self) -> MetricAccumulator:
        """A fresh accumulator whose ``compute()`` returns :attr:`metric_directions`' keys."""
        raise NotImplementedError


@TASK_KINDS.register("semseg")
class SemsegTask(Task):
    """Semantic segmentation: one class id per pixel, -1 = ignored."""

    KIND = "semseg"
    METRICS: ClassVar[dict[str, bool]] = {"miou": True, "pixel_acc": True}
    PRIMARY = "miou"
    NEEDS_CLASSES = True

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Pixel-wise cross-entropy over the valid pixels of the batch.

        L = -(1/N) sum_{i valid} log softmax(z_i)[y_i], z_i the logits ``[C]`` of pixel i,
        N the number of pixels with y_i != -1.

        Args:
            pred: logits ``[B, C, H, W]``.
            target: class ids ``[B, H, W]`` (int64, -1 = ignored).
        """
        self._check(pred, target, None)
        ce = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="none")  # [B,H,W]
        return _masked_mean(ce, target != IGNORE_INDEX)

    def predict(self, pred: Tensor) -> Tensor:
        """Class ids ``[B, H, W]`` (int64) by argmax over the channel axis."""
        return pred.argmax(1)

    def new_metric(self) -> MetricAccumulator:
        return ConfusionMatrixMetric(self.out_channels)


@TASK_KINDS.register("parts")
class PartsTask(SemsegTask):
    """Human-part segmentation: the semseg loss and metrics (mIoU, pixel accuracy)."""

    KIND = "parts"


@TASK_KINDS.register("classification")
class ClassificationTask(Task):
    """One class id per image (e.g. one of CIFAR-100's 20 coarse tasks); -1 = unlabelled."""

    KIND = "classification"
    DENSE = False
    METRICS: ClassVar[dict[str, bool]] = {"accuracy": True}
    PRIMARY = "accuracy"
    NEEDS_CLASSES = True

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy over the labelled samples of the batch.

        L = -(1/N) sum_{n: y_n != -1} log softmax(z_n)[y_n].

        Args:
            pred: logits ``[B, C]``.
            target: class ids ``[B]`` (int64, -1 = unlabelled).
        """
        self._check(pred, target, None)
        ce = F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="none")  # [B]
        return _masked_mean(ce, target != IGNORE_INDEX)

    def predict(self, pred: Tensor) -> Tensor:
        """Class ids ``[B]`` (int64) by argmax."""
        return pred.argmax(1)

    def new_metric(self) -> MetricAccumulator:
        return AccuracyMetric(self.out_channels)


@TASK_KINDS.register("depth")
class DepthTask(Task):
    """Metric depth regression; a target of 0 marks a pixel without measurement."""

    KIND = "depth"
    METRICS: ClassVar[dict[str, bool]] = {"abs_err": False, "rel_err": False}
    PRIMARY = "abs_err"
    CHANNELS = 1

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """L1 over the pixels with a measurement, the usual multi-task depth loss.

        L = (1/N) sum_{i: d*_i > 0} |d_i - d*_i|.

        Args:
            pred: depth ``[B, 1, H, W]``.
            target: depth ``[B, 1, H, W]``, 0 = no measurement.
        """
        self._check(pred, target, 1)
        return _masked_mean((pred - target).abs(), target > 0)

    def predict(self, pred: Tensor) -> Tensor:
        """The head output as is: ``[B, 1, H, W]``."""
        return pred

    def new_metric(self) -> MetricAccumulator:
        return DepthMetric()


@TASK_KINDS.register("normals")
class NormalsTask(Task):
    """Surface normals (unit vectors); an all-zero target marks an invalid pixel."""

    KIND = "normals"
    METRICS: ClassVar[dict[str, bool]] = dict(NormalsMetric.directions)
    PRIMARY = "mean_angle"
    CHANNELS = 3

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Cosine loss between the L2-normalised prediction and the target.

        L = (1/N) sum_{i: n*_i != 0} (1 - <n_i / |n_i|, n*_i / |n*_i|>): scale-free, so the
        head only has to get the direction right, and bounded in [0, 2].

        Args:
            pred: unnormalised normals ``[B, 3, H, W]``.
            target: unit normals ``[B, 3, H, W]``, all-zero = invalid.
        """
        self._check(pred, target, 3)
        cos = (F.normalize(pred, dim=1) * F.normalize(target, dim=1)).sum(1)  # [B, H, W]
        return _masked_mean(1 - cos, (target != 0).any(dim=1))

    def predict(self, pred: Tensor) -> Tensor:
        """Unit normals ``[B, 3, H, W]`` (L2-normalised over the channel axis)."""
        return F.normalize(pred, dim=1)

    def new_metric(self) -> MetricAccumulator:
        return NormalsMetric()


@TASK_KINDS.register("edges")
class EdgesTask(Task):
    """Edge detection: per-pixel edge probability in [0, 1], -1 = ignored.

    Args:
        spec: the task.
        pos_weight: fixed weight of edge pixels in the loss (non-edges get 1 - pos_weight)
            instead of the per-batch class balance; the multi-task PASCAL literature
            (Maninis et al. 2019, Vandenhende et al. 2020) uses 0.95.
        tolerance: pixels of slack when matching predicted and ground-truth edges in the
            F-measure (see :class:`~dymu.tasks.metrics.EdgeFMeasure`).
    """

    KIND = "edges"
    METRICS: ClassVar[dict[str, bool]] = {"f_measure": True}
    PRIMARY = "f_measure"
    CHANNELS = 1

    def __init__(
        self, spec: TaskSpec, *, pos_weight: float | None = None, tolerance: int = 1
    ) -> None:
        super().__init__(spec)
        if pos_weight is not None and not (
            isinstance(pos_weight, (int, float)) and 0.0 <= pos_weight <= 1.0
        ):
            raise UserError(f"edges pos_weight must be in [0, 1], got {pos_weight!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
            raise UserError(f"edges tolerance must be an integer >= 0, got {tolerance!r}")
        self.pos_weight = None if pos_weight is None else float(pos_weight)
        self.tolerance = tolerance
        self.conventions = {
            "f_measure": f"ODS over thresholds 0.01..0.99, dilation tolerance {tolerance} px, "
            "no matching or thinning"
        }

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Class-balanced binary cross-entropy (HED, Xie & Tu 2015) on the logits.

        With p_i = sigmoid(z_i), y_i the target and N the valid pixels of the batch,

            L = -(beta sum_i y_i log p_i + (1 - beta) sum_i (1 - y_i) log(1 - p_i)) / N,

        beta = sum_i (1 - y_i) / N (the fraction of non-edge pixels, so the rare edges weigh
        more) or the fixed ``pos_weight``. For binary y this is beta on the sums over edge
        pixels and 1 - beta on the non-edge ones; soft targets (from resizing) weigh
        proportionally. log p = logsigmoid(z) and log(1 - p) = logsigmoid(-z), for stability.

        Args:
            pred: logits ``[B, 1, H, W]``.
            target: edge probability ``[B, 1, H, W]`` in [0, 1], -1 = ignored.
        """
        self._check(pred, target, 1)
        valid = target >= 0  # [B, 1, H, W]
        y = torch.where(valid, target, torch.zeros_like(target))
        if self.pos_weight is None:
            beta = ((1 - y) * valid).sum() / valid.sum().clamp_min(1)  # fraction of non-edges
        else:
            beta = torch.tensor(self.pos_weight, dtype=pred.dtype, device=pred.device)
        per_pixel = -(beta * y * F.logsigmoid(pred) + (1 - beta) * (1 - y) * F.logsigmoid(-pred))
        return _masked_mean(per_pixel, valid)

    def predict(self, pred: Tensor) -> Tensor:
        """Edge probabilities ``[B, 1, H, W]`` (sigmoid of the logits)."""
        return torch.sigmoid(pred)

    def new_metric(self) -> MetricAccumulator:
        return EdgeFMeasure(tolerance=self.tolerance)


@TASK_KINDS.register("saliency")
class SaliencyTask(Task):
    """Salient-object segmentation: per-pixel saliency in [0, 1], -1 = ignored.

    Args:
        spec: the task.
        convention: how the max-F metric pools counts, ``"dataset"`` (default) or
            ``"per_image"``; see :class:`~dymu.tasks.metrics.SaliencyMaxF`. Kept in
            ``self.convention`` and ``self.conventions["max_f"]`` for result files.
    """

    KIND = "saliency"
    METRICS: ClassVar[dict[str, bool]] = {"max_f": True}
    PRIMARY = "max_f"
    CHANNELS = 1

    def __init__(self, spec: TaskSpec, *, convention: str = "dataset") -> None:
        super().__init__(spec)
        if convention not in SALIENCY_CONVENTIONS:
            raise UserError(
                f"saliency convention must be one of {', '.join(SALIENCY_CONVENTIONS)}, "
                f"got {convention!r}"
            )
        self.convention = convention
        self.conventions = {"max_f": f"beta2={SALIENCY_BETA2:g}, {convention}"}

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Binary cross-entropy on the logits over the valid pixels of the batch.

        L = -(1/N) sum_{i valid} (y_i log p_i + (1 - y_i) log(1 - p_i)), p_i = sigmoid(z_i).

        Args:
            pred: logits ``[B, 1, H, W]``.
            target: saliency ``[B, 1, H, W]`` in [0, 1], -1 = ignored.
        """
        self._check(pred, target, 1)
        valid = target >= 0
        y = torch.where(valid, target, torch.zeros_like(target))
        bce = F.binary_cross_entropy_with_logits(pred, y, reduction="none")  # [B, 1, H, W]
        return _masked_mean(bce, valid)

    def predict(self, pred: Tensor) -> Tensor:
        """Saliency probabilities ``[B, 1, H, W]`` (sigmoid of the logits)."""
        return torch.sigmoid(pred)

    def new_metric(self) -> MetricAccumulator:
        return SaliencyMaxF(self.convention)


def build_task(spec: TaskSpec, **options: Any) -> Task:
    """Build the :class:`Task` of ``spec.kind``.

    Args:
        spec: the task as the dataset declares it.
        **options: keyword options of the kind's class (``pos_weight``/``tolerance`` for
            edges, ``convention`` for saliency).

    Raises:
        UserError: unknown kind (listing the known ones), missing or bad ``num_classes``,
            or an option the kind does not take.
    """
    cls = TASK_KINDS.get(spec.kind)
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if params[p].kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise UserError(
            f"task kind {spec.kind!r} takes no option {', '.join(unknown)}; "
            f"options: {', '.join(allowed) or '(none)'}"
        )
    return cls(spec, **options)
