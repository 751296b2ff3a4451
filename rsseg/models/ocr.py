"""`hrnet_ocr`: HRNet + object-contextual representations (Yuan, Chen, Wang 2020, "Object-Contextual
Representations for Semantic Segmentation", ECCV; reference code HRNet/HRNet-Semantic-Segmentation, branch
HRNet-OCR, lib/models/seg_hrnet_ocr.py).

Encoder: a timm HRNet gives its raw branch outputs (branch_features_kwargs: 18/36/72/144 channels at strides
4..32 for w18); every level at reduction >= 4 is upsampled to the finest one and concatenated (ConcatLevels,
HRNetV2's representation). Any other timm encoder is fused the same way. timm's stride-2 stem level is skipped.

OCR head on the fused map (paper section 3.3, Fig. 3):
1. soft object regions: a 1x1 conv-BN-ReLU + 1x1 conv "auxiliary" head predicts K = classes region maps, trained
   with its own loss (weight 0.4, the paper's); the main logits depend on it, so it stays in the served graph;
2. pixel representations: 3x3 conv-BN-ReLU to `ocr_mid_channels`;
3. object region representations: per region k, the pixel representations averaged with the weights
   softmax over all pixels of the region's logits (spatial gather);
4. object-contextual representations: each pixel attends to the K region representations (key/query/value
   transforms to `ocr_key_channels`, scaled dot product, softmax over K): O(H*W*K), not O(H^2 W^2);
5. concat with the pixel representations, 1x1 conv-BN-ReLU, Dropout2d (0.05), 1x1 classifier; logits upsampled
   by a constant factor (the fused reduction, 4) to the input.

The region representations are (N, K, C): no spatial extent, so their transforms are Linear + ReLU without
BatchNorm (the reference's BN there sees only N * K values per channel and fails at batch 1 with one class).

ONNX (opset 17, dynamic batch/H/W): the gather is a softmax over the flattened pixels and a batched matmul; the
attention uses broadcast matmuls on (N, H, W, C) views, so no reshape depends on the traced size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsseg.errors import ConfigError
from rsseg.models.blocks import ConcatLevels, ConvBNReLU, SegmentationHead, init_decoder
from rsseg.models.encoders import Level, branch_features_kwargs, create_encoder, feature_levels
from rsseg.models.registry import SegmentationModel, register_model
from rsseg.spec import OutputGroup

log = logging.getLogger(__name__)

HRNET_ENCODER = "hrnet_w18"
AUX_WEIGHT = 0.4  # the paper's weight of the soft-object-region loss (LOSS.BALANCE_WEIGHTS [0.4, 1])
# The reference's defaults (config MODEL.OCR: MID_CHANNELS 512, KEY_CHANNELS 256, used with HRNet-W48), which
# the common HRNetV2-W18 OCR configs (mmsegmentation ocrnet_hr18, sssegmentation) keep too. With hrnet_w18 (270
# fused channels) the head is then 2.5 M of 12.1 M parameters but ~2/3 of the compute (71 of 106 GFLOPs at
# 512x512), mostly its 3x3 conv at stride 4: ocr_mid_channels=256 roughly halves the head's cost.
OCR_MID_CHANNELS = 512
OCR_KEY_CHANNELS = 256
OCR_DROPOUT = 0.05


def _init_linear(module: nn.Module) -> None:
    """Kaiming init (ReLU follows every Linear here), zero bias: as init_decoder does for convs."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)


