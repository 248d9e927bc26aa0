"""CIFAR-100 as 20 five-way tasks: tiny pickle fixtures written in the real file format."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dymu.config import DataConfig
from dymu.data import DATASETS
from dymu.data import cifar100 as c100
from dymu.errors import UserError

N_TRAIN = 200  # every fine class twice
N_TEST = 100  # every fine class once


def fine_labels(n: int, seed: int) -> list[int]:
    """All 100 fine classes, repeated, in a seeded order (plain Python ints, as in the files)."""
    labels = np.resize(np.arange(100), n)
    return [int(v) for v in np.random.default_rng(seed).permutation(labels)]


def batch_dict(n: int, seed: int) -> dict[bytes, object]:
    """A train/test dict as CIFAR-100 stores it: bytes keys, uint8 [N, 3072] RGB planes.

    The R plane of image i is filled with i (to find rows after splitting), the G plane with
    its fine label and the B plane with the row-major pixel index mod 256 (to check layout).
    """
    fine = fine_labels(n, seed)
    data = np.empty((n, 3, 1024), dtype=np.uint8)
    data[:, 0] = (np.arange(n) % 256)[:, None]
    data[:, 1] = np.asarray(fine, dtype=np.uint8)[:, None]
    data[:, 2] = (np.arange(1024) % 256)[None, :]
    return {
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
        b"batch_label": b"training batch 1 of 1",
        b"fine_labels": fine,
        b"coarse_labels": [int(c100.COARSE_OF_FINE[f]) for f in fine],
        b"data": data.reshape(n, 3072),  # [N, 3, 1024] -> [N, 3072]
    }


def meta_dict() -> dict[bytes, object]:
    return {
        b"fine_label_names": [n.encode() for n in c100.FINE_LABEL_NAMES],
        b"coarse_label_names": [n.encode() for n in c100.COARSE_LABEL_NAMES],
    }


def dump(obj: object, path: Path) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def write_cifar(root: Path, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    dump(meta_dict(), folder / "meta")
    dump(batch_dict(n_train, seed=1), folder / "train")
    dump(batch_dict(n_test, seed=2), folder / "test")
    return folder


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write_cifar(tmp_path)
    return tmp_path


def cfg_for(root: Path, **kw: object) -> DataConfig:
    return DataConfig(name="cifar100", root=str(root), **kw)


BUILDER = DATASETS.get("cifar100")


# --------------------------------------------------------------------------- info


def test_info_has_twenty_five_way_tasks_partitioning_the_fine_classes():
    info = BUILDER.info
    assert len(info.tasks) == 20 and info.default_tasks == c100.COARSE_LABEL_NAMES
    assert info.default_size == (32, 32) and info.needs_root
    assert all(t.kind == "classification" and t.num_classes == 5 for t in info.tasks)
    covered = sorted(n for t in info.tasks for n in t.class_names)
    assert covered == sorted(c100.FINE_LABEL_NAMES) and len(set(covered)) == 100
    # spot checks against the CIFAR-100 site's superclass table, in fine-id order
    assert info.task("aquatic_mammals").class_names == (
        "beaver",
        "dolphin",
        "otter",
        "seal",
        "whale",
    )
    assert info.task("vehicles_2").class_names == (
        "lawn_mower",
        "rocket",
        "streetcar",
        "tank",
        "tractor",
    )
    # label ids: alphabetical, as in the files' meta
    assert c100.FINE_LABEL_NAMES[0] == "apple" and c100.FINE_LABEL_NAMES[99] == "worm"
    assert c100.COARSE_LABEL_NAMES[19] == "vehicles_2"
    # the well-known first fine->coarse ids of the CIFAR-100 files
    assert c100.COARSE_OF_FINE[:10].tolist() == [4, 1, 14, 8, 0, 6, 7, 7, 18, 3]


# --------------------------------------------------------------------------- loading


def test_samples_follow_the_conventions_and_layout(root):
    ds = BUILDER.load(cfg_for(root), "test")
    assert len(ds) == N_TEST
    sample = ds[0]
    assert set(sample) == {"image", *c100.COARSE_LABEL_NAMES}
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert all(sample[t].dtype == torch.int64 and sample[t].ndim == 0 for t in ds.task_names)
    batch = ds.batch(np.arange(N_TEST))
    img = (batch["image"] * 255).round().to(torch.uint8)
    fine = torch.tensor(fine_labels(N_TEST, seed=2))
    assert torch.equal(img[:, 0, 0, 0], torch.arange(N_TEST, dtype=torch.uint8))  # R = row
    assert torch.equal(img[:, 1, 5, 7], fine.to(torch.uint8))  # G = fine label
    expected_b = (torch.arange(1024) % 256).to(torch.uint8).reshape(32, 32)  # row-major plane
    assert torch.equal(img[3, 2], expected_b)


def test_each_image_is_labelled_for_its_own_superclass_only(root):
    ds = BUILDER.load(cfg_for(root), "test")
    batch = ds.batch(np.arange(len(ds)))
    labels = torch.stack([batch[t] for t in c100.COARSE_LABEL_NAMES], dim=1)  # [N, 20]
    assert ((labels >= 0).sum(dim=1) == 1).all()
    assert ((labels == -1) | ((labels >= 0) & (labels < 5))).all()
    fine = fine_labels(N_TEST, seed=2)
    for i, f in enumerate(fine):
        name = c100.FINE_LABEL_NAMES[f]
        coarse = next(t for t in BUILDER.info.tasks if name in t.class_names)
        assert labels[i, c100.COARSE_LABEL_NAMES.index(coarse.name)] == coarse.class_names.index(
            name
        )
    # hand-checked cases: dolphin is 2nd of aquatic_mammals, worm 5th of invertebrates
    row = fine.index(c100.FINE_LABEL_NAMES.index("dolphin"))
    assert batch["aquatic_mammals"][row] == 1 and batch["fish"][row] == -1
    row = fine.index(c100.FINE_LABEL_NAMES.index("worm"))
    assert batch["non-insect_invertebrates"][row] == 4


def test_splits_are_a_deterministic_disjoint_holdout(root):
    cfg = cfg_for(root, val_fraction=0.1, seed=3)
    train, val, test = (BUILDER.load(cfg, s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (180, 20, 100)

    def rows(ds):  # the R plane holds the source row
        return set(ds.batch(np.arange(len(ds)))["image"][:, 0, 0, 0].mul(255).round().tolist())

    assert rows(train).isdisjoint(rows(val)) and len(rows(train) | rows(val)) == N_TRAIN
    assert rows(BUILDER.load(cfg, "val")) == rows(val)
    assert rows(BUILDER.load(cfg_for(root, val_fraction=0.1, seed=4), "val")) != rows(val)
    assert BUILDER.prepare(cfg) == {
        "dataset": "cifar100",
        "root": str(root / "cifar-100-python"),
        "cache": None,
        "splits": {"train": 180, "val": 20, "test": 100},
    }


def test_task_subset_keeps_only_images_of_those_superclasses(root):
    ds = BUILDER.load(cfg_for(root, tasks=["people", "fish"]), "test")
    assert ds.task_names == ["people", "fish"] and len(ds) == 10
    batch = ds.batch(np.arange(len(ds)))
    assert set(batch) == {"image", "people", "fish"}
    assert ((batch["people"] >= 0) ^ (batch["fish"] >= 0)).all()


def test_size_resizes_and_root_may_be_the_folder_itself(root):
    ds = BUILDER.load(cfg_for(root / "cifar-100-python", size=[16, 24]), "test")
    assert ds[0]["image"].shape == (3, 16, 24)
    # the B plane is not constant, the R plane is: a constant stays constant after bilinear
    assert torch.allclose(ds[5]["image"][0], torch.full((16, 24), 5 / 255))


def test_python2_style_pickle_loads(tmp_path):
    """The original files are Python-2 pickles: str objects as SHORT_BINSTRING/BINSTRING."""

    class Py2Pickler(pickle._Pickler):  # the pure-Python pickler, to override one writer
        dispatch = pickle._Pickler.dispatch.copy()

        def save_str2(self, obj: bytes) -> None:
            n = len(obj)
            if n < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
            else:
                self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
            self.memoize(obj)

        dispatch[bytes] = save_str2

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, obj in (
        ("meta", meta_dict()),
        ("train", batch_dict(100, 1)),
        ("test", batch_dict(100, 2)),
    ):
        with open(folder / name, "wb") as fh:
            Py2Pickler(fh, protocol=2).dump(obj)
    ops = {op.name for op, _, _ in pickletools.genops((folder / "train").read_bytes())}
    assert "SHORT_BINSTRING" in ops and "BINSTRING" in ops and "GLOBAL" in ops
    ds = BUILDER.load(cfg_for(tmp_path), "test")
    assert len(ds) == 100 and ds[7]["image"][0, 0, 0] == pytest.approx(7 / 255)


def test_allowlist_accepts_both_numpy_module_names():
    unpickler = c100._RestrictedUnpickler(io.BytesIO(b""))
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        assert callable(unpickler.find_class(module, "_reconstruct"))
    for module, name in (("builtins", "eval"), ("posix", "system"), ("numpy", "load")):
        with pytest.raises(c100._Refused):
            unpickler.find_class(module, name)


# --------------------------------------------------------------------------- bad input


class _Evil:
    """Unpickling this would run a shell command (never executed here)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("which", ["train", "meta"])
