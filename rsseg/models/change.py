"""`siamese_unet`: change detection (optionally semantic change detection, SECOND-style).

The input is date A and date B concatenated on channels. One shared encoder sees both dates (as one
batch of 2N); each level is fused as conv1x1(cat(fa, fb, |fa - fb|)) + BN + ReLU; a UNet decoder on the
fused levels gives the change logits. With "semantic_a"/"semantic_b" groups a second decoder, shared
by both dates, runs on each date's own features.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from rsseg.errors import ConfigError
from rsseg.heads import CHANGE, SEMANTIC
from rsseg.models.blocks import (
    ConvBNReLU,
    SegmentationHead,
    UNetDecoder,
    init_decoder,
)
from rsseg.models.registry import SegmentationModel, register_model
from rsseg.models.unet import UNetOptions
from rsseg.spec import OutputGroup

log = logging.getLogger(__name__)



def check_change_outputs(outputs: Sequence[OutputGroup]) -> bool:
    """Validate change outputs; True when they include the semantic maps of both dates."""
    by_name = {g.name: g for g in outputs}
    allowed = {CHANGE, *SEMANTIC}
    extra = sorted(set(by_name) - allowed)
    if extra or CHANGE not in by_name:
        raise ConfigError(
            f"change model outputs {[g.name for g in outputs]}: need a 'change' group (2 channels), "
            f"optionally with 'semantic_a' and 'semantic_b'; nothing else"
        )
    if by_name[CHANGE].channels != 2:
        raise ConfigError(f"output group 'change' has {by_name[CHANGE].channels} channels; it must have 2 (unchanged, changed)")
    present = [n for n in SEMANTIC if n in by_name]
    if len(present) == 1:
        raise ConfigError(f"output group {present[0]!r} given without its pair; give both semantic_a and semantic_b or neither")
    if present:
        ka, kb = (by_name[name].channels for name in SEMANTIC)
        if ka != kb or ka < 2:
            raise ConfigError(
                f"semantic_a has {ka} and semantic_b {kb} channels; both need the same class count (>= 2)"
            )
    return bool(present)


class SiameseUNet(SegmentationModel):
    """Shared encoder, per-level difference fusion, UNet change decoder, optional shared semantic decoder."""

    def __init__(
        self,
        encoder: nn.Module,
        in_channels: int,
        outputs: Sequence[OutputGroup],
        decoder_channels: Sequence[int],
        **decoder_kwargs: Any,
    ) -> None:
        channels, reductions = encoder.feature_info.channels(), encoder.feature_info.reduction()
        super().__init__(in_channels, outputs, stride=max(reductions))
        semantic = check_change_outputs(self.outputs)
        self.encoder = encoder
        self.fuse = nn.ModuleList([ConvBNReLU(3 * c, c, 1) for c in channels])
        init_decoder(self.fuse)
        self.change_decoder = UNetDecoder(channels, reductions, decoder_channels, **decoder_kwargs)
        self.change_head = SegmentationHead(self.change_decoder.out_channels, 2)
        self.semantic_decoder: UNetDecoder | None = None
        self.semantic_head: SegmentationHead | None = None
        if semantic:
            k = next(g.channels for g in self.outputs if g.name == SEMANTIC[0])
            self.semantic_decoder = UNetDecoder(channels, reductions, decoder_channels, **decoder_kwargs)
            self.semantic_head = SegmentationHead(self.semantic_decoder.out_channels, k)
        self.order = [g.name for g in self.outputs]

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        bands = self.in_channels // 2
        # One encoder pass over both dates: shared weights, and BatchNorm normalises them alike.
        feats = self.encoder(torch.cat([x[:, :bands], x[:, bands:]], dim=0))
        fused = []
        for f, fuse in zip(feats, self.fuse):
            fa, fb = f[:n], f[n:]
            fused.append(fuse(torch.cat([fa, fb, torch.abs(fa - fb)], dim=1)))
        logits = {CHANGE: self.change_head(self.change_decoder(fused))}
        if self.semantic_decoder is not None and self.semantic_head is not None:
            sem = self.semantic_head(self.semantic_decoder(feats))
            logits[SEMANTIC[0]], logits[SEMANTIC[1]] = sem[:n], sem[n:]
        return torch.cat([logits[name] for name in self.order], dim=1)


@register_model("siamese_unet", tasks=("change",), options=UNetOptions)
def siamese_unet(encoder: str, in_channels: int, outputs: Sequence[OutputGroup], pretrained_path: str | None = None,
                 options: UNetOptions = UNetOptions()) -> SiameseUNet:
    """Siamese UNet; `in_channels` = 2 * bands (date A first). Options as for `unet`."""
    check_change_outputs(outputs)
    if in_channels % 2:
        raise ConfigError(
            f"change models take two dates concatenated on channels, so in_channels must be even; got {in_channels}"
        )
    if options.aux_heads:
        raise ConfigError("aux_heads is an option of unet only; siamese_unet has no auxiliary heads")
    enc, decoder_channels = options.build_encoder(encoder, in_channels // 2, pretrained_path)
    return SiameseUNet(enc, in_channels, outputs, decoder_channels, **options.decoder_kwargs())
