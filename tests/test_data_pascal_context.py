"""PASCAL-Context (PASCAL_MT release) loader: decoding of every task, splits, errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from fixtures_real import part_anno, write_pascal_context
from PIL import Image

from dymu.config import DataConfig
from dymu.data.base import DATASETS
from dymu.data.pascal_context import (
    NORMALS_VALID_CLASSES,
    PASCAL_CONTEXT,
    label_edges,
)
from dymu.errors import UserError

H, W = 10, 14
TRAIN = ("2008_000002", "2008_000003", "2008_000007")


def cfg_for(root, **kw) -> DataConfig:
    kw.setdefault("size", [H, W])
    return DataConfig(name="pascal_context", root=str(root), **kw)


@pytest.fixture
def pascal(tmp_path):
    root = tmp_path / "PASCAL_MT"
    return root, write_pascal_context(root, h=H, w=W)


def sample_of(root, sid, **kw):
    """The sample of ``sid``, whichever split the hold-out put it in."""
    for split in ("train", "val", "test"):
        ds = PASCAL_CONTEXT.load(cfg_for(root, **kw), split)
        if sid in ds.ids:
            return ds[ds.ids.index(sid)]
    raise AssertionError(sid)


def test_registered():
    assert DATASETS.get("pascal_context") is PASCAL_CONTEXT
    info = PASCAL_CONTEXT.info
    assert [(t.name, t.kind, t.num_classes) for t in info.tasks] == [
        ("semseg", "semseg", 21),
        ("human_parts", "parts", 7),
        ("saliency", "saliency", None),
        ("normals", "normals", None),
        ("edges", "edges", None),
    ]
    assert info.default_size == (512, 512)


def test_every_task_decodes_as_the_reference(pascal):
    root, written = pascal
    sid = TRAIN[0]
    s, ref = sample_of(root, sid), written[sid]
    jpg = np.array(Image.open(root / "JPEGImages" / f"{sid}.jpg").convert("RGB"))
    assert s["image"].shape == (3, H, W) and s["image"].dtype == torch.float32
    np.testing.assert_allclose(s["image"].permute(1, 2, 0).numpy(), jpg / 255.0, atol=1e-6)
    # semseg from the VOC12 palette png: indices kept, 255 -> -1
    semseg = ref["semseg"].astype(np.int64)
    semseg[semseg == 255] = -1
    assert s["semseg"].dtype == torch.int64
    np.testing.assert_array_equal(s["semseg"].numpy(), semseg)
    # human parts: hair -> head 1, torso -> 2, luarm -> 3, rest background 0
    assert s["human_parts"].dtype == torch.int64
    np.testing.assert_array_equal(s["human_parts"].numpy(), ref["parts"])
    # saliency: png / 255 > 0.5
    assert s["saliency"].shape == (1, H, W)
    np.testing.assert_array_equal(s["saliency"][0].numpy(), (ref["sal"] > 127.5).astype(np.float32))
    # normals: 2 v / 255 - 1 on NYU-like classes (440 wall, left), invalid on sky (360, right)
    n = 2.0 * ref["normals"].astype(np.float32) / 255.0 - 1.0
    n /= np.linalg.norm(n, axis=-1, keepdims=True)
    got = s["normals"].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got[:, : W // 2], n[:, : W // 2], atol=1e-5)
    assert (got[:, W // 2 :] == 0).all()
    # edges: the wall/sky boundary (Laplacian != 0 on columns 6 and 7) thinned to one
    # column; thinning also drops the top end pixel (golden, skimage's thin tables)
    expected = np.zeros((H, W), np.float32)
    expected[1:, W // 2 - 1] = 1.0
    np.testing.assert_array_equal(s["edges"][0].numpy(), expected)


def test_images_without_person_parts_are_all_ignore(pascal):
    root, _ = pascal
    s = sample_of(root, TRAIN[1], tasks=["human_parts"])
    assert set(s) == {"image", "human_parts"}
    assert (s["human_parts"] == -1).all()


def test_pascal_context_png_when_no_voc12(pascal):
    root, _ = pascal
    sid = TRAIN[0]
    other = np.zeros((H, W), np.uint8)
    Image.fromarray(other).save(root / "semseg" / "pascal-context" / f"{sid}.png")
    s = sample_of(root, sid, tasks=["semseg"])
    assert (s["semseg"] != 0).any()  # VOC12 wins while it exists
    (root / "semseg" / "VOC12" / f"{sid}.png").unlink()
    assert (sample_of(root, sid, tasks=["semseg"])["semseg"] == 0).all()


def test_default_size_resizes_to_512(pascal):
    root, _ = pascal
    ds = PASCAL_CONTEXT.load(DataConfig(name="pascal_context", root=str(root)), "test")
    s = ds[0]
    assert s["image"].shape == (3, 512, 512)
    assert s["semseg"].shape == (512, 512) and s["edges"].shape == (1, 512, 512)
    assert set(s["semseg"].unique().tolist()) <= set(range(-1, 21))
    norm = s["normals"].norm(dim=0)
    assert torch.all(((norm - 1).abs() < 1e-5) | (norm == 0))


def test_splits_and_prepare(pascal):
    root, _ = pascal
    cfg = cfg_for(root)
    assert PASCAL_CONTEXT.prepare(cfg) == {
        "dataset": "pascal_context",
        "root": str(root),
        "layout": "pascal_mt",
        "tasks": ["semseg", "human_parts", "saliency", "normals", "edges"],
        "splits": {"train": 2, "val": 1, "test": 2},
    }
    train = PASCAL_CONTEXT.load(cfg, "train").ids
    val = PASCAL_CONTEXT.load(cfg, "val").ids
    assert sorted(train + val) == sorted(TRAIN) and not set(train) & set(val)
    assert PASCAL_CONTEXT.load(cfg, "test").ids == ["2008_000009", "2008_000010"]


def test_label_edges_of_a_block_is_a_closed_thin_loop():
    from scipy import ndimage

    labels = np.zeros((10, 10), np.int64)
    labels[3:7, 3:7] = 5
    edges = label_edges(labels)
    assert edges.dtype == np.float32 and set(np.unique(edges)) == {0.0, 1.0}
    assert ndimage.label(edges == 0)[1] == 2  # the loop separates inside from outside
    lap = ndimage.correlate(labels.astype(float), [[0, 1, 0], [1, -4, 1], [0, 1, 0]])
    assert not edges[lap == 0].any()  # only Laplacian pixels survive thinning
    assert edges.sum() < (lap != 0).sum()  # ... and the 2-pixel band got thinner
    assert label_edges(np.full((4, 4), 3)).sum() == 0


def test_normals_valid_classes():
    assert len(NORMALS_VALID_CLASSES) == 170
    assert 427 in NORMALS_VALID_CLASSES  # tvmonitor, added by hand in the reference
    assert 440 in NORMALS_VALID_CLASSES and 360 not in NORMALS_VALID_CLASSES  # wall, sky
    assert 431 not in NORMALS_VALID_CLASSES  # unknown


# --------------------------------------------------------------------------- errors


def test_missing_root():
    with pytest.raises(UserError, match=r"set data\.root"):
        PASCAL_CONTEXT.prepare(DataConfig(name="pascal_context"))


def test_missing_folder(pascal):
    root, _ = pascal
    shutil.rmtree(root / "JPEGImages")
    with pytest.raises(UserError, match=r"folder .*JPEGImages does not exist"):
        PASCAL_CONTEXT.load(cfg_for(root), "train")


def test_missing_split_file(pascal):
    root, _ = pascal
    (root / "ImageSets" / "Context" / "val.txt").unlink()
    with pytest.raises(UserError, match=r"missing file .*Context[/\\]val\.txt"):
        PASCAL_CONTEXT.prepare(cfg_for(root))


def test_missing_file_named_only_for_selected_tasks(pascal):
    root, _ = pascal
    (root / "sal_distill" / "2008_000010.png").unlink()
    with pytest.raises(UserError, match=r"missing file .*sal_distill[/\\]2008_000010\.png"):
        PASCAL_CONTEXT.prepare(cfg_for(root))
    assert PASCAL_CONTEXT.prepare(cfg_for(root, tasks=["semseg", "edges"]))["splits"]["test"] == 2


def test_missing_semseg_names_both_places(pascal):
    root, _ = pascal
    (root / "semseg" / "pascal-context" / "2008_000009.png").unlink()
    with pytest.raises(UserError, match=r"2008_000009\.png \(or .*VOC12"):
        PASCAL_CONTEXT.load(cfg_for(root), "test")


def test_malformed_mat_is_named(pascal):
    root, _ = pascal
    (root / "human_parts" / "2008_000009.mat").write_bytes(b"not a mat file")
    ds = PASCAL_CONTEXT.load(cfg_for(root, tasks=["human_parts"]), "test")
    with pytest.raises(UserError, match=r"malformed file .*human_parts[/\\]2008_000009\.mat"):
        ds[0]


def test_unknown_part_name_is_named(pascal):
    from scipy.io import savemat

    root, _ = pascal
    mask = np.ones((H, W))
    anno = part_anno("x", [("person", 15, mask, [("tail", mask)])])
    savemat(root / "human_parts" / "2008_000010.mat", {"anno": anno})
    ds = PASCAL_CONTEXT.load(cfg_for(root, tasks=["human_parts"]), "test")
    with pytest.raises(UserError, match=r"2008_000010\.mat.*'tail'"):
        ds[1]


def test_out_of_range_semseg_is_named(pascal):
    root, _ = pascal
    Image.fromarray(np.full((H, W), 30, np.uint8)).save(
        root / "semseg" / "pascal-context" / "2008_000010.png"
    )
    ds = PASCAL_CONTEXT.load(cfg_for(root, tasks=["semseg"]), "test")
    with pytest.raises(UserError, match=r"2008_000010\.png.*label 30"):
        ds[1]
