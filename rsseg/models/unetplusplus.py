"""`unetplusplus`: UNet++ (Zhou et al. 2018, "UNet++: A Nested U-Net Architecture for Medical Image
Segmentation", DLMIA): the UNet's plain skip connections replaced by nested, dense skip pathways.

Node X^{i,j} (row i = resolution, 0 finest; column j = upsampling steps since the node's encoder origin) is

    X^{i,j} = H(cat(X^{i,0}, ..., X^{i,j-1}, Up(X^{i+1,j-1})))

with X^{i,0} the encoder levels and H a conv block, built as segmentation_models_pytorch's
UnetPlusPlusDecoder builds it: H is the UNet conv block (nearest x2 upsample, concat, SCSE, two 3x3
conv-BN-ReLU, SCSE); the main path X^{i,n-i} has `decoder_channels` (one per depth, as for `unet`), the
other nested nodes keep their row's encoder channels, and the concatenation is in smp's order (so an smp
decoder's weights load as they are). Options are `unet`'s (UNetOptions).

timm encoders have no full-resolution level, so row 0 (input resolution here) has no X^{0,0} and holds only
the main path's last node, a block without skip (as smp adds it): with `encoder_depth` 4 the grid is the
paper's UNet++ L^4 (rows 0..4), 10 node positions of which the 3 that need X^{0,0} do not exist, 7 nodes.
A row whose resolution no encoder level has (an encoder whose shallowest level is at stride 4, or a gap
in its strides) holds only its main-path node, and a nested pathway never crosses such a row. Of several
levels at one reduction the deepest is used; when the blocks stop short of input resolution a final
bilinear upsample by a constant factor closes the gap (as UNetDecoder does).

Deep supervision (the paper's, `aux_heads=True`): 1x1 heads on the nested nodes of the finest row that
has them, trained with `aux_weight` each, never part of `forward_logits` nor the exported graph.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rsseg.errors import ConfigError
from rsseg.models.blocks import DEFAULT_REDUCTION, ConvDecoderBlock, SegmentationHead, init_decoder
from rsseg.models.registry import SegmentationModel, register_model
from rsseg.models.unet import UNetOptions
from rsseg.spec import OutputGroup

log = logging.getLogger(__name__)

Node = tuple[int, int]  # (row i, column j) of X^{i,j}


class UNetPlusPlusDecoder(nn.Module):
    """The nested decoder of UNet++, sized from the encoder's feature levels.

    `n = len(decoder_channels)` main-path blocks, each halving the reduction of the deepest level, as in
    UNetDecoder; row i has reduction `deepest / 2**(n - i)` and the encoder level of that reduction (if
    any) as X^{i,0}. A nested node X^{i,j} (i + j < n) exists where rows i..i+j all have encoder levels;
    the main-path node X^{i,n-i} always does. Output: `decoder_channels[-1]` channels at input resolution.
    """

    def __init__(
        self,
        channels: Sequence[int],
        reductions: Sequence[int],
        decoder_channels: Sequence[int],
        attention: str | None = "scse",
        attention_reduction: int | None = None,
    ) -> None:
        super().__init__()
        if not decoder_channels:
            raise ConfigError("decoder_channels is empty; give one channel count per decoder depth")
        reduction_ = DEFAULT_REDUCTION["conv"] if attention_reduction is None else int(attention_reduction)
        if reduction_ < 1:
            raise ConfigError(f"attention_reduction must be a positive integer, got {attention_reduction!r}")
        n = len(decoder_channels)
        deepest = int(reductions[-1])
        if deepest % 2**n:
            raise ConfigError(
                f"{n} decoder blocks upsample past input resolution (deepest encoder reduction {deepest}); "
                "use fewer decoder_channels"
            )
        level_of = {int(r): k for k, r in enumerate(reductions[:-1])}  # deepest level per reduction wins
        self.levels: dict[int, int] = {n: len(reductions) - 1}  # row -> feature index of X^{i,0}
        for i in range(n):
            k = level_of.get(deepest >> (n - i), -1)
            if k >= 0:
                self.levels[i] = k
        node_ch: dict[Node, int] = {(i, 0): int(channels[k]) for i, k in self.levels.items()}
        # Column by column, so every node's inputs are computed before it (forward walks this plan).
        self.plan: list[tuple[str, Node, list[Node]]] = []
        blocks: dict[str, nn.Module] = {}
        for j in range(1, n + 1):
            for i in range(n - j + 1):
                main = i + j == n
                below = (i + 1, j - 1)
                if not main and ((i, 0) not in node_ch or below not in node_ch):
                    continue  # the pathway would cross a row without an encoder level
                # smp's concat order (newest node first, encoder level last), so its weights load as they are
                skips = [(i, m) for m in reversed(range(j)) if (i, m) in node_ch]
                out_ch = int(decoder_channels[j - 1]) if main else node_ch[(i, 0)]
                name = f"x_{i}_{j}"
                blocks[name] = ConvDecoderBlock(node_ch[below], sum(node_ch[s] for s in skips), out_ch,
                                                attention=attention, attention_reduction=reduction_)
                self.plan.append((name, (i, j), skips))
                node_ch[(i, j)] = out_ch
        self.blocks = nn.ModuleDict(blocks)
        self.node_channels = node_ch
        self.depth = n
        self.final_scale = deepest >> n  # >1 only for encoders without a stride-2 level
        self.out_channels = int(decoder_channels[-1])
        init_decoder(self)

    @property
    def nested_nodes(self) -> list[Node]:
        """The decoder nodes X^{i,j}, j >= 1, in computation order."""
        return [node for _, node, _ in self.plan]

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.forward_nodes(features)[(0, self.depth)]

    def forward_nodes(self, features: Sequence[torch.Tensor]) -> dict[Node, torch.Tensor]:
        """Every node's output; X^{0,n} (the main output) upsampled to input resolution."""
        x: dict[Node, torch.Tensor] = {(i, 0): features[k] for i, k in self.levels.items()}
        for name, (i, j), skips in self.plan:
            skip = None
            if skips:
                skip = x[skips[0]] if len(skips) == 1 else torch.cat([x[s] for s in skips], dim=1)
            x[(i, j)] = self.blocks[name](x[(i + 1, j - 1)], skip)
        if self.final_scale > 1:
            out = x[(0, self.depth)]
            x[(0, self.depth)] = F.interpolate(out, scale_factor=float(self.final_scale), mode="bilinear",
                                               align_corners=False)
        return x