def test_malicious_pickle_is_refused_without_running_code(root, which):
    marker = root / "pwned"
    folder = root / "cifar-100-python"
    payload = meta_dict() if which == "meta" else batch_dict(N_TRAIN, seed=1)
    payload[b"extra"] = _Evil(marker)
    dump(payload, folder / which)
    globals_named = [
        arg
        for op, arg, _ in pickletools.genops((folder / which).read_bytes())
        if op.name == "GLOBAL"
    ]
    assert any("system" in g for g in globals_named)  # the payload really calls os.system
    with pytest.raises(UserError, match=rf"refusing to load .*{which}.*system"):
        BUILDER.load(cfg_for(root), "train")
    assert not marker.exists()


def test_missing_files_are_named(tmp_path):
    with pytest.raises(UserError, match=r"cifar-100-python.meta"):
        BUILDER.load(cfg_for(tmp_path), "train")
    folder = write_cifar(tmp_path)
    (folder / "test").unlink()
    BUILDER.load(cfg_for(tmp_path), "train")  # test is not needed for train
    with pytest.raises(UserError, match=r"missing file .*test"):
        BUILDER.load(cfg_for(tmp_path), "test")
    with pytest.raises(UserError, match=r"missing file .*test"):
        BUILDER.prepare(cfg_for(tmp_path))
    with pytest.raises(UserError, match=r"data\.root"):
        BUILDER.load(DataConfig(name="cifar100"), "train")


