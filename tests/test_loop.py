"""Batches of the step-based stages: a resumed stream continues where it stopped."""

from __future__ import annotations

import itertools

import torch
from tiny import TINY

from dymu.config import load_config
from dymu.data import get_builder
from dymu.data.batches import endless


def test_endless_with_a_start_skips_exactly_that_many_batches():
    cfg = load_config(None, TINY)
    ds = get_builder("synthscenes").load(cfg.data, "val")  # 8 images: 2 batches of 3 a pass
    whole = [b["image"] for b in itertools.islice(endless(ds, 3, seed=5), 8)]
    for start in (0, 1, 2, 5):  # first pass, its end, later passes
        resumed = [b["image"] for b in itertools.islice(endless(ds, 3, seed=5, start=start), 3)]
        for got, want in zip(resumed, whole[start : start + 3], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
