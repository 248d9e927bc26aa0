"""idx reader and MultiMNIST / MultiFashion builders, on tiny idx files and the real ones."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dymu.config import DataConfig
from dymu.data import DATASETS
from dymu.data import multimnist as mm
from dymu.data.base import holdout_split
from dymu.data.idx import read_idx, read_idx_images, read_idx_labels
from dymu.errors import UserError

N = {"train": 60, "test": 20}
PREFIX = {"train": "train", "test": "t10k"}


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> Path:
    """Write ``array`` in the idx format (gzip when the name ends in .gz), big-endian."""
    dtype = {0x08: np.dtype(np.uint8), 0x0C: np.dtype(">i4")}[type_code]
    header = struct.pack(">HBB", 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def source_arrays(kind: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic random items and labels, different for mnist and fashion."""
    salt = {"mnist": 0, "fashion": 100}[kind] + {"train": 0, "test": 1}[split]
    n = N[split]
    images = np.random.default_rng(salt).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    i = np.arange(n)
    labels = (i % 10 if kind == "mnist" else (7 * i + 3) % 10).astype(np.uint8)
    return images, labels


def write_source(folder: Path, kind: str, gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split in ("train", "test"):
        images, labels = source_arrays(kind, split)
        write_idx(folder / f"{PREFIX[split]}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{PREFIX[split]}-labels-idx1-ubyte{ext}", labels)
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    write_source(data / "mnist", "mnist")
    write_source(data / "fashion-mnist", "fashion", gz=False)  # plain idx files work too
    return data


def cfg_for(root: Path, name: str = "multimnist", **kw: object) -> DataConfig:
    kw.setdefault("cache_dir", str(root.parent / "cache"))
    return DataConfig(name=name, root=str(root), **kw)


# --------------------------------------------------------------------------- idx reader


def test_idx_roundtrip_gz_and_plain(tmp_path):
    images, labels = source_arrays("mnist", "test")
    assert np.array_equal(read_idx_images(write_idx(tmp_path / "i.gz", images)), images)
    assert np.array_equal(read_idx_labels(write_idx(tmp_path / "l", labels)), labels)
    wide = np.arange(-6, 6, dtype=np.int32).reshape(3, 4)
    got = read_idx(write_idx(tmp_path / "w.gz", wide, type_code=0x0C))
    assert got.dtype == np.int32 and np.array_equal(got, wide)


def test_idx_errors_name_the_file(tmp_path):
    labels = write_idx(tmp_path / "labels.gz", np.zeros(5, np.uint8))
    with pytest.raises(UserError, match=r"labels\.gz: idx magic number 0x0801, expected 0x0803"):
        read_idx_images(labels)
    images = write_idx(tmp_path / "images", np.zeros((4, 28, 28), np.uint8))
    truncated = tmp_path / "truncated"
    truncated.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"truncated.*4 x 28 x 28.*truncated or corrupt"):
        read_idx_images(truncated)
    padded = tmp_path / "padded"
    padded.write_bytes(images.read_bytes() + b"\0")
    with pytest.raises(UserError, match="padded"):
        read_idx_images(padded)
    not_idx = tmp_path / "notidx"
    not_idx.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(UserError, match=r"notidx is not an idx file: magic number 0x504b0304"):
        read_idx(not_idx)
    short = tmp_path / "short"
    short.write_bytes(b"\0\0")
    with pytest.raises(UserError, match="short is not an idx file"):
        read_idx(short)
    header_cut = tmp_path / "headercut"
    header_cut.write_bytes(images.read_bytes()[:10])
    with pytest.raises(UserError, match="headercut: truncated idx header"):
        read_idx(header_cut)
    damaged = tmp_path / "damaged.gz"
    damaged.write_bytes(gzip.compress(images.read_bytes())[:-30])
    with pytest.raises(UserError, match=r"damaged\.gz is a damaged gzip file"):
        read_idx(damaged)
    with pytest.raises(UserError, match=r"missing file .*absent"):
        read_idx(tmp_path / "absent")


