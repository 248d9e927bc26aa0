"""NYU-v2 loader: both on-disk layouts, split protocol, conventions, resizing, errors."""

from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from fixtures_real import write_nyud_mt, write_nyuv2_npy
from PIL import Image

from dymu.config import DataConfig
from dymu.data.base import DATASETS
from dymu.data.imageio import resize_nearest
from dymu.data.nyuv2 import NYUD_MT, NYUV2, detect_layout
from dymu.errors import UserError


def cfg_for(root, name="nyuv2", **kw) -> DataConfig:
    return DataConfig(name=name, root=str(root), **kw)


@pytest.fixture
def npy_root(tmp_path):
    root = tmp_path / "nyuv2"
    written = write_nyuv2_npy(root)
    return root, written


@pytest.fixture
def mt_root(tmp_path):
    root = tmp_path / "nyud_mt"
    written = write_nyud_mt(root)
    return root, written


def test_registered_under_both_names():
    assert DATASETS.get("nyuv2") is NYUV2
    assert DATASETS.get("nyud_mt") is NYUD_MT
    assert NYUV2.info.task("semseg").num_classes == 13
    assert NYUD_MT.info.task("semseg").num_classes == 40


# --------------------------------------------------------------------------- npy layout


def test_npy_values_round_trip(npy_root):
    root, written = npy_root
    ds = NYUV2.load(cfg_for(root), "test")
    assert ds.ids == ["0", "1"] and ds.task_names == ["semseg", "depth", "normals"]
    for i, ref in written["val"].items():
        s = ds[i]
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 16, 24)
        np.testing.assert_allclose(s["image"].permute(1, 2, 0).numpy(), ref["image"])
        assert s["semseg"].dtype == torch.int64 and s["semseg"].shape == (16, 24)
        np.testing.assert_array_equal(s["semseg"].numpy(), ref["label"].astype(np.int64))
        assert (s["semseg"][0] == -1).all()  # -1 stays the ignore value
        assert s["depth"].dtype == torch.float32 and s["depth"].shape == (1, 16, 24)
        np.testing.assert_array_equal(s["depth"][0].numpy(), ref["depth"][..., 0])
        assert (s["depth"][0, -1] == 0).all()  # 0 stays "no measurement"
        assert s["normals"].shape == (3, 16, 24)
        np.testing.assert_allclose(s["normals"].permute(1, 2, 0).numpy(), ref["normal"], atol=1e-6)
        assert (s["normals"][:, :2, :2] == 0).all()  # all-zero stays invalid


def test_npy_split_protocol_and_prepare(npy_root):
    root, _ = npy_root
    cfg = cfg_for(root)
    summary = NYUV2.prepare(cfg, progress=True)
    assert summary == {
        "dataset": "nyuv2",
        "root": str(root),
        "layout": "npy",
        "tasks": ["semseg", "depth", "normals"],
        "splits": {"train": 2, "val": 1, "test": 2},
    }
    train, val = NYUV2.load(cfg, "train"), NYUV2.load(cfg, "val")
    assert sorted(train.ids + val.ids, key=int) == ["0", "1", "2"]
    assert not set(train.ids) & set(val.ids)
    assert NYUV2.load(cfg, "val").ids == val.ids  # deterministic for one seed
    seeds = {tuple(NYUV2.load(cfg_for(root, seed=s), "val").ids) for s in range(8)}
    assert len(seeds) > 1  # the hold-out follows data.seed


def test_npy_indices_sort_numerically(tmp_path):
    write_nyuv2_npy(tmp_path, n_train=2, n_val=11, h=8, w=8)
    ds = NYUV2.load(cfg_for(tmp_path), "test")
    assert ds.ids == [str(i) for i in range(11)]


def test_npy_size_override_is_nearest_for_targets(npy_root):
    root, written = npy_root
    ds = NYUV2.load(cfg_for(root, size=[32, 48]), "test")
    s, ref = ds[1], written["val"][1]
    assert s["image"].shape == (3, 32, 48) and 0 <= s["image"].min() <= s["image"].max() <= 1
    up = ref["label"].repeat(2, axis=0).repeat(2, axis=1).astype(np.int64)
    np.testing.assert_array_equal(s["semseg"].numpy(), up)
    assert s["depth"].shape == (1, 32, 48) and (s["depth"][0, -2:] == 0).all()
    norm = s["normals"].norm(dim=0)
    assert torch.all(((norm - 1).abs() < 1e-5) | (norm == 0))
    assert (s["normals"][:, :4, :4] == 0).all()


def test_resize_nearest_matches_interpolate():
    x = torch.arange(7 * 9, dtype=torch.float32).reshape(1, 1, 7, 9)
    for size in [(3, 4), (14, 18), (10, 5)]:
        ref = torch.nn.functional.interpolate(x, size=size, mode="nearest")
        assert torch.equal(resize_nearest(x, size), ref)
        assert torch.equal(resize_nearest(x.long()[0, 0], size), ref.long()[0, 0])


def test_npy_task_subset_needs_only_its_folders(npy_root):
    root, _ = npy_root
    shutil.rmtree(root / "train" / "label")
    shutil.rmtree(root / "val" / "label")
    cfg = cfg_for(root, tasks=["depth"])
    assert NYUV2.prepare(cfg)["splits"]["test"] == 2
    assert set(NYUV2.load(cfg, "train")[0]) == {"image", "depth"}


def test_dataset_pickles_for_worker_processes(npy_root):
    root, _ = npy_root
    ds = pickle.loads(pickle.dumps(NYUV2.load(cfg_for(root), "train")))
    assert ds[0]["semseg"].shape == (16, 24)


# --------------------------------------------------------------------------- NYUD_MT layout


