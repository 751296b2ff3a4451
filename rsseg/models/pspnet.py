"""`pspnet` (Zhao et al. 2017, "Pyramid Scene Parsing Network", CVPR) and `siamese_pspnet` (PSPNet heads on a
shared encoder for change detection: the 1st-place SenseEarth 2020 model, LiheYoung/SenseEarth2020-ChangeDetection).

Encoder features: by default (`levels="auto"`) a timm HRNet gives its own representation, every branch
(strides 4..32) upsampled to stride 4 and concatenated (ConcatLevels, as the seed's HRNet does); any other encoder
gives its deepest level, dilated to `output_stride` 8 where timm can (16 otherwise). On that map a pyramid
pooling module (bins 1, 2, 3, 6) adds context at four scales; a 3x3 conv-BN-ReLU bottleneck, dropout 0.1 and a
1x1 classifier give logits, upsampled to the input by a constant factor.

ONNX (dynamic batch/H/W, opset 17): `F.adaptive_avg_pool2d` to k > 1 bins does not export with dynamic H/W
(the TorchScript exporter raises "input size not accessible"), and slicing windows with bounds computed from the
traced size in Python broke parity even at the traced shape (floor division of traced sizes). Here the bins are
two matrix products with averaging matrices built at run time from the feature size (`adaptive_avg_pool`): the
same windows as PyTorch's adaptive pooling, for any size (divisible by the bin or not, even smaller than it), and
they export as Range/comparison/MatMul ops with parity. Going back to the feature size needs a size-based
bilinear resize (H / bins is not a constant factor); the 1-bin branch is a broadcast (mean + expand).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsseg.errors import ConfigError
from rsseg.heads import CHANGE, SEMANTIC
from rsseg.models.blocks import ConcatLevels, ConvBNReLU, SegmentationHead, init_decoder, int_tuple
from rsseg.models.change import check_change_outputs
from rsseg.models.encoders import (
    Level,
    branch_features_kwargs,
    create_encoder,
    dilated_encoder_kwargs,
    feature_levels,
)
from rsseg.models.registry import SegmentationModel, register_model
from rsseg.spec import OutputGroup

log = logging.getLogger(__name__)

PSP_BINS = (1, 2, 3, 6)  # the paper's pyramid
LEVEL_MODES = ("auto", "deepest", "concat")
SEMANTIC_HEADS = ("psp", "fcn")
HRNET_ENCODER = "hrnet_w18"  # the seed's (and the recommended) encoder of siamese_pspnet


def adaptive_pool_matrix(size: int | torch.Tensor, bins: int, like: torch.Tensor) -> torch.Tensor:
    """(bins, size) averaging matrix: row i averages the window [floor(i*size/bins), ceil((i+1)*size/bins)),
    PyTorch's adaptive pooling windows. `size` may be a traced/symbolic size: the matrix is built from it at
    run time (Range, comparisons), so an exported graph stays valid for every input size."""
    i = torch.arange(bins, device=like.device)
    start = torch.div(i * size, bins, rounding_mode="floor")
    end = torch.div((i + 1) * size + (bins - 1), bins, rounding_mode="floor")  # ceil, without negative operands
    pos = torch.arange(size, device=like.device)
    window = ((pos >= start[:, None]) & (pos < end[:, None])).to(like.dtype)
    return window / window.sum(1, keepdim=True)


def adaptive_avg_pool(x: torch.Tensor, bins: int) -> torch.Tensor:
    """`F.adaptive_avg_pool2d(x, bins)` as (bins x H) @ x @ (W x bins): exports to ONNX with dynamic H/W."""
    rows = adaptive_pool_matrix(x.shape[-2], bins, x)
    cols = adaptive_pool_matrix(x.shape[-1], bins, x)
    return rows @ x @ cols.transpose(0, 1)


class PyramidPooling(nn.Module):
    """Pyramid pooling module (Zhao et al. 2017, section 3.2): per bin b, adaptive average pool to b x b ->
    1x1 conv to `bin_channels` -> norm -> ReLU -> bilinear upsample to the feature size; concatenated with the
    feature. Output channels: in_ch + len(bins) * bin_channels.

    Normalisation: the 1-bin branch is a 1x1 map, where BatchNorm fails at batch size 1 in training, so it has
    a conv bias and no norm (as ASPPPooling in deeplab.py). Bins >= 2 keep the paper's BatchNorm: a b x b map
    gives it at least 4 values per channel even at batch size 1.
    """

    def __init__(self, in_ch: int, bins: Sequence[int], bin_channels: int) -> None:
        super().__init__()
        self.bins = tuple(int(b) for b in bins)
        self.stages = nn.ModuleList([
            nn.Sequential(nn.Conv2d(in_ch, bin_channels, 1), nn.ReLU(inplace=True)) if b == 1
            else ConvBNReLU(in_ch, bin_channels, 1)
            for b in self.bins
        ])
        self.out_channels = in_ch + len(self.bins) * bin_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2], x.shape[-1]
        out = [x]
        for b, stage in zip(self.bins, self.stages):
            if b == 1:
                # bilinear upsampling of a 1x1 map is a broadcast; mean + expand keeps the graph shape-agnostic
                out.append(stage(x.mean((2, 3), keepdim=True)).expand(-1, -1, h, w))
            else:
                # H / b is no constant factor: a size-based resize is the only way back to the feature size
                y = stage(adaptive_avg_pool(x, b))
                out.append(F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False))
        return torch.cat(out, dim=1)


class SeparableConvBNReLU(nn.Sequential):
    """Depthwise-separable 3x3: depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU (the seed's DSConv, used
    with `--lightweight`, followed by the BN + ReLU its heads put after every 3x3 conv)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch, bias=False),
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class PSPHead(nn.Module):
    """[pyramid pooling] -> 3x3 conv-BN-ReLU bottleneck to `channels` -> dropout -> 1x1 classifier.

    `pyramid=False` drops the pooling module: the seed's FCNHead (its semantic head). `lightweight`: the 3x3
    conv is depthwise-separable.
    """

    def __init__(self, in_ch: int, out_ch: int, channels: int, bins: Sequence[int] = PSP_BINS,
                 dropout: float = 0.1, lightweight: bool = False, pyramid: bool = True) -> None:
        super().__init__()
        # each bin gets 1/len(bins) of the input channels (the paper's 1/N; the seed's in_ch // 4)
        self.ppm: nn.Module = PyramidPooling(in_ch, bins, max(1, in_ch // len(bins))) if pyramid else nn.Identity()
        mid = self.ppm.out_channels if isinstance(self.ppm, PyramidPooling) else in_ch
        self.bottleneck = SeparableConvBNReLU(mid, channels) if lightweight else ConvBNReLU(mid, channels, 3)
        self.dropout = nn.Dropout(dropout)  # element-wise, as the seed's heads (nn.Dropout(0.1))
        init_decoder(self)
        self.classifier = SegmentationHead(channels, out_ch, kernel_size=1)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.bottleneck(self.ppm(x))))