# --------------------------------------------------------------------------- construction


def test_compose_places_known_patterns():
    """Hand-made case: where blocks land after the 36x36 overlay and the 28x28 resize.

    Nearest sampling reads canvas row/col ``floor((i + 0.5) * 36 / 28)`` for output i:
    0, 1, 3, 4, 5, 7, 8, 9, 10, 12, ... so canvas 0..3 -> output 0..2 and canvas 30..33
    (the right item's rows 24..27 shifted by 6) -> output 23..25.
    """
    left = np.zeros((1, 28, 28), np.uint8)
    right = np.zeros((1, 28, 28), np.uint8)
    left[0, 0:4, 0:4] = 100  # top-left block of the left item
    right[0, 24:28, 24:28] = 200  # bottom-right block of the right item
    left[0, 10, 10] = 50  # overlap: canvas (10, 10) holds left (10, 10) and right (4, 4)
    right[0, 4, 4] = 80
    left[0, 12, 12] = 90  # overlap where left is brighter: canvas (12, 12) = right (6, 6)
    right[0, 6, 6] = 30
    out = mm.compose(left, right)[0]
    expected = np.zeros((28, 28), np.uint8)
    expected[0:3, 0:3] = 100
    expected[23:26, 23:26] = 200
    expected[8, 8] = 80  # canvas 10 is output 8 (8.5 * 9/7 = 10.9): the max, right wins
    expected[9, 9] = 90  # canvas 12 is output 9 (9.5 * 9/7 = 12.2): the max, left wins
    assert np.array_equal(out, expected)
    # the right item spans canvas 6..33; outputs 26, 27 read canvas 34, 35: always empty
    full = mm.compose(np.zeros((1, 28, 28), np.uint8), np.full((1, 28, 28), 255, np.uint8))[0]
    assert full[26:].max() == 0 and full[:, 26:].max() == 0 and full[25, 25] == 255
    assert full[4].max() == 0 and full[5, 5] == 255  # canvas 5 -> output 4, canvas 7 -> 5


def test_compose_matches_a_per_image_reference():
    """The vectorised compose equals the reference loop (canvas, max, PIL NEAREST)."""
    image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    left = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
    right = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
    got = mm.compose(left, right)
    for k in range(len(left)):
        canvas = np.zeros((36, 36), np.uint8)
        canvas[0:28, 0:28] = left[k]
        canvas[6:34, 6:34] = np.maximum(canvas[6:34, 6:34], right[k])
        ref = np.asarray(image.fromarray(canvas).resize((28, 28), resample=image.NEAREST))
        assert np.array_equal(got[k], ref)


def test_partners_are_seeded_permutations():
    p = mm.partners(0, "train", 50, 50)
    assert sorted(p.tolist()) == list(range(50))
    assert np.array_equal(p, mm.partners(0, "train", 50, 50))
    assert not np.array_equal(p, mm.partners(1, "train", 50, 50))
    assert not np.array_equal(p, mm.partners(0, "test", 50, 50))
    assert len(mm.partners(0, "train", 7, 5)) == 7


# --------------------------------------------------------------------------- builders