def test_mt_layout_detected_and_decoded(mt_root):
    root, written = mt_root
    assert detect_layout(root) == "nyud_mt"
    cfg = cfg_for(root)
    info = NYUV2.info_for(cfg)
    assert info.name == "nyuv2" and info.task("semseg").num_classes == 40
    assert info.default_tasks == ("semseg", "depth", "normals", "edges")
    ds = NYUV2.load(cfg, "test")
    assert ds.info.task("semseg").num_classes == 40 and ds.ids == ["0004", "0005"]
    s, ref = ds[0], written["0004"]
    jpg = np.array(Image.open(root / "images" / "0004.jpg").convert("RGB"))
    np.testing.assert_allclose(s["image"].permute(1, 2, 0).numpy(), jpg / 255.0, atol=1e-6)
    seg = ref["segmentation"].astype(np.int64)
    expected = np.where((seg == 0) | (seg == 255), -1, seg - 1)
    np.testing.assert_array_equal(s["semseg"].numpy(), expected)
    assert s["semseg"][1, 0] == -1 and s["semseg"].max() <= 39
    np.testing.assert_array_equal(s["depth"][0].numpy(), ref["depth"])
    np.testing.assert_array_equal(s["edges"][0].numpy(), ref["edge"])
    np.testing.assert_allclose(s["normals"].permute(1, 2, 0).numpy(), ref["normals"], atol=1e-6)


def test_mt_layout_under_its_own_name(mt_root):
    root, _ = mt_root
    summary = NYUD_MT.prepare(cfg_for(root, name="nyud_mt"))
    assert summary["layout"] == "nyud_mt"
    assert summary["splits"] == {"train": 2, "val": 1, "test": 2}


def test_nyud_mt_refuses_the_npy_layout(npy_root):
    root, _ = npy_root
    with pytest.raises(UserError, match=r"data\.name=nyuv2"):
        NYUD_MT.load(cfg_for(root, name="nyud_mt"), "train")


def test_mt_missing_file_is_named(mt_root):
    root, _ = mt_root
    (root / "edge" / "0002.npy").unlink()
    with pytest.raises(UserError, match=r"missing file .*edge[/\\]0002\.npy"):
        NYUV2.prepare(cfg_for(root))
    assert NYUV2.prepare(cfg_for(root, tasks=["semseg"]))["splits"]["train"] == 2


def test_mt_unreadable_image_is_named(mt_root):
    root, _ = mt_root
    (root / "images" / "0005.jpg").write_bytes(b"not a jpeg")
    ds = NYUV2.load(cfg_for(root), "test")
    with pytest.raises(UserError, match=r"malformed file .*0005\.jpg"):
        ds[1]


# --------------------------------------------------------------------------- errors


def test_missing_root():
    with pytest.raises(UserError, match=r"set data\.root"):
        NYUV2.load(DataConfig(name="nyuv2"), "train")


def test_root_does_not_exist(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        NYUV2.prepare(cfg_for(tmp_path / "nowhere"))


def test_unknown_layout(tmp_path):
    with pytest.raises(UserError, match="no known NYU-v2 layout"):
        NYUV2.prepare(cfg_for(tmp_path))


def test_missing_folder_is_named(npy_root):
    root, _ = npy_root
    shutil.rmtree(root / "val" / "normal")
    with pytest.raises(UserError, match=r"folder .*val[/\\]normal does not exist"):
        NYUV2.load(cfg_for(root), "test")


def test_missing_file_is_named(npy_root):
    root, _ = npy_root
    (root / "train" / "depth" / "1.npy").unlink()
    with pytest.raises(UserError, match=r"missing file .*train[/\\]depth[/\\]1\.npy"):
        NYUV2.prepare(cfg_for(root))


def test_extra_target_names_the_missing_image(npy_root):
    root, _ = npy_root
    (root / "train" / "image" / "2.npy").unlink()
    with pytest.raises(UserError, match=r"missing file .*train[/\\]image[/\\]2\.npy"):
        NYUV2.load(cfg_for(root), "train")


def test_wrong_shape_is_named_by_prepare(npy_root):
    root, _ = npy_root
    np.save(root / "val" / "normal" / "1.npy", np.zeros((16, 24), np.float32))
    with pytest.raises(UserError, match=r"malformed file .*val[/\\]normal[/\\]1\.npy"):
        NYUV2.prepare(cfg_for(root))


def test_unreadable_npy_is_named_on_read(npy_root):
    root, _ = npy_root
    (root / "val" / "label" / "0.npy").write_bytes(b"garbage")
    ds = NYUV2.load(cfg_for(root), "test")
    with pytest.raises(UserError, match=r"malformed file .*val[/\\]label[/\\]0\.npy"):
        ds[0]


def test_pickled_npy_is_refused_not_executed(npy_root):
    root, _ = npy_root
    np.save(root / "val" / "depth" / "0.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(UserError, match=r"malformed file .*depth[/\\]0\.npy"):
        NYUV2.load(cfg_for(root), "test")[0]


def test_out_of_range_label_is_named(npy_root):
    root, written = npy_root
    label = written["val"][1]["label"].copy()
    label[3, 3] = 13
    np.save(root / "val" / "label" / "1.npy", label)
    with pytest.raises(UserError, match=r"label[/\\]1\.npy.*0\.\.12"):
        NYUV2.load(cfg_for(root), "test")[1]


def test_unknown_task_and_split(npy_root):
    root, _ = npy_root
    with pytest.raises(UserError, match="no task 'edges'"):
        NYUV2.load(cfg_for(root, tasks=["edges"]), "train")
    with pytest.raises(UserError, match="unknown split"):
        NYUV2.load(cfg_for(root), "holdout")
