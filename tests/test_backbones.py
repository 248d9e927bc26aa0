"""Backbones: layer structure, stackability, torchvision-compatible weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dymu.errors import UserError
from dymu.models import BACKBONES, STACKABLE_MODULES, Backbone, build_backbone
from dymu.models.torchvision_weights import to_torchvision

# name -> (number of layers, low_level_layer)
EXPECTED = {
    "tiny_resnet": (7, 4),
    "resnet18": (9, 2),
    "resnet34": (17, 3),
    "mobilenetv2": (19, 3),
}


@pytest.fixture(scope="module")
def backbones() -> dict[str, Backbone]:
    torch.manual_seed(0)
    return {name: build_backbone(name).eval() for name in EXPECTED}


def test_registry_lists_every_builder():
    assert set(BACKBONES.names()) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layers_match_declared_channels_and_strides(backbones, name):
    model = backbones[name]
    n_layers, low = EXPECTED[name]
    assert len(model.layers) == len(model.out_channels) == len(model.reductions) == n_layers
    assert model.low_level_layer == low
    assert model.reductions[low] == 4
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 64, 64))
    assert len(outs) == n_layers
    for out, c, r in zip(outs, model.out_channels, model.reductions, strict=True):
        assert tuple(out.shape) == (2, c, 64 // r, 64 // r)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forward_equals_chaining_layers(backbones, name):
    model = backbones[name]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = model(x)
        for layer, out in zip(model.layers, outs, strict=True):
            x = layer(x)
            torch.testing.assert_close(x, out, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_layers_use_only_stackable_modules_and_share_none(backbones, name):
    seen: set[int] = set()
    for layer in backbones[name].layers:
        ids = set()
        for m in layer.modules():
            assert type(m) in STACKABLE_MODULES, f"{type(m).__name__} in {name}"
            ids.add(id(m))
        assert not ids & seen
        seen |= ids


def _stack(streams: list[nn.Module]) -> nn.Module:
    """Reference stacking: one grouped conv / wide BN per conv / BN of N identical streams."""
    stacked = copy.deepcopy(streams[0])
    n = len(streams)
    per_stream = [dict(s.named_modules()) for s in streams]
    for name, m in list(stacked.named_modules()):
        srcs = [mods[name] for mods in per_stream]
        if isinstance(m, nn.Conv2d):
            new: nn.Module = nn.Conv2d(
                m.in_channels * n,
                m.out_channels * n,
                m.kernel_size,
                m.stride,
                m.padding,
                m.dilation,
                groups=m.groups * n,
                bias=m.bias is not None,
            )
            new.weight.data = torch.cat([s.weight.data for s in srcs])  # [N*C_out, C_in/g, k, k]
        elif isinstance(m, nn.BatchNorm2d):
            new = nn.BatchNorm2d(m.num_features * n)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(new, attr).data = torch.cat([getattr(s, attr).data for s in srcs])
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = stacked.get_submodule(parent_name) if parent_name else stacked
        setattr(parent, child, new)
    return stacked


@pytest.mark.parametrize("name", ["tiny_resnet", "mobilenetv2"])
@pytest.mark.parametrize("train", [False, True])
def test_streams_stack_into_grouped_convolutions(name, train):
    """The hard constraint, checked by behaviour: N streams == one N-times-grouped stream."""
    n = 2
    torch.manual_seed(1)
    streams = [build_backbone(name) for _ in range(n)]
    for s in streams:  # non-trivial BN statistics, so eval mode is checked too
        for m in s.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    stacked = _stack(list(streams))
    for m in [*streams, stacked]:
        m.train(train)
    # 64x64: train-mode BN over the 1x1 maps of a 32x32 input amplifies rounding too much
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = [s(x) for s in streams]
        got = stacked(x.repeat(1, n, 1, 1))  # [B, N*3, H, W], stream-major channels
    for layer, out in enumerate(got):
        b, nc, h, w = out.shape
        per_stream = out.view(b, n, nc // n, h, w)  # [B, N*C, h, w] -> [B, N, C, h, w]
        for j in range(n):
            scale = ref[j][layer].abs().max().item()
            torch.testing.assert_close(
                per_stream[:, j], ref[j][layer], rtol=1e-4, atol=1e-4 * scale
            )


def test_parameter_counts_match_torchvision():
    # torchvision's totals (ResNet-18 11,689,512; ResNet-34 21,797,672; MobileNetV2 3,504,872)
    # minus the 1000-way classifier (512*1000 + 1000; 1280*1000 + 1000).
    expected = {"resnet18": 11_176_512, "resnet34": 21_284_672, "mobilenetv2": 2_223_872}
    for name, n in expected.items():
        assert sum(p.numel() for p in build_backbone(name).parameters()) == n


def test_builder_arguments():
    assert build_backbone("tiny_resnet", width=8).out_channels == (8, 8, 8, 16, 16, 32, 32)
    half = build_backbone("mobilenetv2", width_mult=0.5)
    assert half.out_channels[0] == 16 and half.out_channels[-1] == 1280
    gray = build_backbone("tiny_resnet", in_channels=1)
    assert gray(torch.randn(1, 1, 32, 32))[-1].shape == (1, 64, 4, 4)


def test_unknown_name_or_argument_is_one_line_user_error():
    with pytest.raises(UserError, match="choose one of: mobilenetv2, resnet18"):
        build_backbone("resnet50")
    with pytest.raises(UserError, match=r"widht.*accepted: width, in_channels, weights"):
        build_backbone("tiny_resnet", widht=8)


# ------------------------------------------------------------------ torchvision weights

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{k}": (() if k == "num_batches_tracked" else (c,)) for k in _BN}


def _torchvision_resnet_keys(depths: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """torchvision.models.ResNet(BasicBlock, depths).state_dict() names and shapes."""
    keys = {"conv1.weight": (64, 3, 7, 7), **_bn("bn1", 64)}
    cin = 64
    for s, (depth, c) in enumerate(zip(depths, (64, 128, 256, 512), strict=True), start=1):
        for b in range(depth):
            p = f"layer{s}.{b}"
            keys |= {f"{p}.conv1.weight": (c, cin, 3, 3), **_bn(f"{p}.bn1", c)}
            keys |= {f"{p}.conv2.weight": (c, c, 3, 3), **_bn(f"{p}.bn2", c)}
            if s > 1 and b == 0:
                keys |= {f"{p}.downsample.0.weight": (c, cin, 1, 1), **_bn(f"{p}.downsample.1", c)}
            cin = c
    return keys | {"fc.weight": (1000, 512), "fc.bias": (1000,)}


def _torchvision_mobilenetv2_keys() -> dict[str, tuple[int, ...]]:
    """torchvision.models.mobilenet_v2().state_dict() names and shapes."""
    keys = {"features.0.0.weight": (32, 3, 3, 3), **_bn("features.0.1", 32)}
    settings = [(1, 16, 1), (6, 24, 2), (6, 32, 3), (6, 64, 4), (6, 96, 3), (6, 160, 3)]
    settings.append((6, 320, 1))
    cin, i = 32, 1
    for t, c, n in settings:
        for _ in range(n):
            p, hid = f"features.{i}.conv", cin * t
            if t == 1:
                keys |= {f"{p}.0.0.weight": (hid, 1, 3, 3), **_bn(f"{p}.0.1", hid)}
                keys |= {f"{p}.1.weight": (c, hid, 1, 1), **_bn(f"{p}.2", c)}
            else:
                keys |= {f"{p}.0.0.weight": (hid, cin, 1, 1), **_bn(f"{p}.0.1", hid)}
                keys |= {f"{p}.1.0.weight": (hid, 1, 3, 3), **_bn(f"{p}.1.1", hid)}
                keys |= {f"{p}.2.weight": (c, hid, 1, 1), **_bn(f"{p}.3", c)}
            cin, i = c, i + 1
    keys |= {"features.18.0.weight": (1280, 320, 1, 1), **_bn("features.18.1", 1280)}
    return keys | {"classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)}


REFERENCE_KEYS = {
    "resnet18": lambda: _torchvision_resnet_keys((2, 2, 2, 2)),
    "resnet34": lambda: _torchvision_resnet_keys((3, 4, 6, 3)),
    "mobilenetv2": _torchvision_mobilenetv2_keys,
}


def _fake_checkpoint(name: str, drop_batch_counts: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    state = {}
    for key, shape in REFERENCE_KEYS[name]().items():
        if key.endswith("num_batches_tracked"):
            if not drop_batch_counts:
                state[key] = torch.tensor(7)
        else:
            state[key] = torch.rand(shape, generator=g)
    return state


@pytest.mark.parametrize("name", sorted(REFERENCE_KEYS))
def test_torchvision_names_and_shapes_match_reference(name):
    ours = {k: tuple(v.shape) for k, v in to_torchvision(build_backbone(name)).items()}
    reference = {
        k: v for k, v in REFERENCE_KEYS[name]().items() if not k.startswith(("fc.", "classifier."))
    }
    assert ours == reference


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torchvision_checkpoint_loads_every_tensor(tmp_path, name, fmt):
    state = _fake_checkpoint(name)
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    model = build_backbone(name, weights=str(path))
    loaded = to_torchvision(model)
    assert set(loaded) == {k for k in state if not k.startswith(("fc.", "classifier."))}
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_checkpoint_without_batch_counts_loads(tmp_path):
    """torchvision's ResNet-18/34 files predate BN's num_batches_tracked buffer."""
    path = tmp_path / "old.pth"
    torch.save(_fake_checkpoint("resnet18", drop_batch_counts=True), path)
    model = build_backbone("resnet18", weights=str(path))
    torch.testing.assert_close(
        model.layers[4].conv2.weight, torch.load(path)["layer2.1.conv2.weight"]
    )


def test_tiny_resnet_round_trips_its_resnet_names(tmp_path):
    torch.manual_seed(0)
    src = build_backbone("tiny_resnet", width=8)
    path = tmp_path / "tiny.pth"
    torch.save(to_torchvision(src), path)
    assert "layer3.1.conv2.weight" in torch.load(path)
    dst = build_backbone("tiny_resnet", width=8, weights=str(path))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_bad_checkpoints_fail_with_the_key_and_file(tmp_path):
    path = tmp_path / "w.pth"
    state = _fake_checkpoint("resnet18")

    torch.save({k: v for k, v in state.items() if k != "layer3.0.bn2.running_var"}, path)
    with pytest.raises(UserError, match=r"missing key 'layer3.0.bn2.running_var' in .*w\.pth"):
        build_backbone("resnet18", weights=str(path))

    torch.save({**state, "layer5.0.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(UserError, match=r"unexpected key 'layer5.0.conv1.weight' in .*w\.pth"):
        build_backbone("resnet18", weights=str(path))

    torch.save(state, path)
    with pytest.raises(UserError, match=r"'conv1.weight' .* shape \(64, 3, 7, 7\)"):
        build_backbone("resnet18", in_channels=1, weights=str(path))
    with pytest.raises(UserError, match=r"missing key 'layer1.2.conv1.weight' in .*w\.pth"):
        build_backbone("resnet34", weights=str(path))  # ResNet-18 weights, one block short

    with pytest.raises(UserError, match=r"weights file .*nope\.pth does not exist"):
        build_backbone("mobilenetv2", weights=str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"cannot read weights file .*junk\.pth"):
        build_backbone("mobilenetv2", weights=str(tmp_path / "junk.pth"))
