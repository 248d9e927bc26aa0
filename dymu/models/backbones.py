"""Backbones cut into searchable layers (METHOD.md 1.1).

A :class:`Backbone` is a chain of L *layers*: ``layers[0]`` takes the image and holds the
stem, layer ``l`` maps layer ``l - 1``'s output to its own. One layer is one residual block
(ResNet) or one inverted-residual block (MobileNetV2), so a node of the search space
(METHOD.md 1.2) is one block of one stream.

Everything inside ``layers`` is built from :data:`STACKABLE_MODULES` only: convolutions,
batch norms, ReLU/ReLU6, max pooling, identities, sequentials and the two block classes
below, whose ``forward`` adds nothing but an elementwise residual sum. That is what lets N
identical streams be fused into one module by widening every ``nn.Conv2d`` into a grouped
convolution (``groups`` times N) and every ``nn.BatchNorm2d`` into one N times as wide:
no operation inside a layer mixes channels except the convolutions themselves, and no
``forward`` hard-codes a channel count.

Builders are registered in :data:`BACKBONES` and are small keyword-only functions over one
private constructor per family (timm-style); :func:`build_backbone` is the entry point.
ResNet-18/34 and MobileNetV2 reproduce torchvision's architectures module for module, so
torchvision checkpoints load by renaming keys (:mod:`dymu.models.torchvision_weights`).
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence

from torch import Tensor, nn

from dymu.errors import UserError
from dymu.models import torchvision_weights
from dymu.registry import Registry


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs and a residual), torchvision's module names.

    The shortcut is ``nn.Identity`` rather than ``None`` when no projection is needed, so
    ``forward`` has no branch and the block exports and stacks the same way either way.
    ReLUs are not in-place: a layer's output is read by several children and by hooks.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.downsample: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.downsample = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


def _conv_bn_act(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """Conv + BN + ReLU6 as an ``nn.Sequential`` (torchvision's ``Conv2dNormActivation``).

    Same child indices (0 conv, 1 bn, 2 act) as torchvision, so state-dict keys line up.
    """
    padding = (kernel_size - 1) // 2
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection (+ residual).

    ``conv`` has torchvision's layout and indices: with expansion ``[expand, dw, proj conv,
    proj bn]``, without (``expand_ratio == 1``) ``[dw, proj conv, proj bn]``. The depthwise
    conv has ``groups == channels``; stacking N streams multiplies its groups by N too.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = round(in_channels * expand_ratio)
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(in_channels, hidden, 1))
        layers += [
            _conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


STACKABLE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.ReLU6,
    nn.MaxPool2d,
    nn.Identity,
    nn.Sequential,
    BasicBlock,
    InvertedResidual,
)
"""The only module types allowed inside ``Backbone.layers`` (see the module docstring).

``nn.MaxPool2d`` (the ResNet stem) works per channel, so it needs no change when streams
are stacked; ``nn.Conv2d`` needs its channels *and* ``groups`` multiplied by N."""


def _pick_low_level_layer(reductions: Sequence[int]) -> int:
    """The layer a DeepLabv3+ decoder takes low-level features from.

    The *last* layer at output stride 4 (ResNet ``layer1``'s output, MobileNetV2
    ``features.3``), as in DeepLabv3+; without one, the layer whose stride is closest to 4
    on a log scale (the finer one on a tie), again the last at that stride.
    """
    dist = [abs(math.log2(r) - 2.0) for r in reductions]
    best = min(zip(dist, reductions, strict=True))
    return max(i for i, (d, r) in enumerate(zip(dist, reductions, strict=True)) if (d, r) == best)


class Backbone(nn.Module):
    """A feature extractor as a chain of L searchable layers.

    Attributes:
        layers: the L layers; ``layers[0]`` takes the image ``[B, C_in, H, W]``.
        out_channels: channels of each layer's output.
        reductions: output stride of each layer (input size / output size).
        low_level_layer: index of the layer a DeepLabv3+ decoder reads low-level
            features from (see :func:`_pick_low_level_layer`).
        torchvision_prefixes: torchvision state-dict key prefix -> our key prefix
            (e.g. ``"layer2.1."`` -> ``"layers.4."``), used to load and save
            torchvision-format weights; empty where no torchvision counterpart exists.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        *,
        out_channels: Sequence[int],
        reductions: Sequence[int],
        torchvision_prefixes: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if not (len(layers) == len(out_channels) == len(reductions)) or not layers:
            raise ValueError("layers, out_channels and reductions must be non-empty, same length")
        self.layers = nn.ModuleList(layers)
        self.out_channels: tuple[int, ...] = tuple(int(c) for c in out_channels)
        self.reductions: tuple[int, ...] = tuple(int(r) for r in reductions)
        self.low_level_layer: int = _pick_low_level_layer(self.reductions)
        self.torchvision_prefixes: dict[str, str] = dict(torchvision_prefixes or {})

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        """Return the outputs of all L layers, each ``[B, out_channels[l], H/r_l, W/r_l]``."""
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs


def _init_weights(module: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal (fan-out) convs, BN at identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _finish(model: Backbone, weights: str | None) -> Backbone:
    _init_weights(model)
    if weights is not None:
        torchvision_weights.load_torchvision_weights(model, weights)
    return model


# --------------------------------------------------------------------------- ResNet family


def _resnet(
    *,
    depths: Sequence[int],
    widths: Sequence[int],
    stem_width: int,
    stem_kernel: int,
    stem_stride: int,
    stem_pool: bool,
    in_channels: int = 3,
    weights: str | None = None,
) -> Backbone:
    """ResNet with basic blocks: a stem layer, then one layer per residual block.

    Stage ``s`` has ``depths[s]`` blocks of ``widths[s]`` channels; the first block of every
    stage but the first halves the resolution. Key names follow torchvision
    (``conv1``/``bn1`` stem, ``layer{s}.{b}`` blocks), so torchvision ResNet checkpoints load
    and the small variants use the same naming.
    """
    stem: OrderedDict[str, nn.Module] = OrderedDict(
        conv1=nn.Conv2d(
            in_channels, stem_width, stem_kernel, stem_stride, stem_kernel // 2, bias=False
        ),
        bn1=nn.BatchNorm2d(stem_width),
        relu=nn.ReLU(),
    )
    reduction = stem_stride
    if stem_pool:
        stem["maxpool"] = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        reduction *= 2
    layers: list[nn.Module] = [nn.Sequential(stem)]
    channels, reductions = [stem_width], [reduction]
    prefixes = {"conv1.": "layers.0.conv1.", "bn1.": "layers.0.bn1."}
    cin = stem_width
    for s, (depth, width) in enumerate(zip(depths, widths, strict=True)):
        for b in range(depth):
            stride = 2 if (s > 0 and b == 0) else 1
            prefixes[f"layer{s + 1}.{b}."] = f"layers.{len(layers)}."
            layers.append(BasicBlock(cin, width, stride))
            reduction *= stride
            cin = width
            channels.append(width)
            reductions.append(reduction)
    model = Backbone(
        layers, out_channels=channels, reductions=reductions, torchvision_prefixes=prefixes
    )
    return _finish(model, weights)


# ------------------------------------------------------------------------ MobileNetV2 family


def _make_divisible(v: float, divisor: int) -> int:
    """Round channels to a multiple of ``divisor`` without dropping >10% (torchvision's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


# expansion t, output channels c, repeats n, first stride s (torchvision / the paper, Table 2)
_MOBILENETV2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _mobilenetv2(
    *,
    width_mult: float,
    round_nearest: int = 8,
    in_channels: int = 3,
    weights: str | None = None,
) -> Backbone:
    """MobileNetV2 features: stem conv, one layer per inverted-residual block, final 1x1.

    Layer ``i`` is torchvision's ``features.{i}`` (19 layers at the default settings).
    """
    if width_mult <= 0:
        raise UserError(f"mobilenetv2: width_mult must be > 0, got {width_mult}")
    cin = _make_divisible(32 * width_mult, round_nearest)
    last = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
    layers: list[nn.Module] = [_conv_bn_act(in_channels, cin, 3, stride=2)]
    channels, reductions = [cin], [2]
    for t, c, n, s in _MOBILENETV2_SETTINGS:
        cout = _make_divisible(c * width_mult, round_nearest)
        for i in range(n):
            stride = s if i == 0 else 1
            layers.append(InvertedResidual(cin, cout, stride, t))
            cin = cout
            channels.append(cout)
            reductions.append(reductions[-1] * stride)
    layers.append(_conv_bn_act(cin, last, 1))
    channels.append(last)
    reductions.append(reductions[-1])
    prefixes = {f"features.{i}.": f"layers.{i}." for i in range(len(layers))}
    model = Backbone(
        layers, out_channels=channels, reductions=reductions, torchvision_prefixes=prefixes
    )
    return _finish(model, weights)


# --------------------------------------------------------------------------------- builders

BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")
"""Backbone builders by name: ``tiny_resnet``, ``resnet18``, ``resnet34``, ``mobilenetv2``."""


@BACKBONES.register("tiny_resnet")
def tiny_resnet(*, width: int = 16, in_channels: int = 3, weights: str | None = None) -> Backbone:
    """A CPU-sized ResNet for 64x64 inputs: 7 layers, output stride 8.

    Layer 0 is a 3x3 stride-2 stem conv (``width`` channels); then two basic blocks per
    stage at ``width``, ``2 * width``, ``4 * width`` channels (strides 2, 2, 4, 4, 8, 8).
    Weights use torchvision ResNet key names (``conv1``, ``bn1``, ``layer{1,2,3}.{0,1}``).
    """
    if width < 1:
        raise UserError(f"tiny_resnet: width must be >= 1, got {width}")
    return _resnet(
        depths=(2, 2, 2),
        widths=(width, 2 * width, 4 * width),
        stem_width=width,
        stem_kernel=3,
        stem_stride=2,
        stem_pool=False,
        in_channels=in_channels,
        weights=weights,
    )


@BACKBONES.register("resnet18")
def resnet18(*, in_channels: int = 3, weights: str | None = None) -> Backbone:
    """torchvision's ResNet-18 without ``avgpool``/``fc``: 9 layers (stem + 8 blocks)."""
    return _resnet(
        depths=(2, 2, 2, 2),
        widths=(64, 128, 256, 512),
        stem_width=64,
        stem_kernel=7,
        stem_stride=2,
        stem_pool=True,
        in_channels=in_channels,
        weights=weights,
    )


@BACKBONES.register("resnet34")
def resnet34(*, in_channels: int = 3, weights: str | None = None) -> Backbone:
    """torchvision's ResNet-34 without ``avgpool``/``fc``: 17 layers (stem + 16 blocks)."""
    return _resnet(
        depths=(3, 4, 6, 3),
        widths=(64, 128, 256, 512),
        stem_width=64,
        stem_kernel=7,
        stem_stride=2,
        stem_pool=True,
        in_channels=in_channels,
        weights=weights,
    )


@BACKBONES.register("mobilenetv2")
def mobilenetv2(
    *, width_mult: float = 1.0, in_channels: int = 3, weights: str | None = None
) -> Backbone:
    """torchvision's MobileNetV2 ``features``: 19 layers (stem, 17 blocks, final 1x1 conv)."""
    return _mobilenetv2(width_mult=width_mult, in_channels=in_channels, weights=weights)


def check_kwargs(kind: str, name: str, builder: Callable[..., object], kwargs: dict) -> None:
    """Fail with one line naming the accepted arguments if ``kwargs`` has an unknown one.

    Builders get their arguments from config files, so a typo must be a :class:`UserError`
    that lists the options, not a ``TypeError`` traceback.
    """
    params = inspect.signature(builder).parameters
    accepted = [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(
            f"{kind} {name!r} got unknown argument(s) {', '.join(unknown)}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )


def build_backbone(name: str, **kwargs: object) -> Backbone:
    """Build the backbone registered as ``name`` with the builder's keyword arguments."""
    builder = BACKBONES.get(name)
    check_kwargs("backbone", name, builder, kwargs)
    return builder(**kwargs)
