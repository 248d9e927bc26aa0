"""Metric accumulators: dataset-level sufficient statistics that add up across batches.

Every accumulator keeps a fixed list of float64 tensors (counts and sums) and never a list of
per-sample results, for two reasons: the metrics are *dataset-level* (a confusion matrix
pooled over all pixels, not a mean of per-image mIoUs), and statistics that merely add up
can be all-reduced by a later distributed evaluation (``state()`` -> ``all_reduce`` ->
``load_state()``). float64 holds integer counts exactly up to 2**53.

Conventions shared by all accumulators:

* ``update(pred, target)`` takes the *raw head output* (logits, unnormalised normals) and
  a batched target in the conventions of :mod:`dymu.tasks.base`; invalid pixels/samples
  are left out of every statistic.
* ``compute()`` returns exactly the metrics named in ``directions`` (metric -> higher is
  better). Ratios (IoU, accuracy, F-measures, ``within_*``) are in percent (0-100), as the
  multi-task literature reports them. A metric with no valid data yet is ``nan``.
* Statistics live on the device of the first ``update`` so a GPU evaluation never copies
  per batch; ``compute()`` moves them to the CPU.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from dymu.errors import UserError
from dymu.tasks.base import IGNORE_INDEX

NUM_THRESHOLDS = 99
"""Edge and saliency F-measures sweep the thresholds 0.01, 0.02, ..., 0.99."""

ANGLE_BIN_DEG = 0.01
"""Width of the histogram bins of normal angle errors: the median is exact to 0.005 deg."""

NUM_ANGLE_BINS = 18000
"""Bins of :data:`ANGLE_BIN_DEG` over [0, 180] degrees."""

SALIENCY_BETA2 = 0.3
"""beta^2 of the saliency F-measure, weighting precision over recall (Achanta et al. 2009)."""

SALIENCY_CONVENTIONS = ("dataset", "per_image")


def check_shapes(
    pred: Tensor, target: Tensor, *, channels: int, target_channels: int | None, dense: bool
) -> None:
    """Fail with both shapes when a head output and its target do not fit together.

    Args:
        pred: raw head output, ``[B, channels, H, W]`` (dense) or ``[B, channels]``.
        target: ``[B, target_channels, H, W]``, or ``[B, H, W]`` / ``[B]`` for class ids
            (``target_channels=None``).
        channels: channels the head must output.
        target_channels: channels of a float target, ``None`` for class-id targets.
        dense: whether the task predicts per pixel.
    """
    b = pred.shape[0] if pred.dim() > 0 else -1
    if dense:
        want_pred = (b, channels, *pred.shape[2:]) if pred.dim() == 4 else None
        hw = tuple(pred.shape[2:])
        want_target = (b, *hw) if target_channels is None else (b, target_channels, *hw)
    else:
        want_pred = (b, channels) if pred.dim() == 2 else None
        want_target = (b,)
    if want_pred is None or tuple(pred.shape) != want_pred or tuple(target.shape) != want_target:
        layout = "[B, C, H, W]" if dense else "[B, C]"
        raise ValueError(
            f"head output {tuple(pred.shape)} (expected {layout} with C={channels}) does not "
            f"fit target {tuple(target.shape)}; dense heads must be upsampled to the target size"
        )


def _thresholds(like: Tensor) -> Tensor:
    """The thresholds k/100, k = 1..99, in ``like``'s dtype and device."""
    ks = torch.arange(1, NUM_THRESHOLDS + 1, dtype=torch.float64, device=like.device)
    return (ks / 100).to(like.dtype)


def _count_at_least(values: Tensor, thresholds: Tensor) -> Tensor:
    """``out[k] = #(values >= thresholds[k])`` for a 1-D ``values``, by one histogram.

    A bucketed histogram instead of a loop over thresholds: one pass over the pixels gives
    the counts for all thresholds at once.
    """
    idx = torch.bucketize(values, thresholds, right=True)  # [N], #thresholds <= value
    hist = torch.bincount(idx, minlength=len(thresholds) + 1)  # [K+1]
    return hist.flip(0).cumsum(0).flip(0)[1:]  # [K], suffix sums


