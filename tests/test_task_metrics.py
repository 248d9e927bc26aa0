"""Metric accumulators against hand-computed values, brute-force references and state sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dymu.errors import UserError
from dymu.tasks import IGNORE_INDEX, TaskSpec, build_task
from dymu.tasks.metrics import EdgeFMeasure, SaliencyMaxF


def task(kind: str, num_classes: int | None = None, **options):
    return build_task(TaskSpec(kind, kind, num_classes=num_classes), **options)


def logits_of(ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class-id map [B, H, W] -> logits [B, C, H, W] whose argmax is ``ids``."""
    return F.one_hot(ids, num_classes).permute(0, 3, 1, 2).float() * 5


def logit(p) -> torch.Tensor:
    """Probabilities -> logits, so tests can state predictions as probabilities."""
    p = torch.as_tensor(p, dtype=torch.float32)
    return torch.log(p / (1 - p))


def run(metric, *batches):
    for pred, target in batches:
        metric.update(pred, target)
    return metric.compute()


# -- semseg / parts / classification ---------------------------------------------------------


def test_miou_ignores_index_and_absent_classes():
    target = torch.tensor([[[0, 0], [1, IGNORE_INDEX]]])
    pred = logits_of(torch.tensor([[[0, 1], [1, 2]]]), 3)  # class 2 only at the ignored pixel
    got = run(task("semseg", 3).new_metric(), (pred, target))
    # IoU0 = 1 / (2 + 1 - 1), IoU1 = 1 / (1 + 2 - 1); class 2 seen nowhere valid -> excluded
    assert got["miou"] == pytest.approx(50.0)
    assert got["pixel_acc"] == pytest.approx(200 / 3)


def test_miou_counts_predicted_only_class_as_zero():
    target = torch.tensor([[[0, 0]]])
    pred = logits_of(torch.tensor([[[0, 2]]]), 3)
    got = run(task("parts", 3).new_metric(), (pred, target))
    assert got == pytest.approx({"miou": 25.0, "pixel_acc": 50.0})  # (1/2 + 0) / 2


def test_miou_is_dataset_level():
    m = task("semseg", 3).new_metric()
    m.update(logits_of(torch.tensor([[[0, 1], [1, 2]]]), 3), torch.tensor([[[0, 0], [1, -1]]]))
    m.update(logits_of(torch.tensor([[[0, 2]]]), 3), torch.tensor([[[0, 0]]]))
    # pooled confusion: IoU0 = 2/4, IoU1 = 1/2, IoU2 = 0/1 (the mean of batch mIoUs is 37.5)
    assert m.compute() == pytest.approx({"miou": 100 / 3, "pixel_acc": 60.0})
    assert m.per_class_iou() == pytest.approx([50.0, 50.0, 0.0])


def test_class_id_out_of_range():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        task("semseg", 3).new_metric().update(torch.zeros(1, 3, 1, 1), torch.tensor([[[3]]]))


def test_accuracy_over_labelled_samples():
    pred = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    target = torch.tensor([1, 1, IGNORE_INDEX])
    got = run(task("classification", 3).new_metric(), (pred, target))
    assert got == {"accuracy": pytest.approx(50.0)}


# -- depth ------------------------------------------------------------------------------------


def test_depth_errors_pooled_over_valid_pixels():
    m = task("depth").new_metric()
    pred1 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target1 = torch.tensor([[[[2.0, 0.0], [1.0, 4.0]]]])  # errors 1, -, 2, 0
    pred2, target2 = torch.tensor([[[[1.0]]]]), torch.tensor([[[[4.0]]]])  # error 3
    got = run(m, (pred1, target1), (pred2, target2))
    assert got["abs_err"] == pytest.approx((1 + 2 + 0 + 3) / 4)
    assert got["rel_err"] == pytest.approx((1 / 2 + 2 / 1 + 0 + 3 / 4) / 4)


# -- normals ----------------------------------------------------------------------------------