def _without(key: bytes) -> dict:
    d = batch_dict(10, 0)
    del d[key]
    return d


def _reshaped() -> dict:
    d = batch_dict(10, 0)
    d[b"data"] = d[b"data"][:, :100]
    return d


def _mislabelled() -> dict:
    d = batch_dict(10, 0)
    d[b"coarse_labels"][3] = (d[b"coarse_labels"][3] + 1) % 20
    return d


def _short_labels() -> dict:
    d = batch_dict(10, 0)
    d[b"fine_labels"] = d[b"fine_labels"][:5]
    return d


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2, 3], "not the dict"),
        (_without(b"data"), "lacks the entry 'data'"),
        (_without(b"fine_labels"), "lacks the entry 'fine_labels'"),
        (_reshaped(), r"uint8 array \[N, 3072\]"),
        (_mislabelled(), "inconsistent"),
        (_short_labels(), "10 integer labels"),
    ],
)
def test_malformed_batch_is_a_user_error_naming_the_file(root, payload, message):
    path = root / "cifar-100-python" / "test"
    dump(payload, path)
    with pytest.raises(UserError, match=message) as info:
        BUILDER.load(cfg_for(root), "test")
    assert str(path) in str(info.value)


def test_damaged_pickle_and_wrong_meta_are_user_errors(root):
    folder = root / "cifar-100-python"
    path = folder / "test"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(UserError, match="not a valid pickle") as info:
        BUILDER.load(cfg_for(root), "test")
    assert str(path) in str(info.value)
    meta = meta_dict()
    meta[b"coarse_label_names"] = meta[b"coarse_label_names"][::-1]
    dump(meta, folder / "meta")
    with pytest.raises(UserError, match="coarse_label_names"):
        BUILDER.load(cfg_for(root), "train")


def test_unknown_split_and_task_are_user_errors(root):
    with pytest.raises(UserError, match="unknown split"):
        BUILDER.load(cfg_for(root), "dev")
    with pytest.raises(UserError, match="no task 'dogs'"):
        BUILDER.load(cfg_for(root, tasks=["dogs"]), "train")
