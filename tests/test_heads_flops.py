"""Task heads (output shapes, arguments) and fvcore FLOPs / parameter counts."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from dymu.errors import UserError
from dymu.models import (
    HEADS,
    build_backbone,
    build_head,
    count_flops,
    count_params,
    head_cost,
    layer_costs,
)
from dymu.models.flops import layer_output_shapes

# ----------------------------------------------------------------------------------- heads


@pytest.mark.parametrize("name", ["deeplabv3plus", "deeplabv3plus_light"])
def test_deeplab_heads_output_dense_maps_at_out_size(name):
    head = build_head(name, in_channels=64, low_channels=32, low_layer=4, out_channels=6)
    assert head.low_layer == 4
    high, low = torch.randn(2, 64, 8, 8), torch.randn(2, 32, 16, 16)
    assert head(high, low, (64, 64)).shape == (2, 6, 64, 64)
    assert head.eval()(high[:1], low[:1], (48, 40)).shape == (1, 6, 48, 40)


def test_deeplab_head_without_low_level_features():
    head = build_head(
        "deeplabv3plus_light", in_channels=64, low_channels=None, low_layer=None, out_channels=3
    )
    assert head.low_layer is None
    assert head(torch.randn(2, 64, 8, 8), None, (64, 64)).shape == (2, 3, 64, 64)


def test_deeplab_head_widths_and_rates_are_options():
    head = build_head(
        "deeplabv3plus",
        in_channels=16,
        low_channels=8,
        low_layer=1,
        out_channels=2,
        aspp_channels=8,
        rates=(1, 2),
        decoder_channels=8,
    )
    assert len(head.aspp.branches) == 4  # 1x1, two atrous, pooling
    assert head(torch.randn(2, 16, 4, 4), torch.randn(2, 8, 8, 8), (32, 32)).shape == (2, 2, 32, 32)


def test_classification_head_ignores_low_and_out_size():
    head = build_head(
        "classification", in_channels=64, low_channels=32, low_layer=3, out_channels=5
    )
    assert head.low_layer is None  # reads no earlier layer, whatever was passed
    high = torch.randn(3, 64, 4, 4)
    out = head(high, torch.randn(3, 32, 8, 8), (32, 32))
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, head.fc(high.mean(dim=(2, 3))))


def test_head_arguments_are_checked():
    assert set(HEADS.names()) == {"classification", "deeplabv3plus", "deeplabv3plus_light"}
    kw = {"in_channels": 8, "low_channels": 4, "low_layer": 1, "out_channels": 2}
    with pytest.raises(UserError, match="choose one of: classification, deeplabv3plus"):
        build_head("fcn", **kw)
    with pytest.raises(UserError, match=r"unknown argument.*rate;"):
        build_head("deeplabv3plus", rate=(1, 2), **kw)
    with pytest.raises(UserError, match="both be given or both be None"):
        build_head("deeplabv3plus", **{**kw, "low_layer": None})
    with pytest.raises(UserError, match="out_channels must be >= 1"):
        build_head("classification", **{**kw, "out_channels": 0})


# ----------------------------------------------------------------------------------- FLOPs


def test_conv_flops_and_params_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert count_flops(conv, torch.zeros(1, 3, 16, 16)) == 3 * 8 * 9 * 16 * 16
    strided = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
    assert count_flops(strided, torch.zeros(2, 3, 16, 16)) == 2 * 3 * 8 * 9 * 8 * 8
    assert count_params(conv) == 8 * 3 * 9
    bn = nn.BatchNorm2d(8)
    assert count_flops(bn, torch.zeros(1, 8, 4, 4)) == 0  # folded into its conv when deployed
    linear = nn.Linear(10, 4)
    assert count_params(linear) == 10 * 4 + 4


def test_count_flops_restores_modes_and_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    model.train()
    model[2].eval()  # a mixed state must come back as it was
    before = model[1].running_mean.clone()
    count_flops(model, torch.randn(2, 3, 8, 8))
    assert [m.training for m in model.modules()] == [True, True, True, False]
    torch.testing.assert_close(model[1].running_mean, before, rtol=0, atol=0)


def test_params_are_the_sum_of_numel():
    backbone = build_backbone("tiny_resnet", width=8)
    assert count_params(backbone) == sum(p.numel() for p in backbone.parameters())
    costs = layer_costs(backbone, (32, 32))
    assert sum(p for _, p in costs) == count_params(backbone)


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("tiny_resnet", (64, 64)),
        ("tiny_resnet", (32, 32)),
        ("resnet18", (64, 64)),
        ("resnet34", (64, 64)),
        ("mobilenetv2", (64, 64)),
    ],
)
def test_layer_flops_sum_to_whole_backbone(name, size):
    backbone = build_backbone(name)
    costs = layer_costs(backbone, size)
    assert len(costs) == len(backbone.layers)
    assert all(isinstance(f, int) and f > 0 for f, _ in costs)
    assert sum(f for f, _ in costs) == count_flops(backbone, torch.zeros(1, 3, *size))


def test_tiny_resnet_stem_flops_by_hand():
    # 3x3 stride-2 conv 3 -> 16 onto 32x32; its BN costs 0 (folded into the conv when deployed)
    (stem_flops, stem_params), *_ = layer_costs(build_backbone("tiny_resnet"), (64, 64))
    assert stem_flops == 3 * 16 * 9 * 32 * 32
    assert stem_params == 16 * 3 * 9 + 2 * 16


def test_head_cost():
    backbone = build_backbone("tiny_resnet")
    shapes = layer_output_shapes(backbone, (64, 64))
    assert shapes[-1] == (64, 8, 8)
    low = backbone.low_level_layer
    head = build_head(
        "deeplabv3plus_light",
        in_channels=backbone.out_channels[-1],
        low_channels=backbone.out_channels[low],
        low_layer=low,
        out_channels=6,
    )
    flops, params = head_cost(head, shapes[-1], shapes[low], (64, 64))
    high, lo = torch.zeros(1, *shapes[-1]), torch.zeros(1, *shapes[low])
    assert flops == count_flops(head, high, lo, (64, 64)) > 0
    assert params == count_params(head)

    cls = build_head(
        "classification", in_channels=64, low_channels=None, low_layer=None, out_channels=5
    )
    # adaptive average pool: one per input element; linear: in * out multiply-adds
    assert head_cost(cls, (64, 8, 8), None, (64, 64)) == (64 * 8 * 8 + 64 * 5, 64 * 5 + 5)


def test_counting_is_quiet(caplog):
    head = build_head(
        "deeplabv3plus_light", in_channels=8, low_channels=4, low_layer=0, out_channels=2
    )
    with caplog.at_level(logging.WARNING):
        head_cost(head, (8, 4, 4), (4, 8, 8), (16, 16))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
