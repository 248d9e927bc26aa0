"""Flip-safety: no stage flips a dataset that forbids it (DatasetInfo.hflip)."""

from __future__ import annotations

import dataclasses

import pytest
from tiny import TINY

import dymu.search
from dymu.cli.main import main
from dymu.data import DATASETS, get_builder
from dymu.data.synthscenes import SynthScenes
from dymu.train import engine, stage0, stage2

FLIPPING = (stage0, engine, stage2)  # every module that calls random_hflip (engine: the
# joint and the width stages' Seeded.next_batch)
KEYS = ("stage0.hflip", "joint.hflip", "stage2.hflip")


def test_every_dataset_declares_whether_it_may_be_flipped():
    flips = {name: get_builder(name).info.hflip for name in DATASETS.names()}
    assert all(isinstance(v, bool) for v in flips.values())
    # Left and right name MultiMNIST's tasks, and a mirrored digit is not a digit.
    assert not flips["multimnist"] and not flips["multifashion"]
    assert not flips["multifashion_mnist"]
    assert flips["synthscenes"] and flips["cifar100"]


@pytest.fixture
def unflippable(monkeypatch):
    """The embedded dataset, declared unflippable; a flip anywhere is a test failure."""
    info = dataclasses.replace(SynthScenes.info, hflip=False)
    monkeypatch.setattr(SynthScenes, "info", info)

    def flipped(*args, **kwargs):
        raise AssertionError("a stage flipped a dataset that forbids flips")

    for module in FLIPPING:
        monkeypatch.setattr(module, "random_hflip", flipped)


def _search(tmp_path, *overrides: str) -> int:
    run = tmp_path / "run"
    return main(["search", "--run", str(run), *TINY, f"data.cache_dir={tmp_path}", *overrides])


def test_a_search_refuses_flips_before_any_stage(unflippable, tmp_path, capsys):
    assert _search(tmp_path) == 2
    err = capsys.readouterr().err
    assert "may not be flipped" in err and all(f"{k}=false" in err for k in KEYS)
    assert not (tmp_path / "run" / "anchor.safetensors").exists()


@pytest.mark.parametrize("key", KEYS)
def test_each_stage_refuses_flips_itself(unflippable, monkeypatch, tmp_path, capsys, key):
    """With the search's early check gone, the stage that would flip refuses: a stage that
    flipped instead fails the test (AssertionError from the patched random_hflip)."""
    monkeypatch.setattr(dymu.search, "check_flips", lambda info, flips: None)
    off = [f"{k}=false" for k in KEYS if k != key]
    assert _search(tmp_path, *off, f"{key}=true") == 2
    assert f"set {key}=false" in capsys.readouterr().err


def test_no_stage_flips_when_flips_are_off(unflippable, tmp_path):
    assert _search(tmp_path, *(f"{k}=false" for k in KEYS)) == 0
