"""Task heads: task-specific, outside the search (METHOD.md 1.1).

A :class:`Head` reads the last layer of its task's path (``high``) and, for DeepLabv3+,
one earlier layer (``low``, the backbone layer index in :attr:`Head.low_layer`). Heads are
never stacked across streams, so unlike backbone layers they may concatenate channels,
pool and use linear layers freely.

Builders are registered in :data:`HEADS`; :func:`build_head` is the entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dymu.errors import UserError
from dymu.models.backbones import check_kwargs
from dymu.registry import Registry


class Head(nn.Module):
    """Base class of task heads.

    Attributes:
        low_layer: index of the backbone layer whose output the head takes as ``low``;
            None when the head uses no low-level features (``low`` is then ignored).
    """

    low_layer: int | None = None

    def forward(self, high: Tensor, low: Tensor | None, out_size: tuple[int, int]) -> Tensor:
        """Map features to the task output.

        Args:
            high: ``[B, C_high, h, w]`` output of the last backbone layer of the task's path.
            low: ``[B, C_low, h_low, w_low]`` output of layer :attr:`low_layer`, or None.
            out_size: ``(H, W)`` of a dense output (the input image size).
        """
        raise NotImplementedError


def _conv_bn_relu(cin: int, cout: int, kernel_size: int, dilation: int = 1) -> nn.Sequential:
    padding = (kernel_size // 2) * dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ASPPPooling(nn.Module):
    """Image-level branch of ASPP: global average, 1x1 conv, broadcast back to the map."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = _conv_bn_relu(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        # [B, C, 1, 1] -> [B, C, h, w]: upsampling a 1x1 map is a broadcast, done exactly.
        return self.proj(self.pool(x)).expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3): 1x1, atrous 3x3s, image pooling, project."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int], dropout: float) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(cin, cout, 1)]
        branches += [_conv_bn_relu(cin, cout, 3, dilation=int(r)) for r in rates]
        branches.append(ASPPPooling(cin, cout))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(
            *_conv_bn_relu(len(branches) * cout, cout, 1), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        # [B, cin, h, w] -> [B, n_branches * cout, h, w] -> [B, cout, h, w]
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3PlusHead(Head):
    """DeepLabv3+ head: ASPP on ``high``, a decoder that mixes in ``low``, a 1x1 classifier.

    Decoder (Chen et al., ECCV 2018): ``low`` is reduced by a 1x1 conv to a few channels (so
    it does not outweigh the ASPP features), the ASPP output is upsampled bilinearly to
    ``low``'s size and concatenated, two 3x3 convs refine, a 1x1 conv predicts and the
    result is upsampled bilinearly to ``out_size``. Without low-level input (``low_layer``
    None) the decoder refines the ASPP output alone (DeepLabv3 with a 3x3 refinement).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        low_channels: int | None,
        low_layer: int | None,
        out_channels: int,
        aspp_channels: int,
        rates: Sequence[int],
        low_proj_channels: int,
        decoder_channels: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.low_layer = low_layer
        self.aspp = ASPP(in_channels, aspp_channels, rates, dropout)
        if low_channels is None:
            self.low_proj: nn.Module | None = None
            dec_in = aspp_channels
        else:
            self.low_proj = _conv_bn_relu(low_channels, low_proj_channels, 1)
            dec_in = aspp_channels + low_proj_channels
        self.decoder = nn.Sequential(
            _conv_bn_relu(dec_in, decoder_channels, 3),
            _conv_bn_relu(decoder_channels, decoder_channels, 3),
        )
        self.classifier = nn.Conv2d(decoder_channels, out_channels, 1)

    def forward(self, high: Tensor, low: Tensor | None, out_size: tuple[int, int]) -> Tensor:
        x = self.aspp(high)  # [B, aspp, h, w]
        if self.low_proj is not None:
            if low is None:
                raise ValueError(f"this head needs low-level features of layer {self.low_layer}")
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, self.low_proj(low)], dim=1)  # [B, aspp + low_proj, h_low, w_low]
        x = self.classifier(self.decoder(x))
        return F.interpolate(x, size=tuple(out_size), mode="bilinear", align_corners=False)


class ClassificationHead(Head):
    """Global average pooling and a linear classifier; returns ``[B, out_channels]``.

    Uses only ``high``: ``low`` and ``out_size`` are accepted for a uniform call and ignored,
    and :attr:`low_layer` is always None so the search knows no earlier node is read.
    """

    def __init__(self, *, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.low_layer = None
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_channels, out_channels)

    def forward(self, high: Tensor, low: Tensor | None, out_size: tuple[int, int]) -> Tensor:
        x = self.pool(high).flatten(1)  # [B, C, 1, 1] -> [B, C]
        return self.fc(self.dropout(x))


HEADS: Registry[Callable[..., Head]] = Registry("head")
"""Head builders by name: ``deeplabv3plus``, ``deeplabv3plus_light``, ``classification``."""


def _check_low(name: str, low_channels: int | None, low_layer: int | None) -> None:
    if (low_channels is None) != (low_layer is None):
        raise UserError(
            f"head {name!r}: low_channels and low_layer must both be given or both be None "
            f"(got {low_channels} and {low_layer})"
        )


@HEADS.register("deeplabv3plus")
def deeplabv3plus(
    *,
    in_channels: int,
    low_channels: int | None,
    low_layer: int | None,
    out_channels: int,
    aspp_channels: int = 256,
    rates: Sequence[int] = (6, 12, 18),
    low_proj_channels: int = 48,
    decoder_channels: int = 256,
    dropout: float = 0.1,
) -> Head:
    """DeepLabv3+ at the paper's widths (ASPP and decoder 256, low-level 48 channels)."""
    _check_low("deeplabv3plus", low_channels, low_layer)
    return DeepLabV3PlusHead(
        in_channels=in_channels,
        low_channels=low_channels,
        low_layer=low_layer,
        out_channels=out_channels,
        aspp_channels=aspp_channels,
        rates=rates,
        low_proj_channels=low_proj_channels,
        decoder_channels=decoder_channels,
        dropout=dropout,
    )


@HEADS.register("deeplabv3plus_light")
def deeplabv3plus_light(
    *,
    in_channels: int,
    low_channels: int | None,
    low_layer: int | None,
    out_channels: int,
    aspp_channels: int = 16,
    rates: Sequence[int] = (2, 4, 6),
    low_proj_channels: int = 8,
    decoder_channels: int = 16,
    dropout: float = 0.1,
) -> Head:
    """DeepLabv3+ at CPU widths, with atrous rates for 8x8 to 16x16 feature maps.

    The widths keep a head cheaper than one backbone stream of ``tiny_resnet`` (width 16),
    so heads (which every tree runs) do not eat most of a budget.
    """
    _check_low("deeplabv3plus_light", low_channels, low_layer)
    return DeepLabV3PlusHead(
        in_channels=in_channels,
        low_channels=low_channels,
        low_layer=low_layer,
        out_channels=out_channels,
        aspp_channels=aspp_channels,
        rates=rates,
        low_proj_channels=low_proj_channels,
        decoder_channels=decoder_channels,
        dropout=dropout,
    )


@HEADS.register("classification")
def classification(
    *,
    in_channels: int,
    low_channels: int | None = None,
    low_layer: int | None = None,
    out_channels: int,
    dropout: float = 0.0,
) -> Head:
    """Global average pool + linear; ``low_channels``/``low_layer`` are accepted and unused."""
    return ClassificationHead(in_channels=in_channels, out_channels=out_channels, dropout=dropout)


def build_head(
    name: str,
    *,
    in_channels: int,
    low_channels: int | None,
    low_layer: int | None,
    out_channels: int,
    **kwargs: object,
) -> Head:
    """Build the head registered as ``name``.

    Args:
        name: key in :data:`HEADS`.
        in_channels: channels of ``high`` (the backbone's last layer).
        low_channels: channels of ``low``, or None for no low-level input.
        low_layer: backbone layer index ``low`` comes from, or None.
        out_channels: channels (classes) of the task output.
        **kwargs: the builder's own options (e.g. ``rates``, ``aspp_channels``).
    """
    builder = HEADS.get(name)
    check_kwargs("head", name, builder, kwargs)
    for what, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value < 1:
            raise UserError(f"head {name!r}: {what} must be >= 1, got {value}")
    return builder(
        in_channels=in_channels,
        low_channels=low_channels,
        low_layer=low_layer,
        out_channels=out_channels,
        **kwargs,
    )
