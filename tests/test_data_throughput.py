"""Data throughput: pinned batches, worker processes and the vectorised batch conversion
change speed only, never the batches."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from fixtures_real import write_nyuv2_npy
from tiny import TINY

from dymu.config import DataConfig, load_config
from dymu.data import batches as loop
from dymu.data import get_builder
from dymu.data.base import to_target_tensor
from dymu.data.batches import endless, iterate
from dymu.data.nyuv2 import NYUV2
from dymu.tasks import TaskSpec


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The tiny synthscenes train split (24 images, in memory: an ArrayDataset)."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config(None, [*TINY, f"data.cache_dir={cache}"])
    return get_builder("synthscenes").load(cfg.data, "train")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny NYU-v2 .npy folder (8 images in train: a FileDataset, read by a DataLoader)."""
    root = tmp_path_factory.mktemp("nyuv2")
    write_nyuv2_npy(root, n_train=9, n_val=1)
    return NYUV2.load(DataConfig(name="nyuv2", root=str(root), val_fraction=0.1), "train")


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in w:
            assert g[k].dtype == w[k].dtype
            torch.testing.assert_close(g[k], w[k], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["synth", "folder"])
def test_pin_memory_without_cuda_changes_nothing_and_warns_nothing(kind, request, monkeypatch):
    monkeypatch.setattr(loop, "can_pin", lambda: False)  # what a CPU-only machine says
    ds = request.getfixturevalue(kind)
    kwargs = {"shuffle": True, "seed": 3, "drop_last": True}
    want = list(iterate(ds, 4, **kwargs))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DataLoader warns about pinning without CUDA
        got = list(iterate(ds, 4, **kwargs, pin_memory=True))
    _assert_same(got, want)


def test_in_memory_batches_are_pinned_exactly_when_asked_and_possible(synth, monkeypatch):
    pinned = []

    def fake_pin(batch):  # Tensor.pin_memory needs CUDA; record the call instead
        pinned.append(batch)
        return batch

    monkeypatch.setattr(loop, "pin", fake_pin)
    monkeypatch.setattr(loop, "can_pin", lambda: True)
    batches = list(iterate(synth, 8, shuffle=False, pin_memory=True))
    assert len(pinned) == len(batches) == 3 and pinned[0] is batches[0]
    list(iterate(synth, 8, shuffle=False))  # the default: no pinning
    monkeypatch.setattr(loop, "can_pin", lambda: False)
    list(iterate(synth, 8, shuffle=False, pin_memory=True))  # asked, but no CUDA
    assert len(pinned) == 3


@pytest.mark.gpu
def test_pinned_batches_are_page_locked_and_upload_unchanged(synth):
    want = list(iterate(synth, 8, shuffle=True, seed=1))
    got = list(iterate(synth, 8, shuffle=True, seed=1, pin_memory=True))
    assert all(t.is_pinned() for b in got for t in b.values())
    device = torch.device("cuda")
    uploaded = [{k: v.cpu() for k, v in loop.to_device(b, device).items()} for b in got]
    _assert_same(uploaded, want)


@pytest.mark.parametrize("kind", ["synth", "folder"])
def test_endless_passes_workers_and_pin_memory_through_unchanged_batches(
    kind, request, monkeypatch
):
    ds = request.getfixturevalue(kind)
    seen = []
    real_iterate = loop.iterate

    def spy(*args, **kwargs):
        seen.append((kwargs["workers"], kwargs["pin_memory"]))
        return real_iterate(*args, **kwargs)

    monkeypatch.setattr(loop, "iterate", spy)
    want = list(itertools.islice(endless(ds, 4, seed=2, start=1), 7))  # crosses a pass
    assert set(seen) == {(0, False)}
    seen.clear()
    got = list(itertools.islice(endless(ds, 4, seed=2, start=1, workers=1, pin_memory=True), 7))
    assert set(seen) == {(1, True)}
    _assert_same(got, want)


def test_int8_normals_convert_to_the_normalised_vectors():
    """The in-place conversion equals the plain formula bit for bit, zeros (invalid) kept."""
    spec = TaskSpec("normals", "normals")
    values = np.arange(-128, 128, 5, dtype=np.int8)
    grid = np.stack(np.meshgrid(values, values, values, indexing="ij"), -1)  # [V, V, V, 3]
    stored = grid.reshape(len(values), -1, 1, 3)  # [B, H, W=1, 3] channels-last
    stored[0, :7] = 0
    t = torch.from_numpy(stored).float()
    norm = t.norm(dim=-1, keepdim=True)
    want = torch.where(norm > 0, t / norm.clamp_min(1e-6), torch.zeros_like(t))
    got = to_target_tensor(spec, stored)
    assert got.shape == (len(values), 3, stored.shape[1], 1) and got.dtype == torch.float32
    assert torch.equal(got, want.permute(0, 3, 1, 2))
    assert got.stride() == want.permute(0, 3, 1, 2).stride()  # layout unchanged too
    assert (got[0, :, :7] == 0).all()


def test_batch_images_are_contiguous_and_scaled(synth):
    rows = np.array([5, 0, 17])
    image = synth.batch(rows)["image"]
    stored = torch.from_numpy(synth.arrays["image"][rows])  # [B, H, W, 3] uint8
    assert image.is_contiguous() and image.dtype == torch.float32
    assert torch.equal(image, stored.permute(0, 3, 1, 2).float() / 255.0)