class UNetPlusPlus(SegmentationModel):
    """Encoder levels -> UNetPlusPlusDecoder -> 3x3 head; logits at input resolution.

    With `aux_weight` > 0, the paper's deep supervision: a 1x1 head on each nested node of the finest row
    that has nested nodes besides its main-path one (X^{1,1}..X^{1,n-2} with a stride-2 encoder level),
    each loss times `aux_weight`. Inference uses the main path's output only (the paper's averaging of
    the branches is not done): one logits tensor, so the exported and served graph has no auxiliary heads.
    """

    def __init__(
        self,
        encoder: nn.Module,
        in_channels: int,
        outputs: Sequence[OutputGroup],
        decoder_channels: Sequence[int],
        attention: str | None = "scse",
        attention_reduction: int | None = None,
        aux_weight: float = 0.0,
    ) -> None:
        info = encoder.feature_info
        super().__init__(in_channels, outputs, stride=max(info.reduction()))
        self.encoder = encoder
        self.decoder = UNetPlusPlusDecoder(info.channels(), info.reduction(), decoder_channels, attention,
                                           attention_reduction)
        self.head = SegmentationHead(self.decoder.out_channels, self.out_channels)
        self.aux_nodes: list[Node] = []
        self.aux_heads = nn.ModuleList()
        if aux_weight > 0:
            n = self.decoder.depth
            side = [(i, j) for i, j in self.decoder.nested_nodes if i + j < n]  # off the main path
            if not side:
                raise ConfigError(
                    f"aux_heads needs nested nodes; with {n} decoder depths and encoder reductions "
                    f"{info.reduction()} there are none; use encoder_depth >= 3"
                )
            finest = min(i for i, _ in side)
            self.aux_nodes = sorted(node for node in side if node[0] == finest)
            self.aux_heads.extend(
                SegmentationHead(self.decoder.node_channels[node], self.out_channels, kernel_size=1)
                for node in self.aux_nodes
            )
            self.aux_weights = [float(aux_weight)] * len(self.aux_nodes)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.encoder(x)))

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        nodes = self.decoder.forward_nodes(self.encoder(x))
        aux = [head(nodes[node]) for head, node in zip(self.aux_heads, self.aux_nodes)]
        return self.head(nodes[(0, self.decoder.depth)]), aux


@register_model("unetplusplus", tasks=("binary", "multiclass"), options=UNetOptions)
def unetplusplus(encoder: str, in_channels: int, outputs: Sequence[OutputGroup], pretrained_path: str | None = None,
                 options: UNetOptions = UNetOptions()) -> UNetPlusPlus:
    """UNet++ on any timm encoder; encoder_depth 4 and the decoder channels and attention of UNetOptions."""
    if options.decoder_block != "conv":
        raise ConfigError(
            f"decoder_block {options.decoder_block!r}: unetplusplus builds its nested nodes from conv blocks "
            "(two 3x3 conv-BN-ReLU with attention); use decoder_block='conv' (the default), or architecture "
            "unet for the inverted residual blocks"
        )
    enc, decoder_channels = options.build_encoder(encoder, in_channels, pretrained_path)
    return UNetPlusPlus(enc, in_channels, outputs, decoder_channels, attention=options.attention,
                        attention_reduction=options.attention_reduction, aux_weight=options.aux_loss_weight())
