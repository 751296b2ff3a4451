"""`unet`: the sea-ice seed's EffUNet (Kang et al. 2022, "Decoding the Partial Pretrained Networks for
Sea-Ice Segmentation"): a partial timm encoder (first `encoder_depth` levels) and a UNet decoder, then a
3x3 conv head. By default the decoder is lighter than the seed's (64-32-16-16 dense conv blocks without
attention, see UNetOptions); the seed's own decoder is `decoder_channels=(128,64,32,16),attention=scse`
(with its EfficientUNet++-style InvertedResidual blocks, Silva et al.: `decoder_block=inverted_residual`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rsseg.errors import ConfigError
from rsseg.models.blocks import SegmentationHead, UNetDecoder, int_tuple, make_attention
from rsseg.models.encoders import Level, create_encoder, feature_levels
from rsseg.models.registry import SegmentationModel, register_model
from rsseg.spec import OutputGroup

log = logging.getLogger(__name__)

# Measured on a 2-core CPU (README, "Quality per training minute"): the seed's decoder (128, 64, 32, 16)
# with SCSE is 70 % of the model's FLOPs; this one trains at twice the tiles/s and learned more per minute
# on roads and Dubai. The full-resolution block keeps 16 channels: with 8 the thin road class was lost.
DEFAULT_DECODER_CHANNELS = (64, 32, 16, 16)
SEED_DECODER_CHANNELS = (128, 64, 32, 16)
SEED_DECODER_OPTIONS = "decoder_channels=(128,64,32,16),attention=scse"  # the seed's layout, as model_options


AUX_STAGES = 2  # the seed's UnetAux_v2: heads on the two decoder stages before the last


class UNet(SegmentationModel):
    """Encoder levels -> UNetDecoder -> 3x3 head; logits at input resolution.

    With `aux_weight` > 0 (option `aux_heads`), two extra 3x3 heads on the two decoder stages before the
    last give logits at 1/4 and 1/2 resolution whose losses (times `aux_weight`) are added in training:
    deep supervision as the sea-ice seed's UnetAux_v2. They are not part of `forward_logits`, so the
    exported and served model has the plain UNet graph.
    """

    def __init__(
        self,
        encoder: torch.nn.Module,
        in_channels: int,
        outputs: Sequence[OutputGroup],
        decoder_channels: Sequence[int],
        aux_weight: float = 0.0,
        **decoder_kwargs: Any,
    ) -> None:
        info = encoder.feature_info
        super().__init__(in_channels, outputs, stride=max(info.reduction()))
        self.encoder = encoder
        self.decoder = UNetDecoder(info.channels(), info.reduction(), decoder_channels, **decoder_kwargs)
        self.head = SegmentationHead(self.decoder.out_channels, self.out_channels)
        self.aux_heads = torch.nn.ModuleList()
        if aux_weight > 0:
            if len(decoder_channels) < AUX_STAGES + 1:
                raise ConfigError(f"aux_heads needs at least {AUX_STAGES + 1} decoder stages; "
                                  f"decoder_channels {tuple(decoder_channels)} has {len(decoder_channels)}")
            stage_channels = [int(c) for c in decoder_channels[-AUX_STAGES - 1:-1]]
            self.aux_heads.extend(SegmentationHead(c, self.out_channels) for c in stage_channels)
            self.aux_weights = [float(aux_weight)] * AUX_STAGES

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        stages = self.decoder.forward_stages(self.encoder(x))
        aux = [head(stage) for head, stage in zip(self.aux_heads, stages[-AUX_STAGES - 1:-1])]
        return self.head(stages[-1]), aux


def select_unet_levels(levels: Sequence[Level], encoder_depth: int, encoder: str, decoder_channels: Sequence[int]) -> list[Level]:
    """The first `encoder_depth` levels; ConfigError when the encoder has fewer or the decoder doesn't match."""
    if not isinstance(encoder_depth, int) or encoder_depth < 1:
        raise ConfigError(f"encoder_depth must be a positive integer, got {encoder_depth!r}")
    if encoder_depth > len(levels):
        raise ConfigError(
            f"encoder_depth {encoder_depth} but encoder {encoder!r} offers {len(levels)} feature levels "
            f"(reductions {[lv.reduction for lv in levels]}); use encoder_depth <= {len(levels)}"
        )
    if len(decoder_channels) != encoder_depth:
        raise ConfigError(
            f"decoder_channels {tuple(decoder_channels)} has {len(decoder_channels)} entries but encoder_depth "
            f"is {encoder_depth}; give one decoder channel count per level"
        )
    return list(levels[:encoder_depth])


