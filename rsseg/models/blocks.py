"""Decoder building blocks shared by the architectures.

Everything here exports to ONNX with dynamic H/W: global pooling is `mean((2, 3))`, upsampling uses
constant scale factors, no module has a fixed spatial size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rsseg.errors import ConfigError

log = logging.getLogger(__name__)

class ConvBNReLU(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, dilation: int = 1) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel_size, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (Roy et al. 2018): x * cSE(x) + x * sSE(x)."""

    def __init__(self, channels: int, reduction: int = 1) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.cse = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )
        self.sse = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean over H, W (not AdaptiveAvgPool2d) keeps ONNX export shape-agnostic
        return x * self.cse(x.mean((2, 3), keepdim=True)) + x * self.sse(x)


def make_attention(kind: str | None, channels: int, reduction: int = 1) -> nn.Module:
    if kind == "scse":
        return SCSE(channels, reduction)
    if kind is None or kind == "none":
        return nn.Identity()
    raise ConfigError(f"attention {kind!r} is not one of scse, none")


class InvertedResidual(nn.Module):
    """EfficientUNet++ decoder conv: 1x1 expand, depthwise kxk, Hardswish, attention, 1x1 project.

    The residual is the identity when shapes match, else a 1x1 conv + BN projection (as in the seed).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel_size: int = 5,
        expansion: int = 1,
        attention: str | None = "scse",
        attention_reduction: int = 1,
    ) -> None:
        super().__init__()
        mid = in_ch * expansion
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.Hardswish(inplace=True),
            nn.Conv2d(mid, mid, kernel_size, padding=kernel_size // 2, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.Hardswish(inplace=True),
            make_attention(attention, mid, attention_reduction),
            nn.Conv2d(mid, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.skip: nn.Module = (
            nn.Identity()
            if in_ch == out_ch
            else nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


DECODER_BLOCKS = ("conv", "inverted_residual")
# SCSE channel reduction per block kind: smp's 16 for conv blocks, the seed's 1 for inverted residuals.
DEFAULT_REDUCTION = {"conv": 16, "inverted_residual": 1}


class UNetDecoderBlock(nn.Module):
    """Upsample x2 (nearest), concat the skip (if any), two InvertedResidual convs (the seed's block)."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, **ir_kwargs: object) -> None:
        super().__init__()
        self.conv1 = InvertedResidual(in_ch + skip_ch, out_ch, **ir_kwargs)  # type: ignore[arg-type]
        self.conv2 = InvertedResidual(out_ch, out_ch, **ir_kwargs)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class ConvDecoderBlock(nn.Module):
    """Upsample x2 (nearest), concat the skip, attention, two 3x3 conv-BN-ReLU, attention: the classic UNet
    block (as segmentation_models_pytorch builds it). Dense 3x3 convolutions train about twice as fast
    per tile on a CPU as the seed's depthwise 5x5 blocks, and learned more per minute (README)."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, attention: str | None = "scse",
                 attention_reduction: int = 16, **_: object) -> None:
        super().__init__()
        self.attention1 = make_attention(attention, in_ch + skip_ch, attention_reduction) if skip_ch else nn.Identity()
        self.conv1 = ConvBNReLU(in_ch + skip_ch, out_ch)
        self.conv2 = ConvBNReLU(out_ch, out_ch)
        self.attention2 = make_attention(attention, out_ch, attention_reduction)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if skip is not None:
            x = self.attention1(torch.cat([x, skip], dim=1))
        return self.attention2(self.conv2(self.conv1(x)))


class UNetDecoder(nn.Module):
    """UNet decoder sized from the encoder's feature levels.

    The deepest level is the input; each block halves the reduction and concatenates the level with that
    reduction (if the encoder has one). If the blocks stop short of full resolution (an encoder without a
    stride-2 level), a final bilinear upsample closes the gap. Output: `decoder_channels[-1]` channels at
    input resolution.
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        decoder_channels: Sequence[int],
        kernel_size: int = 5,
        expansion: int = 1,
        attention: str | None = "scse",
        attention_reduction: int | None = None,
        block: str = "conv",
    ) -> None:
        super().__init__()
        if block not in DECODER_BLOCKS:
            raise ConfigError(f"decoder block {block!r} is not one of {', '.join(DECODER_BLOCKS)}")
        block_cls = ConvDecoderBlock if block == "conv" else UNetDecoderBlock
        reduction_ = DEFAULT_REDUCTION[block] if attention_reduction is None else int(attention_reduction)
        if not decoder_channels:
            raise ConfigError("decoder_channels is empty; give one channel count per decoder block")
        skip_of = {r: i for i, r in enumerate(reductions[:-1])}  # deepest level per reduction wins
        reduction = int(reductions[-1])
        in_ch = int(channels[-1])
        blocks, skips = [], []
        for out_ch in decoder_channels:
            if reduction % 2:
                raise ConfigError(
                    f"{len(decoder_channels)} decoder blocks upsample past input resolution "
                    f"(deepest encoder reduction {reductions[-1]}); use fewer decoder_channels"
                )
            reduction //= 2
            skip = skip_of.get(reduction, -1)
            skip_ch = int(channels[skip]) if skip >= 0 else 0
            blocks.append(
                block_cls(
                    in_ch, skip_ch, int(out_ch), kernel_size=kernel_size, expansion=expansion,
                    attention=attention, attention_reduction=reduction_,
                )
            )
            skips.append(skip)
            in_ch = int(out_ch)
        self.blocks = nn.ModuleList(blocks)
        self.skips = skips
        self.final_scale = reduction  # >1 only for encoders without a stride-2 level
        self.out_channels = in_ch
        init_decoder(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_stages(features)[-1]

    def forward_stages(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every block's output, shallowest last (the last one at input resolution)."""
        x = features[-1]
        stages = []
        for block, skip in zip(self.blocks, self.skips):
            x = block(x, features[skip] if skip >= 0 else None)
            stages.append(x)
        if self.final_scale > 1:
            stages[-1] = F.interpolate(x, scale_factor=float(self.final_scale), mode="bilinear", align_corners=False)
        return stages


class ConcatLevels(nn.Module):
    """Every feature level upsampled (bilinear, constant factors) to the finest level's resolution and
    concatenated: HRNet's "all resolutions fused" representation, for any encoder. Output channels:
    `sum(channels)`, at reduction `min(reductions)`."""

    def __init__(self, channels: Sequence[int], reductions: Sequence[int]) -> None:
        super().__init__()
        self.reduction = int(min(reductions))
        self.scales = [int(r) // self.reduction for r in reductions]
        self.out_channels = int(sum(channels))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.cat([
            f if s == 1 else F.interpolate(f, scale_factor=float(s), mode="bilinear", align_corners=False)
            for f, s in zip(features, self.scales)
        ], dim=1)


class SegmentationHead(nn.Conv2d):
    """kxk conv to the logits channels (no activation: the model returns raw logits)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3) -> None:
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2)
        nn.init.xavier_uniform_(self.weight)
        nn.init.zeros_(self.bias)


def init_decoder(module: nn.Module) -> None:
    """Kaiming init for convs, unit/zero BatchNorm (as segmentation_models_pytorch does)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def int_tuple(value: Sequence[int] | str | int, what: str) -> tuple[int, ...]:
    """(128, 64) from a sequence, a single int, or "128,64" (as CLI/MLflow params arrive)."""
    if isinstance(value, str):
        parts = [p for p in value.replace(" ", "").strip("()[]").split(",") if p]
    elif isinstance(value, int):
        parts = [value]
    else:
        parts = list(value)
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a list of integers, got {value!r}") from None
    if not out or any(v < 1 for v in out):
        raise ConfigError(f"{what} must be a non-empty list of positive integers, got {value!r}")
    return out
