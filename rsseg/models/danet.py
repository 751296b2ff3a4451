"""`danet`: Dual Attention Network (Fu et al. 2019, "Dual Attention Network for Scene Segmentation", CVPR).

A dilated encoder (output stride 8 where the encoder allows it) gives one dense deep feature map; two branches
on it model long-range dependencies, one over positions (PAM), one over channels (CAM), and their sum is
classified and upsampled to the input. Only the deepest encoder level is built and used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rsseg.errors import ConfigError
from rsseg.models.blocks import ConvBNReLU, SegmentationHead, init_decoder
from rsseg.models.encoders import branch_features_kwargs, create_encoder, dilated_encoder_kwargs, feature_levels
from rsseg.models.registry import SegmentationModel, register_model
from rsseg.spec import OutputGroup

log = logging.getLogger(__name__)


class PositionAttention(nn.Module):
    """Position attention module (PAM, Fu et al. 2019, section 3.2): every position attends to every other.

    Q, K = 1x1 convs to `channels // reduction`, V = 1x1 conv to `channels`; A = softmax_j(Q_i . K_j) over all
    N = H*W positions; out = gamma * (V A^T) + x with a learnable scalar gamma that starts at 0, so the module
    is the identity at initialisation and learns how much context to mix in.

    Memory is O(N^2): the (N, N) attention map per image. At output stride 8 a 512x512 tile has N = 4096, so
    one map is 4096^2 fp32 = 64 MiB per image; energy and its softmax make the module's peak ~140 MiB per
    image in inference and ~300 MiB in training (measured, CPU fp32), i.e. ~2.4 GiB for a training batch of
    8. A 1024 tile is 16x that (1 GiB per map). output_stride=16 divides it by 16.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        qk = max(1, channels // reduction)
        self.query = nn.Conv2d(channels, qk, 1)
        self.key = nn.Conv2d(channels, qk, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten(2) / view_as(x) keep the ONNX graph free of fixed sizes (dynamic batch, H, W)
        q = self.query(x).flatten(2).transpose(1, 2)  # (B, N, C')
        k = self.key(x).flatten(2)  # (B, C', N)
        attention = torch.softmax(torch.bmm(q, k), dim=-1)  # (B, N, N): row i = weights of position i over j
        v = self.value(x).flatten(2)  # (B, C, N)
        out = torch.bmm(v, attention.transpose(1, 2)).view_as(x)
        return self.gamma * out + x


class ChannelAttention(nn.Module):
    """Channel attention module (CAM, Fu et al. 2019, section 3.3): every channel map attends to all others.

    energy = X X^T (C x C, over all positions); as in the authors' code the softmax is taken over
    max(energy) - energy (row-wise max), which keeps the exponent <= 0 for stability; out = beta * (A X) + x
    with beta a learnable scalar that starts at 0. No convolutions: the channels themselves are Q, K and V.
    """

    def __init__(self) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)  # (B, C, N)
        energy = torch.bmm(flat, flat.transpose(1, 2))  # (B, C, C)
        energy = energy.amax(dim=-1, keepdim=True) - energy
        attention = torch.softmax(energy, dim=-1)
        out = torch.bmm(attention, flat).view_as(x)
        return self.beta * out + x


class DANetHead(nn.Module):
    """Two branches on the deepest feature, each 3x3 ConvBNReLU to in/4 channels, attention (PAM / CAM),
    3x3 ConvBNReLU; summed (the paper's sum fusion), dropout, 1x1 classifier."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float = 0.1) -> None:
        super().__init__()
        inter = max(1, in_ch // 4)
        self.pam_in = ConvBNReLU(in_ch, inter)
        self.pam = PositionAttention(inter)
        self.pam_out = ConvBNReLU(inter, inter)
        self.cam_in = ConvBNReLU(in_ch, inter)
        self.cam = ChannelAttention()
        self.cam_out = ConvBNReLU(inter, inter)
        # Dropout2d (whole channels), as in the authors' DANetHead
        self.dropout = nn.Dropout2d(dropout)
        init_decoder(self)
        self.classifier = SegmentationHead(inter, out_ch, kernel_size=1)
        self.inter_channels = inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pam_out(self.pam(self.pam_in(x))) + self.cam_out(self.cam(self.cam_in(x)))
        return self.classifier(self.dropout(y))


class DANet(SegmentationModel):
    """Dilated encoder (deepest level only) -> DANetHead -> bilinear upsample (constant factor) to the input."""


    def __init__(self, encoder: nn.Module, in_channels: int, outputs: Sequence[OutputGroup],
                 dropout: float = 0.1) -> None:
        channels, reductions = encoder.feature_info.channels(), encoder.feature_info.reduction()
        super().__init__(in_channels, outputs, stride=int(reductions[-1]))
        self.encoder = encoder
        self.head = DANetHead(int(channels[-1]), self.out_channels, dropout)
        # a constant scale factor (not a size) keeps the ONNX Resize free of shape arithmetic
        self.up_to_input = int(reductions[-1])

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.encoder(x)[-1])
        if self.up_to_input > 1:
            y = F.interpolate(y, scale_factor=float(self.up_to_input), mode="bilinear", align_corners=False)
        return y


@register_model("danet", tasks=("binary", "multiclass"))
def danet(
    encoder: str,
    in_channels: int,
    outputs: Sequence[OutputGroup],
    pretrained_path: str | None = None,
    output_stride: int = 8,
    dropout: float = 0.1,
    trim_encoder: bool = True,
    encoder_kwargs: dict[str, Any] | None = None,
) -> DANet:
    """DANet on any timm encoder, built with only its deepest level.

    Args:
        output_stride: 8 (the paper's), 16 or 32: the encoder's last stages are dilated to keep this stride;
            encoders that cannot dilate that far fall back to 16, then to their own strides (HRNet: its
            stride-32 branch). The model's `stride` is the resulting deepest reduction.
        dropout: Dropout2d probability before the classifier (the paper's 0.1).
        trim_encoder: drop encoder blocks after the deepest level (see create_encoder).
        encoder_kwargs: extra timm.create_model options.

    The position attention is O((H*W / stride^2)^2) in memory: see PositionAttention.
    """
    if isinstance(output_stride, bool) or output_stride not in (8, 16, 32):
        raise ConfigError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"dropout must be a number in [0, 1), got {dropout!r}")
    kwargs = dilated_encoder_kwargs(encoder, in_channels, output_stride,
                                    branch_features_kwargs(encoder, encoder_kwargs))
    deepest = feature_levels(encoder, in_channels, kwargs)[-1]
    enc = create_encoder(encoder, in_channels, [deepest.index], pretrained_path, trim=trim_encoder,
                         encoder_kwargs=kwargs)
    return DANet(enc, in_channels, outputs, dropout=float(dropout))
