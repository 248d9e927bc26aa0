"""Task kinds: building, shapes, and every loss against hand-computed values on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from dymu.errors import UserError
from dymu.tasks import IGNORE_INDEX, TASK_KINDS, TaskSpec, build_task

LN3 = math.log(3.0)  # logits (0, ln 3) -> softmax (1/4, 3/4); sigmoid(ln 3) = 3/4


def task(kind: str, num_classes: int | None = None, **options):
    return build_task(TaskSpec(kind, kind, num_classes=num_classes), **options)


# -- registry and construction ---------------------------------------------------------------


def test_registry_lists_all_kinds():
    assert TASK_KINDS.names() == sorted(
        ["semseg", "parts", "depth", "normals", "edges", "saliency", "classification"]
    )


@pytest.mark.parametrize(
    ("kind", "channels", "dense"),
    [
        ("semseg", 5, True),
        ("parts", 5, True),
        ("classification", 5, False),
        ("depth", 1, True),
        ("normals", 3, True),
        ("edges", 1, True),
        ("saliency", 1, True),
    ],
)
def test_attributes(kind, channels, dense):
    t = build_task(TaskSpec("out", kind, num_classes=5))
    assert (t.name, t.kind, t.out_channels, t.dense) == ("out", kind, channels, dense)
    assert t.primary_metric in t.metric_directions
    assert set(t.new_metric().directions) == set(t.metric_directions)


def test_directions():
    assert task("semseg", 3).metric_directions == {"miou": True, "pixel_acc": True}
    assert task("depth").metric_directions == {"abs_err": False, "rel_err": False}
    assert task("normals").metric_directions == {
        "mean_angle": False,
        "median_angle": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }
    assert task("edges").metric_directions == {"f_measure": True}
    assert task("saliency").metric_directions == {"max_f": True}
    assert task("classification", 3).metric_directions == {"accuracy": True}


@pytest.mark.parametrize("kind", ["semseg", "parts", "classification"])
def test_missing_num_classes_is_user_error(kind):
    with pytest.raises(UserError, match="num_classes"):
        build_task(TaskSpec("x", kind))


def test_class_names_must_match():
    with pytest.raises(UserError, match="class_names"):
        build_task(TaskSpec("x", "semseg", num_classes=3, class_names=("a", "b")))


def test_unknown_kind_lists_options():
    with pytest.raises(UserError, match=r"unknown task kind 'segm'.*semseg"):
        build_task(TaskSpec("x", "segm"))


def test_bad_options():
    with pytest.raises(UserError, match="takes no option pos_weight"):
        task("depth", pos_weight=0.9)
    with pytest.raises(UserError, match="pos_weight"):
        task("edges", pos_weight=1.5)
    with pytest.raises(UserError, match="tolerance"):
        task("edges", tolerance=-1)
    with pytest.raises(UserError, match="convention"):
        task("saliency", convention="image")


def test_kind_mismatch():
    from dymu.tasks.kinds import DepthTask

    with pytest.raises(UserError, match="kind"):
        DepthTask(TaskSpec("x", "semseg", num_classes=3))


def test_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match="does not fit target"):
        task("depth").loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="C=3"):
        task("semseg", 3).loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


# -- losses -----------------------------------------------------------------------------------


def test_semseg_cross_entropy_ignores_minus_one():
    # 1 x 2 classes x 1 x 3 pixels; pixel logits (0, ln3) -> p = (1/4, 3/4)
    pred = torch.tensor([[[[0.0, 0.0, 0.0]], [[LN3, LN3, 100.0]]]])
    target = torch.tensor([[[1, 0, IGNORE_INDEX]]])
    want = (-math.log(3 / 4) - math.log(1 / 4)) / 2  # the ignored pixel would cost 100
    assert task("semseg", 2).loss(pred, target).item() == pytest.approx(want, rel=1e-6)
    assert task("parts", 2).loss(pred, target).item() == pytest.approx(want, rel=1e-6)


def test_semseg_pools_pixels_over_batch():
    # image 0 has 1 valid pixel, image 1 has 3: a pixel mean, not a mean of image means
    pred = torch.zeros(2, 2, 1, 3)
    pred[:, 1] = LN3
    target = torch.tensor([[[0, -1, -1]], [[1, 1, 1]]])
    want = (-math.log(1 / 4) - 3 * math.log(3 / 4)) / 4
    assert task("semseg", 2).loss(pred, target).item() == pytest.approx(want, rel=1e-6)


def test_classification_cross_entropy():
    pred = torch.tensor([[0.0, LN3], [0.0, LN3], [50.0, 0.0]])
    target = torch.tensor([1, 0, IGNORE_INDEX])
    want = (-math.log(3 / 4) - math.log(1 / 4)) / 2
    assert task("classification", 2).loss(pred, target).item() == pytest.approx(want, rel=1e-6)


def test_depth_l1_on_valid_pixels():
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    target = torch.tensor([[[[2.0, 0.0], [1.0, 4.0]]]])  # 0 = no measurement
    assert task("depth").loss(pred, target).item() == pytest.approx((1 + 2 + 0) / 3)


def test_normals_cosine_loss():
    # pixels: same direction (scaled), orthogonal, 45 degrees, invalid (zero target)
    pred = torch.tensor([[2.0, 0.0, 1.0, 5.0], [0.0, 1.0, 1.0, 5.0], [0.0, 0.0, 0.0, 5.0]])
    target = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    pred, target = pred.view(1, 3, 2, 2), target.view(1, 3, 2, 2)  # [3, 4] -> [B=1, 3, 2, 2]
    want = (0.0 + 1.0 + (1 - 1 / math.sqrt(2))) / 3
    assert task("normals").loss(pred, target).item() == pytest.approx(want, rel=1e-6)


def test_edges_balanced_bce():
    # logits ln3, 0, -ln3, 5 -> p = 3/4, 1/2, 1/4, (ignored); targets 1, 0, 0, -1
    pred = torch.tensor([[[[LN3, 0.0], [-LN3, 5.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.0, -1.0]]]])
    log_pos = math.log(3 / 4)  # log p of the edge pixel
    log_neg = math.log(1 / 2) + math.log(3 / 4)  # sum log(1 - p) of the two non-edges
    beta = 2 / 3  # fraction of non-edge pixels among the 3 valid ones
    want = -(beta * log_pos + (1 - beta) * log_neg) / 3
    assert task("edges").loss(pred, target).item() == pytest.approx(want, rel=1e-6)
    want_fixed = -(0.95 * log_pos + 0.05 * log_neg) / 3
    got_fixed = task("edges", pos_weight=0.95).loss(pred, target).item()
    assert got_fixed == pytest.approx(want_fixed, rel=1e-6)


def test_saliency_bce_with_soft_target():
    pred = torch.tensor([[[[LN3, LN3], [0.0, 7.0]]]])
    target = torch.tensor([[[[1.0, 0.0], [0.5, -1.0]]]])
    want = (-math.log(3 / 4) - math.log(1 / 4) + math.log(2)) / 3
    assert task("saliency").loss(pred, target).item() == pytest.approx(want, rel=1e-6)


INVALID_TARGETS = {
    "semseg": lambda: torch.full((2, 3, 3), IGNORE_INDEX),
    "parts": lambda: torch.full((2, 3, 3), IGNORE_INDEX),
    "classification": lambda: torch.full((2,), IGNORE_INDEX),
    "depth": lambda: torch.zeros(2, 1, 3, 3),
    "normals": lambda: torch.zeros(2, 3, 3, 3),
    "edges": lambda: torch.full((2, 1, 3, 3), -1.0),
    "saliency": lambda: torch.full((2, 1, 3, 3), -1.0),
}


@pytest.mark.parametrize("kind", sorted(INVALID_TARGETS))
def test_all_invalid_batch_gives_zero_with_grad(kind):
    t = task(kind, 3)
    shape = (2, t.out_channels, 3, 3) if t.dense else (2, t.out_channels)
    pred = torch.randn(shape, requires_grad=True)
    loss = t.loss(pred, INVALID_TARGETS[kind]())
    assert loss.requires_grad and loss.dim() == 0
    assert loss.item() == 0.0 and math.copysign(1.0, loss.item()) > 0  # +0, not NaN or -0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    # the value does not even see a NaN prediction at an invalid pixel
    assert t.loss(torch.full(shape, float("nan")), INVALID_TARGETS[kind]()).item() == 0.0


@pytest.mark.parametrize("kind", sorted(INVALID_TARGETS))
def test_loss_backpropagates(kind):
    torch.manual_seed(0)
    t = task(kind, 3)
    shape = (2, t.out_channels, 3, 3) if t.dense else (2, t.out_channels)
    pred = torch.randn(shape, requires_grad=True)
    target = {
        "semseg": torch.randint(0, 3, (2, 3, 3)),
        "parts": torch.randint(0, 3, (2, 3, 3)),
        "classification": torch.randint(0, 3, (2,)),
        "depth": torch.rand(2, 1, 3, 3) + 0.5,
        "normals": torch.nn.functional.normalize(torch.randn(2, 3, 3, 3), dim=1),
        "edges": (torch.rand(2, 1, 3, 3) > 0.7).float(),
        "saliency": torch.rand(2, 1, 3, 3),
    }[kind]
    t.loss(pred, target).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


# -- predict ----------------------------------------------------------------------------------


def test_predict_outputs_target_space():
    logits = torch.tensor([[[[0.0, 2.0]], [[1.0, -1.0]]]])  # [1, 2, 1, 2]
    assert task("semseg", 2).predict(logits).tolist() == [[[1, 0]]]
    assert task("classification", 2).predict(torch.tensor([[0.1, 0.3]])).tolist() == [1]
    z = torch.tensor([[[[0.0, LN3]]]])
    assert task("edges").predict(z).flatten().tolist() == pytest.approx([0.5, 0.75])
    assert task("saliency").predict(z).flatten().tolist() == pytest.approx([0.5, 0.75])
    assert torch.equal(task("depth").predict(z), z)
    n = task("normals").predict(torch.tensor([3.0, 0.0, 4.0]).view(1, 3, 1, 1))
    assert n.flatten().tolist() == pytest.approx([0.6, 0.0, 0.8])


def test_conventions_are_recorded():
    assert task("saliency").conventions["max_f"] == "beta2=0.3, dataset"
    sal = task("saliency", convention="per_image")
    assert sal.convention == "per_image"
    assert sal.new_metric().convention == "per_image"
    assert "tolerance 2 px" in task("edges", tolerance=2).conventions["f_measure"]