class SpatialGather(nn.Module):
    """Object region representations (paper eq. 2): f_k = sum_i softmax_i(m_ki) x_i over all pixels i, with
    m_k the k-th soft object region's logits. Returns (N, K, C)."""

    def forward(self, feats: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(regions.flatten(2), dim=-1)  # (N, K, HW): each region's weights sum to 1
        return torch.bmm(weights, feats.flatten(2).transpose(1, 2))  # (N, K, C)


class ObjectAttention(nn.Module):
    """Object-contextual representations (paper eqs. 3-4, the reference's _ObjectAttentionBlock): each pixel's
    context is a weighted sum of the K object region representations, weights = softmax over k of the scaled
    dot product of the pixel's query and region k's key.

    Pixel transforms (query phi, output rho): two / one 1x1 conv-BN-ReLU, as in the reference. Region transforms
    (key psi, value delta) act on (N, K, C) vectors: Linear + ReLU, no BatchNorm (see the module docstring).
    """

    def __init__(self, channels: int, key_channels: int) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.scale = key_channels ** -0.5
        self.f_pixel = nn.Sequential(ConvBNReLU(channels, key_channels, 1), ConvBNReLU(key_channels, key_channels, 1))
        self.f_object = nn.Sequential(
            nn.Linear(channels, key_channels), nn.ReLU(inplace=True),
            nn.Linear(key_channels, key_channels), nn.ReLU(inplace=True),
        )
        self.f_down = nn.Sequential(nn.Linear(channels, key_channels), nn.ReLU(inplace=True))
        self.f_up = ConvBNReLU(key_channels, channels, 1)
        init_decoder(self)
        _init_linear(self)

    def forward(self, x: torch.Tensor, objects: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) pixel representations; objects: (N, K, C) region representations -> (N, C, H, W)."""
        query = self.f_pixel(x).permute(0, 2, 3, 1)  # (N, H, W, Ck)
        key = self.f_object(objects).transpose(1, 2).unsqueeze(1)  # (N, 1, Ck, K)
        value = self.f_down(objects).unsqueeze(1)  # (N, 1, K, Ck)
        # broadcast matmuls over H: (N, H, W, K) similarities, never an (HW x HW) map
        sim = torch.softmax(torch.matmul(query, key) * self.scale, dim=-1)
        context = torch.matmul(sim, value).permute(0, 3, 1, 2)  # (N, Ck, H, W)
        return self.f_up(context)


class OCRHead(nn.Module):
    """Soft object regions, pixel representations, gather, object attention, fusion, classifier (Fig. 3).

    `forward` returns (logits, soft region logits), both at the feature resolution.
    """

    def __init__(self, in_ch: int, num_classes: int, mid_channels: int = OCR_MID_CHANNELS,
                 key_channels: int = OCR_KEY_CHANNELS, dropout: float = OCR_DROPOUT) -> None:
        super().__init__()
        self.aux_head = nn.Sequential(ConvBNReLU(in_ch, in_ch, 1))  # + the region classifier, appended below
        self.pixel = ConvBNReLU(in_ch, mid_channels, 3)
        self.gather = SpatialGather()
        self.attention = ObjectAttention(mid_channels, key_channels)
        # the reference's SpatialOCR_Module: concat [context, pixels], 1x1 conv-BN-ReLU, Dropout2d
        self.fuse = nn.Sequential(ConvBNReLU(2 * mid_channels, mid_channels, 1), nn.Dropout2d(dropout))
        init_decoder(self)  # before the classifiers, which keep SegmentationHead's init
        self.aux_head.append(SegmentationHead(in_ch, num_classes, kernel_size=1))
        self.classifier = SegmentationHead(mid_channels, num_classes, kernel_size=1)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        regions = self.aux_head(feats)
        pixels = self.pixel(feats)
        context = self.attention(pixels, self.gather(pixels, regions))
        return self.classifier(self.fuse(torch.cat([context, pixels], dim=1))), regions


class HRNetOCR(SegmentationModel):
    """Encoder levels (reduction >= 4) -> ConcatLevels -> OCRHead -> bilinear upsample (constant factor).

    Trained with the soft-object-region logits as one auxiliary output (`aux_weights` = [0.4]); served and
    exported with the main logits only (the region head stays in the graph: OCR needs its output).
    """


    def __init__(self, encoder: nn.Module, in_channels: int, outputs: Sequence[OutputGroup],
                 ocr_mid_channels: int = OCR_MID_CHANNELS, ocr_key_channels: int = OCR_KEY_CHANNELS,
                 dropout: float = OCR_DROPOUT) -> None:
        channels, reductions = encoder.feature_info.channels(), encoder.feature_info.reduction()
        super().__init__(in_channels, outputs, stride=int(max(reductions)))
        self.encoder = encoder
        self.fuse = ConcatLevels(channels, reductions)
        self.head = OCRHead(self.fuse.out_channels, self.out_channels, ocr_mid_channels, ocr_key_channels, dropout)
        self.up_to_input = self.fuse.reduction  # a constant factor keeps the ONNX Resize free of shape arithmetic
        self.aux_weights = [AUX_WEIGHT]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, regions = self.head(self.fuse(self.encoder(x)))
        if self.up_to_input > 1:
            logits = F.interpolate(logits, scale_factor=float(self.up_to_input), mode="bilinear", align_corners=False)
        return logits, regions

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x)[0]

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the soft object regions (at the fused reduction; the loss resizes them)."""
        logits, regions = self._forward(x)
        return logits, [regions]


def select_ocr_levels(levels: Sequence[Level]) -> list[Level]:
    """Every level at reduction >= 4 (a stride-2 stem would make the fused map 4x larger for little gain);
    all levels if the encoder has none there."""
    return [lv for lv in levels if lv.reduction >= 4] or list(levels)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer (e.g. {name}=256), got {value!r}")
    return value


@register_model("hrnet_ocr", tasks=("binary", "multiclass"), default_encoder=HRNET_ENCODER)
def hrnet_ocr(
    encoder: str,
    in_channels: int,
    outputs: Sequence[OutputGroup],
    pretrained_path: str | None = None,
    ocr_mid_channels: int = OCR_MID_CHANNELS,
    ocr_key_channels: int = OCR_KEY_CHANNELS,
    dropout: float = OCR_DROPOUT,
    trim_encoder: bool = True,
    encoder_kwargs: dict[str, Any] | None = None,
) -> HRNetOCR:
    """HRNet-OCR (Yuan et al. 2020) on any timm encoder; the paper's is an HRNet (default hrnet_w18 here).

    Args:
        ocr_mid_channels: width of the pixel / object representations (the reference's 512).
        ocr_key_channels: width of the attention's keys, queries and values (the reference's 256).
        dropout: Dropout2d probability after the fusion conv (the reference's 0.05).
        trim_encoder: drop encoder blocks after the deepest level (see create_encoder).
        encoder_kwargs: extra timm.create_model options.

    `stride` = the deepest reduction used (32 for HRNet). The soft-object-region head is trained with an
    auxiliary loss of weight 0.4 (`aux_weights`) when training sets `emit_aux`.
    """
    mid = _positive_int(ocr_mid_channels, "ocr_mid_channels")
    key = _positive_int(ocr_key_channels, "ocr_key_channels")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be a number in [0, 1) (the paper's is 0.05), got {dropout!r}")
    kwargs = branch_features_kwargs(encoder, encoder_kwargs)
    chosen = select_ocr_levels(feature_levels(encoder, in_channels, kwargs))
    enc = create_encoder(encoder, in_channels, [lv.index for lv in chosen], pretrained_path, trim=trim_encoder,
                         encoder_kwargs=kwargs)
    return HRNetOCR(enc, in_channels, outputs, ocr_mid_channels=mid, ocr_key_channels=key, dropout=float(dropout))