@pytest.mark.parametrize(
    ("name", "left", "right"),
    [
        ("multimnist", "mnist", "mnist"),
        ("multifashion", "fashion", "fashion"),
        ("multifashion_mnist", "mnist", "fashion"),
    ],
)
def test_build_follows_the_construction(root, name, left, right):
    cfg = cfg_for(root, name, seed=5)
    ds = DATASETS.get(name).load(cfg, "test")
    assert len(ds) == N["test"] and ds.task_names == ["left", "right"]
    sample = ds[3]
    assert sample["image"].shape == (3, 28, 28) and sample["image"].dtype == torch.float32
    assert torch.equal(sample["image"][0], sample["image"][1])
    assert torch.equal(sample["image"][0], sample["image"][2])
    assert sample["left"].dtype == torch.int64 and sample["left"].ndim == 0
    assert ds.arrays["image"].shape == (N["test"], 28, 28, 1)  # stored one-channel
    lx, ly = source_arrays(left, "test")
    rx, ry = source_arrays(right, "test")
    pick = mm.partners(5, "test", len(lx), len(rx))
    batch = ds.batch(np.arange(len(ds)))
    assert np.array_equal(batch["left"].numpy(), ly)
    assert np.array_equal(batch["right"].numpy(), ry[pick])
    stored = (batch["image"][:, 0] * 255).round().to(torch.uint8).numpy()
    assert np.array_equal(stored, mm.compose(lx, rx[pick]))
    classes = {"mnist": mm.MNIST_CLASSES, "fashion": mm.FASHION_CLASSES}
    assert ds.info.task("left").class_names == classes[left]
    assert ds.info.task("right").class_names == classes[right]


def test_splits_prepare_and_holdout(root):
    cfg = cfg_for(root, val_fraction=0.2, seed=2)
    builder = DATASETS.get("multimnist")
    summary = builder.prepare(cfg)
    assert summary["dataset"] == "multimnist" and summary["root"] == str(root)
    assert Path(summary["cache"]).parent == root.parent / "cache"
    assert Path(summary["cache"]).name.startswith("multimnist-")
    assert summary["splits"] == {"train": 48, "val": 12, "test": 20}
    train, val = builder.load(cfg, "train"), builder.load(cfg, "val")
    assert (len(train), len(val)) == (48, 12)
    _, val_rows = holdout_split(60, 0.2, 2)
    assert np.array_equal(val.arrays["left"], source_arrays("mnist", "train")[1][val_rows])


def test_same_seed_same_data_other_seed_other_pairs(root, tmp_path):
    builder = DATASETS.get("multimnist")
    a = builder.load(cfg_for(root, seed=1, cache_dir=str(tmp_path / "a")), "train")
    b = builder.load(cfg_for(root, seed=1, cache_dir=str(tmp_path / "b")), "train")
    c = builder.load(cfg_for(root, seed=2, cache_dir=str(tmp_path / "a")), "test")
    d = builder.load(cfg_for(root, seed=1, cache_dir=str(tmp_path / "a")), "test")
    for key in ("image", "left", "right"):
        assert np.array_equal(a.arrays[key], b.arrays[key])
    assert not np.array_equal(c.arrays["right"], d.arrays["right"])
    assert len(list((tmp_path / "a").iterdir())) == 2  # one cache folder per seed


def test_cache_is_reused(root, monkeypatch):
    cfg = cfg_for(root)
    builder = DATASETS.get("multimnist")
    first = builder.load(cfg, "test")
    (cache,) = (root.parent / "cache").iterdir()
    assert sorted(p.name for p in cache.iterdir()) == ["meta.json", "test.npz", "train.npz"]

    def boom(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(mm, "compose", boom)
    again = builder.load(cfg, "test")
    assert np.array_equal(first.arrays["image"], again.arrays["image"])
    assert builder.prepare(cfg)["cache"] == str(cache)
    (cache / "test.npz").unlink()
    with pytest.raises(UserError, match="incomplete; delete it"):
        builder.load(cfg, "test")
    (cache / "train.npz").write_bytes(b"junk")
    (cache / "test.npz").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"cache file .*test\.npz is unreadable"):
        builder.load(cfg, "test")


def test_size_and_single_source_root(root):
    ds = DATASETS.get("multifashion").load(
        cfg_for(root / "fashion-mnist", "multifashion", size=[32, 40]), "test"
    )
    assert ds[0]["image"].shape == (3, 32, 40) and ds.arrays["image"].shape[-1] == 1
    # a two-source variant does not take one source's folder as its root
    with pytest.raises(UserError, match=r"multifashion_mnist: missing file .*train-images"):
        DATASETS.get("multifashion_mnist").load(
            cfg_for(root / "mnist", "multifashion_mnist"), "test"
        )