def default_psp_channels(in_ch: int) -> int:
    """Bottleneck width when `psp_channels` is not given: in_ch // 4, within [64, 512].

    The paper's ResNet gives 2048 channels and a 512-wide bottleneck (in / 4); the seed uses in // 4 as well
    (67 on HRNet-W18's 270 fused channels). A fixed 512 on a light encoder (384 channels for tf_efficientnet_lite3,
    768 after pooling) makes the 3x3 bottleneck 3.5 M parameters, more than half the 6.4 M encoder, where 96
    gives 0.66 M; so the width follows the encoder. 64 keeps tiny encoders from a too-thin head.
    """
    return int(min(512, max(64, in_ch // 4)))


class _PSPBase(SegmentationModel):
    """Encoder -> one feature map (the deepest level, or all levels concatenated) for the PSP heads."""

    def __init__(self, encoder: nn.Module, in_channels: int, outputs: Sequence[OutputGroup], concat: bool) -> None:
        channels, reductions = encoder.feature_info.channels(), encoder.feature_info.reduction()
        super().__init__(in_channels, outputs, stride=max(reductions))
        self.encoder = encoder
        self.concat = ConcatLevels(channels, reductions) if concat else None
        self.feature_channels = self.concat.out_channels if self.concat is not None else int(channels[-1])
        # a constant scale factor (not a size) keeps the final ONNX Resize free of shape arithmetic
        self.up_to_input = self.concat.reduction if self.concat is not None else int(reductions[-1])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        return self.concat(feats) if self.concat is not None else feats[-1]

    def upsample(self, y: torch.Tensor) -> torch.Tensor:
        if self.up_to_input > 1:
            y = F.interpolate(y, scale_factor=float(self.up_to_input), mode="bilinear", align_corners=False)
        return y


class PSPNet(_PSPBase):
    """Encoder feature -> PSPHead -> bilinear upsample (constant factor) to the input."""

    def __init__(self, encoder: nn.Module, in_channels: int, outputs: Sequence[OutputGroup], concat: bool = False,
                 bins: Sequence[int] = PSP_BINS, psp_channels: int | None = None, dropout: float = 0.1,
                 lightweight: bool = False) -> None:
        super().__init__(encoder, in_channels, outputs, concat)
        width = psp_channels or default_psp_channels(self.feature_channels)
        self.head = PSPHead(self.feature_channels, self.out_channels, width, bins, dropout, lightweight)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.head(self.features(x)))


class SiamesePSPNet(_PSPBase):
    """Shared encoder over both dates (one batch of 2N); binary change = PSPHead(|fa - fb|) with 2 channels, as
    the seed's `head_bin` (it uses the absolute difference of the two dates' HRNet features); with semantic
    groups one semantic head, shared by the dates, on each date's own features. Channels follow `outputs`."""

    def __init__(self, encoder: nn.Module, in_channels: int, outputs: Sequence[OutputGroup], concat: bool = True,
                 bins: Sequence[int] = PSP_BINS, psp_channels: int | None = None, dropout: float = 0.1,
                 lightweight: bool = False, semantic_head: str = "psp") -> None:
        super().__init__(encoder, in_channels, outputs, concat)
        semantic = check_change_outputs(self.outputs)
        width = psp_channels or default_psp_channels(self.feature_channels)
        self.change_head = PSPHead(self.feature_channels, 2, width, bins, dropout, lightweight)
        self.semantic_head: PSPHead | None = None
        if semantic:
            k = next(g.channels for g in self.outputs if g.name == SEMANTIC[0])
            self.semantic_head = PSPHead(self.feature_channels, k, width, bins, dropout, lightweight,
                                         pyramid=semantic_head == "psp")
        self.order = [g.name for g in self.outputs]

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        bands = self.in_channels // 2
        # One encoder pass over both dates: shared weights, and BatchNorm normalises them alike.
        f = self.features(torch.cat([x[:, :bands], x[:, bands:]], dim=0))
        logits = {CHANGE: self.change_head(torch.abs(f[:n] - f[n:]))}
        if self.semantic_head is not None:
            sem = self.semantic_head(f)
            logits[SEMANTIC[0]], logits[SEMANTIC[1]] = sem[:n], sem[n:]
        # bilinear resizing is per channel: one resize of the concatenated logits
        return self.upsample(torch.cat([logits[name] for name in self.order], dim=1))


def parse_bins(value: Sequence[int] | str | int) -> tuple[int, ...]:
    """(1, 2, 3, 6) from a sequence, an int, or "1,2,3,6" / "1/2/3/6" (model_options separates options with
    commas, so there the bins are written with slashes)."""
    if isinstance(value, str):
        value = ",".join(p for p in re.split(r"[,;/\s]+", value.strip("()[] ")) if p)
    bins = int_tuple(value, "bins")
    if len(set(bins)) != len(bins):
        raise ConfigError(f"bins {bins} repeats a bin size; give distinct sizes, e.g. bins=1/2/3/6")
    return bins


def select_psp_levels(levels: Sequence[Level], encoder_depth: int | None, concat: bool, encoder: str) -> list[Level]:
    """The levels to build: of the first `encoder_depth` (default all), the deepest one, or with `concat` all
    those at reduction >= 4 (a stride-2 stem would make the fused map 4x larger for little gain)."""
    depth = len(levels) if encoder_depth is None else encoder_depth
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"encoder_depth must be a positive integer (or empty for all levels), got {encoder_depth!r}")
    if depth > len(levels):
        raise ConfigError(
            f"encoder_depth {depth} but encoder {encoder!r} offers {len(levels)} feature levels "
            f"(reductions {[lv.reduction for lv in levels]}); use encoder_depth <= {len(levels)}"
        )
    used = list(levels[:depth])
    if not concat:
        return used[-1:]
    return [lv for lv in used if lv.reduction >= 4] or used


def build_psp_encoder(encoder: str, bands: int, pretrained_path: str | None, output_stride: int,
                      encoder_depth: int | None, levels: str, trim_encoder: bool,
                      encoder_kwargs: dict[str, Any] | None) -> tuple[nn.Module, bool]:
    """The timm encoder over `bands` channels and whether its levels are to be concatenated.

    HRNets give their raw branch outputs (branch_features_kwargs) and keep their own strides; other encoders are
    dilated to `output_stride` where timm allows it (dilated_encoder_kwargs).
    """
    concat = encoder.startswith("hrnet_") if levels == "auto" else levels == "concat"
    kwargs = dilated_encoder_kwargs(encoder, bands, output_stride, branch_features_kwargs(encoder, encoder_kwargs))
    chosen = select_psp_levels(feature_levels(encoder, bands, kwargs), encoder_depth, concat, encoder)
    enc = create_encoder(encoder, bands, [lv.index for lv in chosen], pretrained_path, trim=trim_encoder,
                         encoder_kwargs=kwargs)
    return enc, concat and len(chosen) > 1


@dataclass
class PSPOptions:
    """Options of `pspnet` (and, with `semantic_head`, of `siamese_pspnet`).

    output_stride: 8 (the paper's), 16 or 32: the encoder's last stages are dilated to keep this stride;
        encoders that cannot dilate that far fall back to 16, then to their own strides (HRNet).
    encoder_depth: use only the first N feature levels (default: all).
    levels: "deepest" = PSP on the deepest used level; "concat" = every used level at reduction >= 4
        upsampled to the finest and concatenated (HRNet's representation); "auto" = concat for HRNet
        encoders (their deepest branch alone is stride 32 with few channels), deepest otherwise.
    bins: pyramid bin sizes (default 1, 2, 3, 6); in model_options write bins=1/2/3/6.
    psp_channels: bottleneck width; default in_ch // 4 within [64, 512] (see default_psp_channels): 96 for
        tf_efficientnet_lite3, 512 for a ResNet-50 as in the paper.
    dropout: before the classifier (the paper's 0.1).
    lightweight: depthwise-separable 3x3 convs in the head (the seed's --lightweight).
    trim_encoder: drop encoder blocks after the deepest used level (see create_encoder).
    encoder_kwargs: extra timm.create_model options.
    """

    output_stride: int = 8
    encoder_depth: int | None = None
    levels: str = "auto"
    bins: Sequence[int] | str = PSP_BINS
    psp_channels: int | None = None
    dropout: float = 0.1
    lightweight: bool = False
    trim_encoder: bool = True
    encoder_kwargs: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.output_stride, bool) or self.output_stride not in (8, 16, 32):
            raise ConfigError(f"output_stride must be 8, 16 or 32, got {self.output_stride!r}")
        if self.levels not in LEVEL_MODES:
            raise ConfigError(f"levels {self.levels!r} is not one of {', '.join(LEVEL_MODES)}")
        channels = self.psp_channels
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ConfigError(f"psp_channels must be a positive integer (or empty for the default), got {channels!r}")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not isinstance(self.lightweight, bool):
            raise ConfigError(f"lightweight must be true or false, got {self.lightweight!r}")
        self.bins = parse_bins(self.bins)

    def build_encoder(self, encoder: str, bands: int, pretrained_path: str | None) -> tuple[nn.Module, bool]:
        """See build_psp_encoder."""
        return build_psp_encoder(encoder, bands, pretrained_path, self.output_stride, self.encoder_depth,
                                 self.levels, self.trim_encoder, self.encoder_kwargs)

    def head_kwargs(self) -> dict[str, Any]:
        """The PSP head's options, as PSPNet and SiamesePSPNet take them."""
        return {"bins": self.bins, "psp_channels": self.psp_channels, "dropout": float(self.dropout),
                "lightweight": self.lightweight}


