"""delta_m: sign convention (positive = better), per-task vs pooled averaging, bad input."""

from __future__ import annotations

import pytest

from dymu.errors import UserError
from dymu.tasks import TaskSpec, build_task, delta_m, delta_m_per_task

BASE = {"semseg": {"miou": 50.0, "pixel_acc": 80.0}, "depth": {"abs_err": 0.5}}
DIRS = {"semseg": {"miou": True, "pixel_acc": True}, "depth": {"abs_err": False}}
# miou +10 %, pixel_acc -5 %, abs_err 0.5 -> 0.4 is 20 % better
RESULT = {"semseg": {"miou": 55.0, "pixel_acc": 76.0}, "depth": {"abs_err": 0.4}}


def test_improvements_are_positive():
    higher = {"t": {"m": True}}
    lower = {"t": {"m": False}}
    assert delta_m({"t": {"m": 110.0}}, {"t": {"m": 100.0}}, higher) == pytest.approx(10.0)
    assert delta_m({"t": {"m": 90.0}}, {"t": {"m": 100.0}}, lower) == pytest.approx(10.0)
    assert delta_m({"t": {"m": 90.0}}, {"t": {"m": 100.0}}, higher) == pytest.approx(-10.0)
    assert delta_m({"t": {"m": 110.0}}, {"t": {"m": 100.0}}, lower) == pytest.approx(-10.0)


def test_per_task_then_tasks():
    assert delta_m_per_task(RESULT, BASE, DIRS) == pytest.approx({"semseg": 2.5, "depth": 20.0})
    assert delta_m(RESULT, BASE, DIRS) == pytest.approx((2.5 + 20.0) / 2)


def test_pooled_over_all_metrics():
    assert delta_m(RESULT, BASE, DIRS, pooled=True) == pytest.approx((10 - 5 + 20) / 3)


def test_only_metrics_in_directions_enter():
    primary = {"semseg": {"miou": True}, "depth": {"abs_err": False}}
    extra = {"semseg": {**RESULT["semseg"], "other": 1.0}, "depth": RESULT["depth"], "x": {}}
    assert delta_m(extra, BASE, primary) == pytest.approx((10 + 20) / 2)


def test_baseline_equal_to_result_is_zero():
    assert delta_m(BASE, BASE, DIRS) == 0.0


def test_with_task_directions():
    tasks = [
        build_task(TaskSpec("semseg", "semseg", num_classes=3)),
        build_task(TaskSpec("depth", "depth")),
    ]
    dirs = {t.name: {t.primary_metric: t.metric_directions[t.primary_metric]} for t in tasks}
    assert delta_m(RESULT, BASE, dirs) == pytest.approx(15.0)


def test_missing_metric_is_named():
    with pytest.raises(UserError, match="results lack depth/abs_err"):
        delta_m({"semseg": RESULT["semseg"]}, BASE, DIRS)
    with pytest.raises(UserError, match="baselines lack semseg/pixel_acc"):
        delta_m(RESULT, {"semseg": {"miou": 50.0}, "depth": {"abs_err": 0.5}}, DIRS)


def test_zero_baseline_is_named():
    base = {"semseg": {"miou": 0.0, "pixel_acc": 80.0}, "depth": {"abs_err": 0.5}}
    with pytest.raises(UserError, match="baseline semseg/miou is 0"):
        delta_m(RESULT, base, DIRS)


def test_non_finite_and_empty():
    with pytest.raises(UserError, match="non-finite"):
        delta_m({"t": {"m": float("nan")}}, {"t": {"m": 1.0}}, {"t": {"m": True}})
    with pytest.raises(UserError, match="no tasks"):
        delta_m({}, {}, {})
    with pytest.raises(UserError, match="no metrics"):
        delta_m({}, {}, {"t": {}})