def test_missing_and_inconsistent_files(root):
    (root / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(UserError, match=r"missing file .*mnist.t10k-labels-idx1-ubyte\.gz"):
        DATASETS.get("multimnist").load(cfg_for(root), "train")
    write_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
    with pytest.raises(UserError, match=r"holds 20 images but .*t10k-labels.* holds 7 labels"):
        DATASETS.get("multimnist").prepare(cfg_for(root))
    write_idx(root / "mnist" / "t10k-labels-idx1-ubyte.gz", np.full(20, 12, np.uint8))
    with pytest.raises(UserError, match=r"labels must be 0\.\.9"):
        DATASETS.get("multimnist").prepare(cfg_for(root))
    assert not (root.parent / "cache").exists() or not any(
        p.name.startswith("multimnist") for p in (root.parent / "cache").iterdir()
    )  # a failed build leaves no cache behind
    with pytest.raises(UserError, match=r"missing file .*fashion-mnist"):
        DATASETS.get("multifashion").load(cfg_for(root.parent), "test")
    with pytest.raises(UserError, match="unknown split"):
        DATASETS.get("multimnist").load(cfg_for(root), "dev")


# --------------------------------------------------------------------------- real files


def shared_data() -> Path:
    env = os.environ.get("DYMU_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


REAL = shared_data()
needs_real = pytest.mark.skipif(
    not (REAL / "mnist").is_dir(), reason=f"real MNIST not found under {REAL}"
)


@pytest.fixture(scope="module")
def real_multimnist(tmp_path_factory):
    cfg = DataConfig(
        name="multimnist", root=str(REAL), cache_dir=str(tmp_path_factory.mktemp("cache"))
    )
    builder = DATASETS.get("multimnist")
    return cfg, builder.prepare(cfg), builder.load(cfg, "test")


@needs_real
def test_real_mnist_label_counts():
    for kind in ("mnist", "fashion-mnist"):
        if not (REAL / kind).is_dir():
            continue
        train = read_idx_labels(REAL / kind / "train-labels-idx1-ubyte.gz")
        test = read_idx_labels(REAL / kind / "t10k-labels-idx1-ubyte.gz")
        assert (len(train), len(test)) == (60000, 10000)
        assert sorted(np.unique(train).tolist()) == list(range(10))
        if kind == "mnist":  # the published class counts of the MNIST test set
            assert np.bincount(test).tolist() == [
                980,
                1135,
                1032,
                1010,
                982,
                892,
                958,
                1028,
                974,
                1009,
            ]
    images = read_idx_images(REAL / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8


@needs_real
def test_real_multimnist_builds(real_multimnist):
    cfg, summary, test = real_multimnist
    assert summary["splits"] == {"train": 54000, "val": 6000, "test": 10000}
    mnist_x = read_idx_images(REAL / "mnist" / "t10k-images-idx3-ubyte.gz")
    mnist_y = read_idx_labels(REAL / "mnist" / "t10k-labels-idx1-ubyte.gz")
    pick = mm.partners(cfg.seed, "test", 10000, 10000)
    assert np.array_equal(test.arrays["left"], mnist_y)
    assert np.array_equal(test.arrays["right"], mnist_y[pick])
    rows = np.arange(0, 10000, 997)
    assert np.array_equal(
        test.arrays["image"][rows, ..., 0], mm.compose(mnist_x[rows], mnist_x[pick[rows]])
    )
    sample = test[0]
    assert sample["image"].shape == (3, 28, 28) and float(sample["image"].min()) >= 0.0
    assert float(sample["image"].max()) <= 1.0 and int(sample["left"]) == 7  # first test digit