def _count_at_least_per_image(values: Tensor, image: Tensor, n_images: int, thresholds: Tensor):
    """Like :func:`_count_at_least` but per image: ``out[b, k]`` for ``image`` ids in [0, B)."""
    k1 = len(thresholds) + 1
    idx = torch.bucketize(values, thresholds, right=True)  # [N]
    hist = torch.bincount(image * k1 + idx, minlength=n_images * k1).view(n_images, k1)
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]  # [B, K]


def _div(num: Tensor, den: Tensor) -> Tensor:
    """Elementwise ``num / den`` with 0/0 (and x/0) := 0: no prediction means no precision."""
    num, den = num.double(), den.double()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, num / safe, torch.zeros_like(num))


def _f_beta(precision: Tensor, recall: Tensor, beta2: float) -> Tensor:
    """F_beta = (1 + beta^2) P R / (beta^2 P + R), 0 where P = R = 0."""
    return _div((1 + beta2) * precision * recall, beta2 * precision + recall)


class MetricAccumulator:
    """Accumulates summable statistics over a dataset and turns them into metrics.

    Subclasses define ``_zeros`` (the statistic tensors), ``_batch_stats`` (their
    increments for one batch) and ``_compute`` (metrics from statistics on the CPU).

    Attributes:
        directions: metric name -> whether higher is better; ``compute()`` returns exactly
            these keys.
    """

    directions: ClassVar[dict[str, bool]] = {}

    def __init__(self) -> None:
        self._stats = self._zeros()

    # -- subclass hooks -------------------------------------------------------------------
    def _zeros(self) -> list[Tensor]:
        raise NotImplementedError

    def _batch_stats(self, pred: Tensor, target: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def _compute(self, stats: list[Tensor]) -> dict[str, float]:
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch: ``pred`` is the raw head output, ``target`` the batched target."""
        with torch.no_grad():
            pred = pred.detach()
            target = target.to(pred.device)
            increments = self._batch_stats(pred, target)
            if self._stats[0].device != pred.device:
                self._stats = [s.to(pred.device) for s in self._stats]
            for s, inc in zip(self._stats, increments, strict=True):
                s += inc.to(torch.float64)

    def compute(self) -> dict[str, float]:
        """Metrics over everything seen since the last ``reset`` (``nan`` if nothing valid)."""
        return self._compute([s.cpu() for s in self._stats])

    def reset(self) -> None:
        """Forget all batches (start a new evaluation)."""
        self._stats = self._zeros()

    def state(self) -> list[Tensor]:
        """Copies of the statistic tensors; summing them over accumulators merges them."""
        return [s.clone() for s in self._stats]

    def load_state(self, state: list[Tensor]) -> None:
        """Replace the statistics, e.g. by the all-reduced sum of several workers' states."""
        zeros = self._zeros()
        if len(state) != len(zeros) or any(
            tuple(s.shape) != tuple(z.shape) for s, z in zip(state, zeros, strict=False)
        ):
            got = [tuple(s.shape) for s in state]
            want = [tuple(z.shape) for z in zeros]
            raise UserError(f"{type(self).__name__}: state shapes {got} do not match {want}")
        self._stats = [s.detach().to(torch.float64).clone() for s in state]


class ConfusionMatrixMetric(MetricAccumulator):
    """mIoU and pixel accuracy from a dataset-level confusion matrix (semseg, parts).

    IoU_c = TP_c / (TP_c + FP_c + FN_c) over all valid pixels of the dataset; classes
    that appear in neither the targets nor the predictions (at valid pixels) have no IoU and
    are left out of the mean, so a dataset split without some class is not penalised.
    """

    directions: ClassVar[dict[str, bool]] = {"miou": True, "pixel_acc": True}

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        super().__init__()

    def _zeros(self) -> list[Tensor]:
        c = self.num_classes
        return [torch.zeros(c, c, dtype=torch.float64)]  # rows: target, cols: prediction

    def _batch_stats(self, pred: Tensor, target: Tensor) -> list[Tensor]:
        c = self.num_classes
        check_shapes(pred, target, channels=c, target_channels=None, dense=True)
        valid = target != IGNORE_INDEX  # [B, H, W]
        t = target[valid]  # [N]
        p = pred.argmax(1)[valid]  # [N]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
            raise ValueError(f"class ids must be in [0, {c}) or {IGNORE_INDEX}")
        cm = torch.bincount(t * c + p, minlength=c * c).view(c, c)  # [C, C]
        return [cm]

    def per_class_iou(self) -> list[float]:
        """IoU of each class in percent (``nan`` for a class seen in neither map)."""
        cm = self._stats[0].cpu()
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
        return (iou * 100).tolist()

    def _compute(self, stats: list[Tensor]) -> dict[str, float]:
        cm = stats[0]
        total = float(cm.sum())
        if total == 0:
            return {"miou": math.nan, "pixel_acc": math.nan}
        tp = cm.diag()
        union = cm.sum(0) + cm.sum(1) - tp
        present = union > 0
        miou = float((tp[present] / union[present]).mean()) * 100
        return {"miou": miou, "pixel_acc": float(tp.sum()) / total * 100}


class AccuracyMetric(MetricAccumulator):
    """Top-1 accuracy over the labelled samples (classification)."""

    directions: ClassVar[dict[str, bool]] = {"accuracy": True}

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        super().__init__()

    def _zeros(self) -> list[Tensor]:
        return [torch.zeros(2, dtype=torch.float64)]  # [correct, labelled]

    def _batch_stats(self, pred: Tensor, target: Tensor) -> list[Tensor]:
        check_shapes(pred, target, channels=self.num_classes, target_channels=None, dense=False)
        valid = target != IGNORE_INDEX  # [B]
        correct = (pred.argmax(1) == target) & valid
        return [torch.stack([correct.sum(), valid.sum()])]

    def _compute(self, stats: list[Tensor]) -> dict[str, float]:
        correct, n = stats[0].tolist()
        return {"accuracy": correct / n * 100 if n else math.nan}


class DepthMetric(MetricAccumulator):
    """Absolute and relative depth error pooled over all valid pixels (target > 0).

    abs_err = sum |d - d*| / N and rel_err = sum |d - d*| / d* / N over the N valid
    pixels of the whole dataset (not a mean of per-image means).
    """

    directions: ClassVar[dict[str, bool]] = {"abs_err": False, "rel_err": False}

    def _zeros(self) -> list[Tensor]:
        return [torch.zeros(3, dtype=torch.float64)]  # [sum abs, sum rel, n valid]

    def _batch_stats(self, pred: Tensor, target: Tensor) -> list[Tensor]:
        check_shapes(pred, target, channels=1, target_channels=1, dense=True)
        valid = target > 0  # [B, 1, H, W]
        gt = target[valid].double()  # [N]
        err = (pred[valid].double() - gt).abs()  # [N]
        return [torch.stack([err.sum(), (err / gt).sum(), gt.new_tensor(gt.numel())])]

    def _compute(self, stats: list[Tensor]) -> dict[str, float]:
        abs_sum, rel_sum, n = stats[0].tolist()
        if n == 0:
            return {"abs_err": math.nan, "rel_err": math.nan}
        return {"abs_err": abs_sum / n, "rel_err": rel_sum / n}


def normal_angles_deg(pred: Tensor, target: Tensor) -> Tensor:
    """Angle in degrees between predicted and target normals, ``[B, 3, H, W]`` -> ``[B, H, W]``.

    Uses atan2(|a x b|, a . b), which stays accurate for small angles where acos of a
    float32 cosine loses about 0.02 degrees. A zero prediction has no direction and counts
    as 90 degrees (orthogonal to everything), not as a perfect 0.
    """
    a = F.normalize(pred, dim=1)
    b = F.normalize(target, dim=1)
    sin = torch.linalg.cross(a, b, dim=1).norm(dim=1)  # [B, H, W]
    cos = (a * b).sum(1)  # [B, H, W]
    angle = torch.rad2deg(torch.atan2(sin, cos))
    return torch.where(pred.norm(dim=1) > 0, angle, torch.full_like(angle, 90.0))


class NormalsMetric(MetricAccumulator):
    """Angle errors of surface normals over valid pixels (target not all-zero).

    mean_angle and median_angle in degrees; within_X = percent of valid pixels whose error
    is strictly below X degrees (11.25, 22.5, 30). The median comes from a histogram of
    :data:`NUM_ANGLE_BINS` bins of :data:`ANGLE_BIN_DEG` degrees over [0, 180] (summable,
    unlike a list of all errors): it is the midpoint of the bin holding the middle error
    (the mean of two bins' midpoints for an even count), so it is exact to 0.005 degrees.
    """

    directions: ClassVar[dict[str, bool]] = {
        "mean_angle": False,
        "median_angle": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }
    _WITHIN: ClassVar[tuple[float, ...]] = (11.25, 22.5, 30.0)

    def _zeros(self) -> list[Tensor]:
        return [
            torch.zeros(2 + len(self._WITHIN), dtype=torch.float64),  # [sum, n, within...]
            torch.zeros(NUM_ANGLE_BINS, dtype=torch.float64),  # angle histogram
        ]

    def _batch_stats(self, pred: Tensor, target: Tensor) -> list[Tensor]:
        check_shapes(pred, target, channels=3, target_channels=3, dense=True)
        valid = (target != 0).any(dim=1)  # [B, H, W]
        angle = normal_angles_deg(pred, target)[valid]  # [N]
        counts = [(angle < w).sum().double() for w in self._WITHIN]
        n = torch.tensor(float(angle.numel()), dtype=torch.float64, device=angle.device)
        scalars = torch.stack([angle.double().sum(), n, *counts])
        bins = (angle / ANGLE_BIN_DEG).floor().long().clamp(0, NUM_ANGLE_BINS - 1)  # [N]
        return [scalars, torch.bincount(bins, minlength=NUM_ANGLE_BINS)]

    def _compute(self, stats: list[Tensor]) -> dict[str, float]:
        scalars, hist = stats
        total, n = scalars[0].item(), scalars[1].item()
        if n == 0:
            return dict.fromkeys(self.directions, math.nan)
        cum = hist.cumsum(0)
        # 1-based ranks of the two middle errors (equal for an odd count)
        ranks = torch.tensor([(n + 1) // 2, n // 2 + 1], dtype=torch.float64)
        mid_bins = torch.searchsorted(cum, ranks)  # first bin whose cumulative count >= rank
        median = float(((mid_bins.double() + 0.5) * ANGLE_BIN_DEG).mean())
        out = {"mean_angle": total / n, "median_angle": median}
        for w, count in zip(self._WITHIN, scalars[2:].tolist(), strict=True):
            out[f"within_{w:g}"] = count / n * 100
        return out


class EdgeFMeasure(MetricAccumulator):
    """Optimal-dataset-scale F-measure (ODS) of edge detection, with a pixel tolerance.

    For each threshold t in 0.01..0.99 (on the sigmoid of the logits) the dataset-level
    counts are: a predicted edge pixel (p >= t, valid) is a true positive if a ground-truth
    edge (target >= 0.5) lies within ``tolerance`` pixels (Chebyshev distance, a max-pool
    dilation), else a false positive; a ground-truth edge pixel is recalled if a predicted
    edge lies within ``tolerance``. P = TP / (TP + FP), R = recalled / #GT, and
    f_measure = max_t 2PR / (P + R).

    This is a *dilation-tolerant approximation* of the BSDS benchmark used for edges in
    the multi-task literature: it does no one-to-one matching between predicted and
    ground-truth pixels (one GT pixel can justify several predictions) and no thinning
    (non-maximum suppression) of the predictions, so its numbers are not comparable with
    published BSDS/PASCAL odsF values; use it to compare models under the same code.
    """

    directions: ClassVar[dict[str, bool]] = {"f_measure": True}

    def __init__(self, tolerance: int = 1) -> None:
        self.tolerance = tolerance
        super().__init__()

    def _zeros(self) -> list[Tensor]:
        k = NUM_THRESHOLDS
        z = torch.zeros
        # TP, FP and recalled GT per threshold; [#GT, #valid]
        return [z(k, dtype=torch.float64) for _ in range(3)] + [z(2, dtype=torch.float64)]

    def _batch_stats(self, pred: Tensor, target: Tensor) -> list[Tensor]:
        check_shapes(pred, target, channels=1, target_channels=1, dense=True)
        prob = torch.sigmoid(pred.float())  # [B, 1, H, W]
        thr = _thresholds(prob)
        valid = target >= 0  # [B, 1, H, W]
        gt = valid & (target >= 0.5)
        size, pad = 2 * self.tolerance + 1, self.tolerance
        near_gt = F.max_pool2d(gt.float(), size, stride=1, padding=pad) > 0  # [B, 1, H, W]
        prob_valid = torch.where(valid, prob, torch.full_like(prob, -1.0))
        best_near = F.max_pool2d(prob_valid, size, stride=1, padding=pad)  # [B, 1, H, W]
        tp = _count_at_least(prob[valid & near_gt], thr)
        fp = _count_at_least(prob[valid & ~near_gt], thr)
        recalled = _count_at_least(best_near[gt], thr)
        counts = torch.stack([gt.sum(), valid.sum()])
        return [tp, fp, recalled, counts]

    def _compute(self, stats: list[Tensor]) -> dict[str, float]:
        tp, fp, recalled, counts = stats
        n_gt, n_valid = counts.tolist()
        if n_valid == 0:
            return {"f_measure": math.nan}
        precision = _div(tp, tp + fp)
        recall = _div(recalled, torch.full_like(recalled, n_gt))
        return {"f_measure": float(_f_beta(precision, recall, 1.0).max()) * 100}


class SaliencyMaxF(MetricAccumulator):
    """Maximum F-measure of saliency, F_beta with beta^2 = 0.3, over thresholds 0.01..0.99.

    The ground truth is ``target >= 0.5`` at valid pixels; the prediction is the sigmoid of
    the logits thresholded at t. Papers disagree on how counts are pooled, so the
    convention is an option and is recorded in ``self.convention`` (and in the task's
    ``conventions``) for result files (METHOD.md 6):

    * ``"dataset"``: TP, FP and #GT summed over the dataset at each t, then
      F(t) = (1 + b2) P R / (b2 P + R); max_f = max_t F(t).
    * ``"per_image"``: F_i(t) per image, averaged over images at each t, then the max over
      t. Images without any valid pixel are skipped; an image without foreground (or
      without predictions) has P or R = 0 by the convention 0/0 := 0.
    """

    directions: ClassVar[dict[str, bool]] = {"max_f": True}

    def __init__(self, convention: str = "dataset") -> None:
        if convention not in SALIENCY_CONVENTIONS:
            raise UserError(
                f"saliency convention must be one of {', '.join(SALIENCY_CONVENTIONS)}, "
                f"got {convention!r}"
            )
        self.convention = convention
        super().__init__()

    def _zeros(self) -> list[Tensor]:
        k = NUM_THRESHOLDS
        if self.convention == "dataset":
            # TP, FP per threshold; [#GT, #valid]
            return [torch.zeros(k, dtype=torch.float64) for _ in range(2)] + [
                torch.zeros(2, dtype=torch.float64)
            ]
        # sum of per-image F per threshold; [#images]
        return [torch.zeros(k, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]

    def _batch_stats(self, pred: Tensor, target: Tensor) -> list[Tensor]:
        check_shapes(pred, target, channels=1, target_channels=1, dense=True)
        prob = torch.sigmoid(pred.float())  # [B, 1, H, W]
        thr = _thresholds(prob)
        valid = target >= 0  # [B, 1, H, W]
        gt = valid & (target >= 0.5)
        if self.convention == "dataset":
            tp = _count_at_least(prob[gt], thr)
            fp = _count_at_least(prob[valid & ~gt], thr)
            return [tp, fp, torch.stack([gt.sum(), valid.sum()])]
        b = prob.shape[0]
        image = torch.arange(b, device=prob.device).view(b, 1, 1, 1).expand_as(prob)
        tp = _count_at_least_per_image(prob[gt], image[gt], b, thr)  # [B, K]
        fp = _count_at_least_per_image(prob[valid & ~gt], image[valid & ~gt], b, thr)
        n_gt = gt.flatten(1).sum(1, keepdim=True)  # [B, 1]
        f = _f_beta(_div(tp, tp + fp), _div(tp, n_gt.expand_as(tp)), SALIENCY_BETA2)  # [B, K]
        has_valid = valid.flatten(1).any(1)  # [B]
        return [f[has_valid].sum(0), has_valid.sum().view(1)]

    def _compute(self, stats: list[Tensor]) -> dict[str, float]:
        if self.convention == "dataset":
            tp, fp, counts = stats
            n_gt, n_valid = counts.tolist()
            if n_valid == 0:
                return {"max_f": math.nan}
            precision = _div(tp, tp + fp)
            recall = _div(tp, torch.full_like(tp, n_gt))
            f = _f_beta(precision, recall, SALIENCY_BETA2)
        else:
            f_sum, n_images = stats
            if n_images.item() == 0:
                return {"max_f": math.nan}
            f = f_sum / n_images
        return {"max_f": float(f.max()) * 100}