def normals_at(angles_deg, invalid: int = 0):
    """Predictions at the given angles from the target (1, 0, 0), plus invalid pixels."""
    a = torch.deg2rad(torch.tensor(angles_deg + [0.0] * invalid, dtype=torch.float64))
    pred = torch.stack([a.cos(), a.sin(), torch.zeros_like(a)]).float()  # [3, N]
    target = torch.zeros_like(pred)
    target[0, : len(angles_deg)] = 1.0
    n = pred.shape[1]
    return pred.view(1, 3, 1, n), target.view(1, 3, 1, n)  # [3, N] -> [1, 3, 1, N]


def test_normals_angles_odd_count():
    got = run(task("normals").new_metric(), normals_at([0.0, 10.0, 20.0, 45.0, 90.0], invalid=2))
    assert got["mean_angle"] == pytest.approx(33.0, abs=1e-4)
    assert got["median_angle"] == pytest.approx(20.0, abs=0.006)  # histogram bin of 0.01 deg
    assert got["within_11.25"] == pytest.approx(40.0)
    assert got["within_22.5"] == pytest.approx(60.0)
    assert got["within_30"] == pytest.approx(60.0)


def test_normals_median_even_count_across_batches():
    m = task("normals").new_metric()
    got = run(m, normals_at([10.0, 40.0]), normals_at([31.0, 20.0], invalid=1))
    assert got["median_angle"] == pytest.approx(25.5, abs=0.006)
    assert got["mean_angle"] == pytest.approx(25.25, abs=1e-4)
    assert got["within_30"] == pytest.approx(50.0)


def test_normals_median_matches_numpy():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 5, 5), F.normalize(torch.randn(2, 3, 5, 5), dim=1)
    got = run(task("normals").new_metric(), (pred, target))
    cos = (F.normalize(pred, dim=1) * target).sum(1).double().clamp(-1, 1)
    angles = np.degrees(np.arccos(cos.numpy()))
    assert got["median_angle"] == pytest.approx(np.median(angles), abs=0.006)
    assert got["mean_angle"] == pytest.approx(angles.mean(), abs=1e-3)


def test_normals_zero_prediction_counts_as_90_degrees():
    pred, target = torch.zeros(1, 3, 1, 1), torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert run(task("normals").new_metric(), (pred, target))["mean_angle"] == pytest.approx(90)


# -- edges ------------------------------------------------------------------------------------


def edge_case():
    """3x3: GT edges at (0,0) and (2,2), (1,1) ignored; predictions next to / on them."""
    target = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])
    prob = torch.tensor([[0.001, 0.8, 0.001], [0.001, 0.9, 0.001], [0.001, 0.001, 0.6]])
    return logit(prob).view(1, 1, 3, 3), target.view(1, 1, 3, 3)


def test_edge_f_measure_with_tolerance():
    # tolerance 1: at t <= 0.6 both predictions touch a GT edge and both GT edges are
    # recalled -> P = R = 1. The ignored (1,1) with p = 0.9 must not count.
    assert run(task("edges").new_metric(), edge_case()) == {"f_measure": pytest.approx(100.0)}


def test_edge_f_measure_exact_match():
    # tolerance 0: at t <= 0.6, TP = 1 ((2,2)), FP = 1 ((0,1)), recall 1/2 -> F = 1/2;
    # had the ignored pixel counted, F would be 0.4.
    got = run(task("edges", tolerance=0).new_metric(), edge_case())
    assert got == {"f_measure": pytest.approx(50.0)}


def test_edge_f_measure_takes_best_threshold():
    # one row, GT [1, 0, 0, 0, 1], p [.9, .7, 0, 0, .5], tolerance 0:
    # t <= .5: P 2/3, R 1 -> F .8; (.5, .7]: P 1/2, R 1/2 -> .5; (.7, .9]: P 1, R 1/2 -> 2/3
    pred = logit([0.9, 0.7, 0.001, 0.001, 0.5]).view(1, 1, 1, 5)
    target = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0]).view(1, 1, 1, 5)
    got = run(EdgeFMeasure(tolerance=0), (pred, target))
    assert got == {"f_measure": pytest.approx(80.0)}


def dilate(mask: np.ndarray, tol: int) -> np.ndarray:
    """Square dilation of a [H, W] bool mask by explicit shifts (independent of max_pool)."""
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(-tol, tol + 1):
        for dx in range(-tol, tol + 1):
            shifted = np.zeros_like(mask)
            ys, yd = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
            xs, xd = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
            shifted[yd, xd] = mask[ys, xs]
            out |= shifted
    return out


