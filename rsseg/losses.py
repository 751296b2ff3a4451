"""Segmentation losses: cross-entropy + class-wise Dice, per output group of a multi-head model.

Inputs are raw logits `[N, C, H, W]` and int64 targets `[N, H, W]` whose `ignore_index` pixels
contribute nothing (neither loss value nor gradient).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsseg.errors import ConfigError
from rsseg.spec import DEFAULT_IGNORE_INDEX, OutputGroup

log = logging.getLogger(__name__)

ClassWeights = Sequence[float] | Mapping[str, Sequence[float]] | None


class ClasswiseDiceLoss(nn.Module):
    """1 - mean over classes of soft Dice, each class summed over the whole batch (N, H, W)."""

    def __init__(self, ignore_index: int = DEFAULT_IGNORE_INDEX, smooth: float = 1.0) -> None:
        super().__init__()
        if smooth < 0:
            raise ConfigError(f"dice smooth must be >= 0, got {smooth}; use the default 1.0")
        self.ignore_index = ignore_index
        self.smooth = float(smooth)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        _check_shapes(logits, target)
        num_classes = logits.shape[1]
        probs = torch.softmax(logits.float(), dim=1)  # float32 even under autocast: sums over many pixels
        valid = target != self.ignore_index
        safe_target = torch.where(valid, target, torch.zeros_like(target))
        one_hot = F.one_hot(safe_target, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
        mask = valid.unsqueeze(1).to(probs.dtype)
        probs = probs * mask
        one_hot = one_hot * mask
        dims = (0, 2, 3)
        intersection = (probs * one_hot).sum(dims)
        cardinality = probs.sum(dims) + one_hot.sum(dims)
        dice = (2.0 * intersection + self.smooth) / (cardinality + self.smooth)
        # Seed's choice: average over ALL classes; a class absent from target and prediction scores
        # ~1 thanks to `smooth`, and background keeps gradients alive on tiles without the target class.
        return 1.0 - dice.mean()


class SegmentationLoss(nn.Module):
    """`ce_weight * CE + dice_weight * Dice`; a zero weight skips that term entirely.

    `class_weights` weight the cross-entropy only (as torch's `weight=`), not the Dice term.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        dice_smooth: float = 1.0,
    ) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0:
            raise ConfigError(
                f"loss weights must be >= 0, got ce_weight={ce_weight}, dice_weight={dice_weight}"
            )
        if ce_weight == 0 and dice_weight == 0:
            raise ConfigError("ce_weight and dice_weight are both 0; set at least one of them > 0")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}; 0.0 disables it")
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = ignore_index
        self.dice = ClasswiseDiceLoss(ignore_index=ignore_index, smooth=dice_smooth)
        weight: Tensor | None = None
        if class_weights is not None:
            weight = torch.tensor([float(w) for w in class_weights], dtype=torch.float32)
            if weight.ndim != 1 or len(weight) == 0 or bool((weight < 0).any()) or not bool(weight.sum() > 0):
                raise ConfigError(
                    f"class_weights {list(class_weights)} must be a non-empty list of non-negative numbers "
                    "with a positive sum"
                )
        self.register_buffer("class_weights", weight, persistent=False)

    def terms(self, logits: Tensor, target: Tensor) -> dict[str, Tensor]:
        """The active terms ('ce', 'dice') and their weighted sum ('loss'), all scalar tensors."""
        _check_shapes(logits, target)
        weight = self.class_weights
        if weight is not None:
            if len(weight) != logits.shape[1]:
                raise ConfigError(
                    f"class_weights has {len(weight)} values but the logits have {logits.shape[1]} classes; "
                    "give one weight per class"
                )
            weight = weight.to(device=logits.device)
        valid = target != self.ignore_index
        if not bool(valid.any()):
            # torch's mean CE is 0/0 = NaN here; a graph-connected zero keeps backward() and DDP happy.
            zero = logits.sum() * 0.0
            out = {"loss": zero}
            if self.ce_weight:
                out["ce"] = zero
            if self.dice_weight:
                out["dice"] = zero
            return out
        out: dict[str, Tensor] = {}
        total = None
        if self.ce_weight:
            ce = F.cross_entropy(
                logits,
                target,
                weight=weight,
                ignore_index=self.ignore_index,
                label_smoothing=self.label_smoothing,
            )
            out["ce"] = ce
            total = self.ce_weight * ce
        if self.dice_weight:
            dice = self.dice(logits, target)
            out["dice"] = dice
            total = self.dice_weight * dice if total is None else total + self.dice_weight * dice
        assert total is not None  # the constructor guarantees one active term
        out["loss"] = total
        return out

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.terms(logits, target)["loss"]