@dataclass(frozen=True)
class UNetOptions:
    """Options of the UNet-style models (`unet`, `siamese_unet`, `unetplusplus`): encoder depth and decoder.

    Defaults: decoder (64, 32, 16, 16) without attention, half the seed's decoder width and no SCSE; on a
    CPU that trains at about twice the tiles per second and scored higher at equal budget (README,
    quality benchmark). `SEED_DECODER_OPTIONS` gives the seed's (128, 64, 32, 16) with SCSE.

    `decoder_block="conv"` (default) builds each decoder block from two dense 3x3 conv-BN-ReLU (with SCSE
    of reduction 16 when `attention="scse"`), the classic UNet block; `"inverted_residual"` is the seed's own block (1x1 expand,
    depthwise `kernel_size` conv, Hardswish, SCSE with `attention_reduction` 1, 1x1 project). On a CPU
    the seed's block trains at about half the tiles per second and learned less per minute (README,
    quality benchmark), so it is opt-in.

    The seed dropped the 5th encoder stage for speed, but a timm feature extractor still holds and runs
    the blocks after the deepest level used (about 4.6 M of the seed's 7 M parameters with
    tf_efficientnet_lite3, never getting gradients). `trim_encoder=True` (default) removes them: same
    logits, a third of the parameters, faster, DDP-safe. False reproduces the seed's parameter count.

    `aux_heads=True` adds deep supervision (unet: the seed's, see UNet; unetplusplus: the paper's); not for
    siamese_unet.
    """

    encoder_depth: int = 4
    decoder_channels: Sequence[int] | str = DEFAULT_DECODER_CHANNELS
    attention: str | None = "none"
    attention_reduction: int | None = None
    kernel_size: int = 5
    expansion: int = 1
    decoder_block: str = "conv"
    trim_encoder: bool = True
    encoder_kwargs: dict[str, Any] | None = None
    aux_heads: bool = False
    aux_weight: float = 0.4

    def build_encoder(self, encoder: str, bands: int, pretrained_path: str | None
                      ) -> tuple[torch.nn.Module, tuple[int, ...]]:
        """The trimmed timm encoder over `bands` input channels and the checked decoder channels."""
        decoder_channels = int_tuple(self.decoder_channels, "decoder_channels")
        make_attention(self.attention, 1)  # validate early
        levels = select_unet_levels(feature_levels(encoder, bands, self.encoder_kwargs), self.encoder_depth, encoder,
                                    decoder_channels)
        enc = create_encoder(encoder, bands, [lv.index for lv in levels], pretrained_path, trim=self.trim_encoder,
                             encoder_kwargs=self.encoder_kwargs)
        return enc, decoder_channels

    def aux_loss_weight(self) -> float:
        """The weight of each auxiliary head's loss, 0.0 when `aux_heads` is off."""
        if not self.aux_heads:
            return 0.0
        if not isinstance(self.aux_weight, (int, float)) or self.aux_weight <= 0:
            raise ConfigError(f"aux_weight must be a positive number, got {self.aux_weight!r}; the seed used 0.4")
        return float(self.aux_weight)

    def decoder_kwargs(self) -> dict[str, Any]:
        return {"kernel_size": self.kernel_size, "expansion": self.expansion, "attention": self.attention,
                "attention_reduction": self.attention_reduction, "block": self.decoder_block}


@register_model("unet", options=UNetOptions)
def unet(encoder: str, in_channels: int, outputs: Sequence[OutputGroup], pretrained_path: str | None = None,
         options: UNetOptions = UNetOptions()) -> UNet:
    """The seed's EffUNet layout: tf_efficientnet_lite3 unless named (training picks UNET_ENCODER for
    single-date data), depth 4, a UNet decoder (UNetOptions: (64, 32, 16,
    16) without attention by default; the seed's (128, 64, 32, 16) with SCSE by SEED_DECODER_OPTIONS)."""
    enc, decoder_channels = options.build_encoder(encoder, in_channels, pretrained_path)
    return UNet(enc, in_channels, outputs, decoder_channels, aux_weight=options.aux_loss_weight(),
                **options.decoder_kwargs())