def edge_reference(probs: np.ndarray, targets: np.ndarray, tol: int) -> float:
    """Brute-force ODS F over thresholds, images [N, H, W], looping thresholds and images."""
    best = 0.0
    for t in (np.arange(1, 100, dtype=np.float64) / 100).astype(np.float32):
        tp = fp = rec = n_gt = 0
        for p, y in zip(probs, targets, strict=True):
            valid, gt = y >= 0, y >= 0.5
            det = (p >= t) & valid
            near = dilate(gt, tol)
            tp += (det & near).sum()
            fp += (det & ~near).sum()
            rec += (gt & dilate(det, tol)).sum()
            n_gt += gt.sum()
        prec = tp / (tp + fp) if tp + fp else 0.0
        recall = rec / n_gt if n_gt else 0.0
        if prec + recall:
            best = max(best, 2 * prec * recall / (prec + recall))
    return best * 100


@pytest.mark.parametrize("tol", [0, 1, 2])
def test_edge_f_measure_matches_brute_force(tol):
    g = torch.Generator().manual_seed(tol)
    pred = torch.randn(3, 1, 7, 6, generator=g) * 2
    target = (torch.rand(3, 1, 7, 6, generator=g) > 0.8).float()
    target[torch.rand(3, 1, 7, 6, generator=g) > 0.85] = -1
    got = run(EdgeFMeasure(tolerance=tol), (pred[:2], target[:2]), (pred[2:], target[2:]))
    want = edge_reference(torch.sigmoid(pred)[:, 0].numpy(), target[:, 0].numpy(), tol)
    assert got["f_measure"] == pytest.approx(want, rel=1e-9)


# -- saliency ---------------------------------------------------------------------------------


def saliency_case():
    """Two 1x3 images; the last pixel of each is ignored (with p = 0.99 that must not count).

    A: GT [1, 0], p [.83, .33]; B: GT [1, 1], p [.63, .23].
    """
    target = torch.tensor([[1.0, 0.0, -1.0], [1.0, 1.0, -1.0]]).view(2, 1, 1, 3)
    pred = logit([[0.83, 0.33, 0.99], [0.63, 0.23, 0.99]]).view(2, 1, 1, 3)
    return pred, target


def test_saliency_max_f_dataset_counts():
    # pooled: t in (.33, .63] gives TP 2, FP 0, #GT 3 -> P 1, R 2/3 -> F = 1.3 (2/3) / (.3 + 2/3)
    got = run(task("saliency").new_metric(), saliency_case())
    assert got == {"max_f": pytest.approx(100 * 1.3 * (2 / 3) / (0.3 + 2 / 3))}


def test_saliency_max_f_per_image():
    # at t in (.33, .63]: F_A = 1 (P 1, R 1), F_B = 1.3 * .5 / (.3 + .5) = .8125 -> mean .90625
    got = run(task("saliency", convention="per_image").new_metric(), saliency_case())
    assert got == {"max_f": pytest.approx(90.625)}


def saliency_per_image_reference(probs: np.ndarray, targets: np.ndarray) -> float:
    best = 0.0
    for t in (np.arange(1, 100, dtype=np.float64) / 100).astype(np.float32):
        fs = []
        for p, y in zip(probs, targets, strict=True):
            valid, gt = y >= 0, y >= 0.5
            if not valid.any():
                continue
            det = (p >= t) & valid
            tp = (det & gt).sum()
            prec = tp / det.sum() if det.sum() else 0.0
            rec = tp / gt.sum() if gt.sum() else 0.0
            fs.append(1.3 * prec * rec / (0.3 * prec + rec) if prec + rec else 0.0)
        best = max(best, float(np.mean(fs)))
    return best * 100


def test_saliency_per_image_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    pred = torch.randn(4, 1, 5, 5, generator=g) * 2
    target = torch.rand(4, 1, 5, 5, generator=g)
    target[3] = -1  # an image without valid pixels is skipped, not averaged as 0
    target[2] = 0.1  # an image without foreground has F = 0
    got = run(SaliencyMaxF("per_image"), (pred[:3], target[:3]), (pred[3:], target[3:]))
    want = saliency_per_image_reference(torch.sigmoid(pred)[:, 0].numpy(), target[:, 0].numpy())
    assert got["max_f"] == pytest.approx(want, rel=1e-9)


