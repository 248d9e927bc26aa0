"""The embedded dataset: deterministic, and its targets agree with one geometry."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dymu.config import DataConfig, SynthConfig
from dymu.data import get_builder, load_split, render
from dymu.data.synthscenes import HFOV_DEG, MATERIAL_CLASSES, SEMSEG_CLASSES, generate

SYNTH = SynthConfig(num_train=24, num_val=8, num_test=8)


@pytest.fixture(scope="module")
def scenes():
    return generate(64, 64, 64, SYNTH, seed=1)


def test_shapes_dtypes_and_ranges(scenes):
    n = 64
    assert scenes["image"].shape == (n, 64, 64, 3) and scenes["image"].dtype == np.uint8
    assert scenes["semseg"].max() < len(SEMSEG_CLASSES) and len(SEMSEG_CLASSES) >= 5
    assert scenes["material"].max() < len(MATERIAL_CLASSES)
    assert scenes["depth"].dtype == np.float16 and scenes["depth"].min() > 0
    assert np.isfinite(scenes["depth"].astype(np.float32)).all()
    norms = np.linalg.norm(scenes["normals"].astype(np.float32) / 127.0, axis=-1)
    assert np.abs(norms - 1).max() < 0.02
    assert set(np.unique(scenes["edges"])) == {0, 1}


def test_deterministic_from_seed(scenes):
    again = generate(64, 64, 64, SYNTH, seed=1)
    other = generate(64, 64, 64, SYNTH, seed=2)
    for key in scenes:
        np.testing.assert_array_equal(scenes[key], again[key])
    assert not np.array_equal(scenes["image"], other["image"])


def test_objects_are_large_and_every_class_occurs(scenes):
    semseg = scenes["semseg"]
    assert (semseg >= 2).mean() > 0.2  # objects cover a real share of the pixels
    counts = np.bincount(semseg.ravel(), minlength=len(SEMSEG_CLASSES))
    assert (counts / counts.sum() > 0.03).all()


def _backprojected_normals(depth: np.ndarray) -> np.ndarray:
    """Normals [N, H-2, W-2, 3] from depth alone: cross product of central differences."""
    _, h, w = depth.shape
    rays = render.pixel_rays(h, w, HFOV_DEG).reshape(3, h, w).transpose(1, 2, 0)  # [H, W, 3]
    pts = depth[..., None] * rays  # [N, H, W, 3] camera-frame points
    dx = pts[:, 1:-1, 2:] - pts[:, 1:-1, :-2]
    dy = pts[:, :-2, 1:-1] - pts[:, 2:, 1:-1]  # image rows grow downwards, camera y upwards
    nrm = np.cross(dx, dy)
    nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True) + 1e-12
    facing = np.sign(-(nrm * pts[:, 1:-1, 1:-1]).sum(-1, keepdims=True))
    return nrm * facing


def test_normals_agree_with_depth():
    out = generate(16, 64, 64, SYNTH, seed=3)
    depth = out["depth"].astype(np.float64)
    stored = out["normals"].astype(np.float64)[:, 1:-1, 1:-1] / 127.0
    stored /= np.linalg.norm(stored, axis=-1, keepdims=True)
    from_depth = _backprojected_normals(depth)
    # Interior pixels only: no edge in the 3x3 neighbourhood.
    e = out["edges"].astype(bool)
    near_edge = np.zeros_like(e[:, 1:-1, 1:-1])
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            near_edge |= e[:, 1 + di : e.shape[1] - 1 + di, 1 + dj : e.shape[2] - 1 + dj]
    cos = np.clip((stored * from_depth).sum(-1)[~near_edge], -1, 1)
    angle = np.degrees(np.arccos(cos))
    assert np.median(angle) < 2.0
    assert np.mean(angle < 15.0) > 0.9


def test_edges_follow_segments_and_depth_jumps(scenes):
    seg = scenes["semseg"]
    edges = scenes["edges"].astype(bool)
    change = seg[:, :, 1:] != seg[:, :, :-1]  # horizontal class changes
    assert edges[:, :, 1:][change].all() and edges[:, :, :-1][change].all()
    depth = scenes["depth"].astype(np.float32)
    jump = np.abs(depth[:, 1:] - depth[:, :-1]) > 0.2 * np.minimum(depth[:, 1:], depth[:, :-1])
    assert edges[:, 1:][jump].all()
    # Away from any change of segment or depth there are no edges.
    smooth = (~change) & (np.abs(depth[:, :, 1:] - depth[:, :, :-1]) < 0.01 * depth[:, :, 1:])
    assert edges[:, :, 1:][smooth].mean() < 0.2


def test_floor_normal_is_the_tilted_up_vector(scenes):
    floor = scenes["semseg"] == 0
    n = scenes["normals"].astype(np.float32)[floor] / 127.0
    # Camera pitched down by 16-26 degrees: world up is (0, cos p, -sin p) in the camera
    # frame (it leans towards the camera, whose z axis points into the scene).
    assert np.abs(n[:, 0]).max() < 0.02
    pitch = np.degrees(np.arctan2(-n[:, 2], n[:, 1]))
    assert pitch.min() > 15.5 and pitch.max() < 26.5


def test_colour_shape_correlation_knob():
    def agreement(corr: float) -> float:
        out = generate(128, 32, 32, SynthConfig(color_shape_corr=corr), seed=0)
        obj = out["semseg"] >= 2
        return float(np.mean(out["material"][obj] - 1 == out["semseg"][obj] - 2))

    assert agreement(1.0) == 1.0
    low, high = agreement(0.0), agreement(0.5)
    assert 0.15 < low < 0.35  # chance level with 4 colours
    assert low < high < 1.0


def test_cast_single_sphere_hand_computed():
    # A unit sphere 5 units ahead: the ray through the image centre hits at z = 4 with
    # normal (0, 0, -1); a box 5 units ahead (half-size 1) has its front face at z = 4.
    rays = np.array([[0.0], [0.0], [1.0]], dtype=np.float32)
    scenes = render.SceneBatch(
        floor_n=np.array([[0.0, 1.0, 0.0]] * 2, np.float32),
        floor_k=np.array([-10.0] * 2, np.float32),
        wall_n=np.array([[0.0, 0.0, -1.0]] * 2, np.float32),
        wall_k=np.array([-20.0] * 2, np.float32),
        obj_shape=np.array([[render.SPHERE], [render.BOX]]),
        obj_origin=np.array([[[0.0, 0.0, -5.0]]] * 2, np.float32),
        obj_matrix=np.repeat(np.eye(3, dtype=np.float32)[None, None], 2, 0),
    )
    depth, inst, normals = render.cast(scenes, rays)
    np.testing.assert_allclose(depth[:, 0], [4.0, 4.0], atol=1e-5)
    assert inst.tolist() == [[2], [2]]
    np.testing.assert_allclose(normals[:, 0], [[0, 0, -1], [0, 0, -1]], atol=1e-6)


def test_builder_caches_atomically_and_loads_conventions(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path), size=[32, 32], synth=SYNTH, tasks=None)
    builder = get_builder("synthscenes")
    first = builder.prepare(cfg)
    assert first["created"] and first["splits"] == {"train": 24, "val": 8, "test": 8}
    assert builder.prepare(cfg)["created"] is False
    folder = builder.cache_dir(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]  # no temp dirs left
    assert json.loads((folder / "meta.json").read_text())["size"] == [32, 32]
    ds = load_split(cfg, "val")
    assert len(ds) == 8 and ds.task_names == ["semseg", "depth", "normals", "edges"]
    s = ds[3]
    assert s["image"].shape == (3, 32, 32) and s["image"].dtype == torch.float32
    assert s["image"].min() >= 0 and s["image"].max() <= 1
    assert s["semseg"].shape == (32, 32) and s["semseg"].dtype == torch.int64
    assert s["depth"].shape == (1, 32, 32) and (s["depth"] > 0).all()
    assert s["normals"].shape == (3, 32, 32)
    torch.testing.assert_close(s["normals"].norm(dim=0), torch.ones(32, 32))
    assert s["edges"].shape == (1, 32, 32)
    batch = ds.batch(np.array([0, 3]))
    torch.testing.assert_close(batch["depth"][1], s["depth"])
    other = DataConfig(cache_dir=str(tmp_path), size=[32, 32], synth=SYNTH, seed=1)
    assert builder.cache_dir(other) != folder  # a different seed is a different cache


def test_material_task_and_bad_task_names(tmp_path):
    from dymu.errors import UserError

    cfg = DataConfig(cache_dir=str(tmp_path), size=[32, 32], synth=SYNTH, tasks=["material"])
    assert load_split(cfg, "test").task_names == ["material"]
    bad = DataConfig(cache_dir=str(tmp_path), size=[32, 32], synth=SYNTH, tasks=["sky"])
    with pytest.raises(UserError, match="no task 'sky'; its tasks are: semseg, material"):
        load_split(bad, "test")
    with pytest.raises(UserError, match="unknown split"):
        load_split(cfg, "dev")
