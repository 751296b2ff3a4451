"""`deeplabv3plus`: ASPP on the deepest used encoder level, fused with a projected stride-4 level.

Encoder levels deeper than `max_reduction` (16 by default) are not built: the stride-32 stage is dropped
instead of dilated, unless the encoder has nothing at or below `max_reduction`; `output_stride` dilates the
deep stages instead (timm `output_stride`, where the encoder supports it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsseg.errors import ConfigError
from rsseg.models.blocks import ConvBNReLU, SegmentationHead, init_decoder, int_tuple
from rsseg.models.encoders import Level, create_encoder, dilated_encoder_kwargs, feature_levels
from rsseg.models.registry import SegmentationModel, register_model
from rsseg.spec import OutputGroup

log = logging.getLogger(__name__)


class ASPPPooling(nn.Module):
    """Image-level branch: global mean -> 1x1 conv -> ReLU -> broadcast back to the feature size.

    `mean((2, 3))` + expand exports to ONNX with dynamic H/W. No BatchNorm: on a 1x1 map it fails for
    batch size 1 in training.
    """

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x.mean((2, 3), keepdim=True)))
        return y.expand(-1, -1, x.shape[2], x.shape[3])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three dilated 3x3, image pooling; concat; 1x1 projection."""

    def __init__(self, in_ch: int, out_ch: int = 256, rates: Sequence[int] = (6, 12, 18), dropout: float = 0.5) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [ConvBNReLU(in_ch, out_ch, 1)]
            + [ConvBNReLU(in_ch, out_ch, 3, dilation=r) for r in rates]
            + [ASPPPooling(in_ch, out_ch)]
        )
        self.project = nn.Sequential(ConvBNReLU(out_ch * len(self.branches), out_ch, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Plus(SegmentationModel):
    """Encoder (low-level + deep level) -> ASPP -> upsample to low level -> concat -> 2x 3x3 -> head."""

    def __init__(
        self,
        encoder: nn.Module,
        in_channels: int,
        outputs: Sequence[OutputGroup],
        aspp_channels: int = 256,
        atrous_rates: Sequence[int] = (6, 12, 18),
        low_level_channels: int = 48,
        decoder_channels: int = 256,
        dropout: float = 0.5,
    ) -> None:
        channels, reductions = encoder.feature_info.channels(), encoder.feature_info.reduction()
        super().__init__(in_channels, outputs, stride=max(reductions))
        self.encoder = encoder
        self.aspp = ASPP(channels[-1], aspp_channels, atrous_rates, dropout)
        # With a single level (e.g. a plain ViT) there is no low-level branch: DeepLabV3 plus a 3x3 conv.
        self.has_low = len(channels) > 1
        low_ch = low_level_channels if self.has_low else 0
        self.low_proj = ConvBNReLU(channels[0], low_level_channels, 1) if self.has_low else nn.Identity()
        self.fuse = nn.Sequential(
            ConvBNReLU(aspp_channels + low_ch, decoder_channels, 3),
            ConvBNReLU(decoder_channels, decoder_channels, 3),
        )
        self.head = SegmentationHead(decoder_channels, self.out_channels, kernel_size=1)
        # Constant scale factors (not sizes) keep the ONNX Resize ops free of shape arithmetic.
        self.up_to_low = reductions[-1] // reductions[0] if self.has_low else 1
        self.up_to_input = reductions[0] if self.has_low else reductions[-1]
        for m in (self.aspp, self.low_proj, self.fuse):
            init_decoder(m)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        y = self.aspp(features[-1])
        if self.has_low:
            if self.up_to_low > 1:
                y = F.interpolate(y, scale_factor=float(self.up_to_low), mode="bilinear", align_corners=False)
            y = torch.cat([y, self.low_proj(features[0])], dim=1)
        y = self.head(self.fuse(y))
        if self.up_to_input > 1:
            y = F.interpolate(y, scale_factor=float(self.up_to_input), mode="bilinear", align_corners=False)
        return y


def select_deeplab_levels(levels: Sequence[Level], max_reduction: int) -> list[Level]:
    """[low-level, deep] levels: deepest with reduction <= max_reduction, and the one nearest stride 4 below it."""
    usable = [lv for lv in levels if lv.reduction <= max_reduction] or list(levels)
    deep = usable[-1]
    shallower = [lv for lv in usable if lv.reduction < deep.reduction]
    if not shallower:
        return [deep]
    # nearest to stride 4 in log scale; on a tie the deeper one (cheaper, more semantic)
    low = min(shallower, key=lambda lv: (abs(math.log2(lv.reduction) - 2), -lv.reduction))
    return [low, deep]


@register_model("deeplabv3plus")
def deeplabv3plus(
    encoder: str,
    in_channels: int,
    outputs: Sequence[OutputGroup],
    pretrained_path: str | None = None,
    max_reduction: int = 16,
    aspp_channels: int = 256,
    atrous_rates: Sequence[int] | str = (6, 12, 18),
    low_level_channels: int = 48,
    decoder_channels: int = 256,
    dropout: float = 0.5,
    trim_encoder: bool = True,
    encoder_kwargs: dict[str, Any] | None = None,
    output_stride: int | None = None,
) -> DeepLabV3Plus:
    """DeepLabV3+ on any timm encoder; stride = the deepest reduction used (16 by default).

    By default the stages deeper than `max_reduction` are dropped (the sea-ice seed's speed trick: fewer
    parameters and FLOPs); `output_stride=16` (or 8) keeps them and dilates them instead, as the paper does.
    """
    if not isinstance(max_reduction, int) or max_reduction < 1:
        raise ConfigError(f"max_reduction must be a positive integer, got {max_reduction!r}")
    if output_stride is not None:
        encoder_kwargs = dilated_encoder_kwargs(encoder, in_channels, output_stride, encoder_kwargs)
        max_reduction = max(max_reduction, int(output_stride))
    rates = int_tuple(atrous_rates, "atrous_rates")
    levels = select_deeplab_levels(feature_levels(encoder, in_channels, encoder_kwargs), max_reduction)
    enc = create_encoder(
        encoder, in_channels, [lv.index for lv in levels], pretrained_path, trim=trim_encoder, encoder_kwargs=encoder_kwargs
    )
    return DeepLabV3Plus(
        enc, in_channels, outputs, aspp_channels=aspp_channels, atrous_rates=rates,
        low_level_channels=low_level_channels, decoder_channels=decoder_channels, dropout=dropout,
    )