# -- generic properties -----------------------------------------------------------------------

KINDS = [
    ("semseg", {}),
    ("parts", {}),
    ("classification", {}),
    ("depth", {}),
    ("normals", {}),
    ("edges", {}),
    ("edges", {"tolerance": 0}),
    ("saliency", {}),
    ("saliency", {"convention": "per_image"}),
]


def random_batch(kind: str, g: torch.Generator, b: int = 2, c: int = 4, h: int = 5, w: int = 6):
    """A random raw head output and target with some invalid entries."""
    if kind in ("semseg", "parts"):
        y = torch.randint(-1, c, (b, h, w), generator=g)
        return torch.randn(b, c, h, w, generator=g), y
    if kind == "classification":
        return torch.randn(b, c, generator=g), torch.randint(-1, c, (b,), generator=g)
    if kind == "depth":
        y = torch.rand(b, 1, h, w, generator=g) * 3
        y[y < 0.5] = 0
        return torch.rand(b, 1, h, w, generator=g) * 3, y
    if kind == "normals":
        y = F.normalize(torch.randn(b, 3, h, w, generator=g), dim=1)
        y[:, :, 0] = 0
        return torch.randn(b, 3, h, w, generator=g), y
    y = (torch.rand(b, 1, h, w, generator=g) > 0.7).float()
    y[:, :, :, 0] = -1
    return torch.randn(b, 1, h, w, generator=g), y


@pytest.mark.parametrize(("kind", "options"), KINDS)
def test_summed_states_equal_one_accumulator(kind, options):
    g = torch.Generator().manual_seed(1)
    t = task(kind, 4, **options)
    batches = [random_batch(kind, g) for _ in range(3)]
    one, first, second, merged = (t.new_metric() for _ in range(4))
    for batch in batches:
        one.update(*batch)
    first.update(*batches[0])
    for batch in batches[1:]:
        second.update(*batch)
    merged.load_state([a + b for a, b in zip(first.state(), second.state(), strict=True)])
    assert merged.compute() == pytest.approx(one.compute(), rel=1e-12)
    assert set(one.compute()) == set(t.metric_directions)
    assert all(s.dtype == torch.float64 for s in one.state())


@pytest.mark.parametrize(("kind", "options"), KINDS)
def test_reset_and_empty_give_nan(kind, options):
    g = torch.Generator().manual_seed(2)
    t = task(kind, 4, **options)
    m = t.new_metric()
    assert all(math.isnan(v) for v in m.compute().values())
    m.update(*random_batch(kind, g))
    assert all(math.isfinite(v) for v in m.compute().values())
    m.reset()
    assert all(math.isnan(v) for v in m.compute().values())
    assert all(not s.any() for s in m.state())
    pred, target = random_batch(kind, g)
    invalid = {"semseg": -1, "parts": -1, "classification": -1, "depth": 0, "normals": 0}
    m.update(pred, torch.full_like(target, invalid.get(kind, -1)))  # a batch with nothing valid
    assert all(math.isnan(v) for v in m.compute().values())


def test_state_is_a_copy_and_load_checks_shapes():
    m = task("semseg", 3).new_metric()
    m.state()[0] += 1
    assert not m.state()[0].any()
    with pytest.raises(UserError, match="state shapes"):
        m.load_state([torch.zeros(4, 4, dtype=torch.float64)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("kind", "options"), KINDS)
def test_cuda_matches_cpu(kind, options):
    g = torch.Generator().manual_seed(4)
    t = task(kind, 4, **options)
    cpu, gpu = t.new_metric(), t.new_metric()
    for _ in range(2):
        pred, target = random_batch(kind, g)
        cpu.update(pred, target)
        gpu.update(pred.cuda(), target.cuda())
    assert gpu.state()[0].is_cuda
    assert gpu.compute() == pytest.approx(cpu.compute(), rel=1e-5, abs=1e-4)