class MultiHeadLoss(nn.Module):
    """Splits the logits channel-wise by output group and sums each group's SegmentationLoss.

    Call: `total, parts = loss(logits, {"change": t, "semantic_a": ta, ...})`. Groups missing from the
    targets dict are skipped (e.g. no semantic labels for a batch); unknown names are an error.
    `parts` holds floats `<group>_loss`, `<group>_ce`, `<group>_dice` for logging.
    """

    def __init__(self, groups: Sequence[OutputGroup], losses: Mapping[str, SegmentationLoss]) -> None:
        super().__init__()
        self.groups = list(groups)
        self.losses = nn.ModuleDict(dict(losses))
        self.num_channels = sum(g.channels for g in self.groups)

    def forward(self, logits: Tensor, targets: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        if logits.ndim != 4 or logits.shape[1] != self.num_channels:
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match the output groups "
                f"{[(g.name, g.channels) for g in self.groups]} ({self.num_channels} channels in all)"
            )
        names = [g.name for g in self.groups]
        unknown = sorted(set(targets) - set(names))
        if unknown:
            raise ValueError(f"targets for unknown output group(s) {unknown}; groups are {names}")
        if not any(n in targets for n in names):
            raise ValueError(f"no targets for any output group; groups are {names}")
        total: Tensor | None = None
        named: dict[str, Tensor] = {}
        for group, chunk in zip(self.groups, torch.split(logits, [g.channels for g in self.groups], dim=1)):
            if group.name not in targets:
                continue
            terms = self.losses[group.name].terms(chunk, targets[group.name])
            for key, value in terms.items():
                named[f"{group.name}_{key}"] = value.detach()
            total = terms["loss"] if total is None else total + terms["loss"]
        assert total is not None
        values = torch.stack([v.float() for v in named.values()]).tolist()  # one host sync for all parts
        return total, dict(zip(named, values))


def build_loss(
    groups: Sequence[OutputGroup],
    *,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    label_smoothing: float = 0.0,
    class_weights: ClassWeights = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    dice_smooth: float = 1.0,
) -> MultiHeadLoss:
    """One SegmentationLoss per output group.

    `class_weights` as a list applies to every group whose channel count equals its length (at least
    one must); as a dict `{group_name: weights}` it applies per group and each length must match.
    """
    groups = list(groups)
    if not groups:
        raise ConfigError("build_loss: no output groups given")
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ConfigError(f"build_loss: output group names must be unique, got {names}")
    per_group = _weights_per_group(groups, class_weights)
    losses = {
        g.name: SegmentationLoss(
            ce_weight=ce_weight,
            dice_weight=dice_weight,
            label_smoothing=label_smoothing,
            class_weights=per_group.get(g.name),
            ignore_index=ignore_index,
            dice_smooth=dice_smooth,
        )
        for g in groups
    }
    return MultiHeadLoss(groups, losses)


def _weights_per_group(groups: list[OutputGroup], class_weights: ClassWeights) -> dict[str, list[float]]:
    if class_weights is None:
        return {}
    if isinstance(class_weights, Mapping):
        by_name = {g.name: g for g in groups}
        out: dict[str, list[float]] = {}
        for name, weights in class_weights.items():
            if name not in by_name:
                raise ConfigError(f"class_weights: no output group {name!r}; groups are {list(by_name)}")
            if len(weights) != by_name[name].channels:
                raise ConfigError(
                    f"class_weights for group {name!r} has {len(weights)} values but the group has "
                    f"{by_name[name].channels} classes; give one weight per class"
                )
            out[name] = [float(w) for w in weights]
        return out
    weights = [float(w) for w in class_weights]
    matching = [g for g in groups if g.channels == len(weights)]
    if not matching:
        described = ", ".join(f"{g.name!r} ({g.channels} classes)" for g in groups)
        raise ConfigError(
            f"class_weights has {len(weights)} values but no output group has that many classes: "
            f"group {described}; give one weight per class of the group to weight"
        )
    for g in groups:
        if g.channels != len(weights):
            log.info("class_weights (%d values) not applied to group %r (%d classes)", len(weights), g.name, g.channels)
    return {g.name: weights for g in matching}


def _check_shapes(logits: Tensor, target: Tensor) -> None:
    if logits.ndim != 4 or target.ndim != 3 or logits.shape[:1] + logits.shape[2:] != target.shape:
        raise ValueError(
            f"expected logits [N, C, H, W] and target [N, H, W], got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.dtype != torch.int64:
        raise ValueError(f"target must be int64 class indices, got {target.dtype}")