@dataclass
class SiamesePSPOptions(PSPOptions):
    """PSPOptions plus `semantic_head`: "psp" (default: a PSP head per date, shared) or "fcn" (the seed's
    semantic head: no pyramid pooling, 3x3 conv-BN-ReLU, dropout, 1x1)."""

    semantic_head: str = "psp"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.semantic_head not in SEMANTIC_HEADS:
            raise ConfigError(f"semantic_head {self.semantic_head!r} is not one of {', '.join(SEMANTIC_HEADS)}")


@register_model("pspnet", tasks=("binary", "multiclass"), options=PSPOptions)
def pspnet(encoder: str, in_channels: int, outputs: Sequence[OutputGroup], pretrained_path: str | None = None,
           options: PSPOptions = PSPOptions()) -> PSPNet:
    """PSPNet (Zhao et al. 2017) on any timm encoder (PSPOptions). `stride` = the deepest reduction used (8
    with a dilatable encoder, 32 for HRNet)."""
    enc, concat = options.build_encoder(encoder, in_channels, pretrained_path)
    return PSPNet(enc, in_channels, outputs, concat=concat, **options.head_kwargs())


@register_model("siamese_pspnet", tasks=("change",), options=SiamesePSPOptions, default_encoder=HRNET_ENCODER)
def siamese_pspnet(encoder: str, in_channels: int, outputs: Sequence[OutputGroup], pretrained_path: str | None = None,
                   options: SiamesePSPOptions = SiamesePSPOptions()) -> SiamesePSPNet:
    """Siamese PSPNet, the SenseEarth 2020 winner's model; `in_channels` = 2 * bands (date A first).

    Recommended (and registered default) encoder: hrnet_w18, the seed's (its final models: HRNet-W18 and W40),
    all four branches concatenated at stride 4 (270 channels); the project-wide training default
    tf_efficientnet_lite3 applies only where an encoder is named. Other encoders use their dilated deepest
    level (levels="auto"), like `pspnet`: fusing all levels at stride 4 would run both 3x3 PSP bottlenecks on a
    map 4x the size of a stride-8 one with more channels (levels="concat" does it anyway).

    Options: SiamesePSPOptions. The seed's `lightweight` runs: lightweight=true.
    """
    check_change_outputs(outputs)
    if in_channels % 2:
        raise ConfigError(
            f"change models take two dates concatenated on channels, so in_channels must be even; got {in_channels}"
        )
    enc, concat = options.build_encoder(encoder, in_channels // 2, pretrained_path)
    return SiamesePSPNet(enc, in_channels, outputs, concat=concat, semantic_head=options.semantic_head,
                         **options.head_kwargs())
