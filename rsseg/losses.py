"""Segmentation losses, per output group of a multi-head model: a weighted sum of named terms.

Terms: `ce` (softmax cross-entropy), `dice` (class-wise soft Dice, the sea-ice seed's: the mean over all
classes), `dice_present` (the same Dice averaged over the classes present in the batch's labels only, as
segmentation_models.pytorch's DiceLoss does), `focal` (Lin et
al. 2017), `lovasz` (Lovász-softmax, Berman et al. 2018: a surrogate of per-class IoU) and `edge_ce`
(cross-entropy with stronger label smoothing on pixels near a class boundary, found on the fly from the
mask: the land-cover seed's "online edge label smoothing"). A loss is named like `ce+dice` or
`ce+lovasz:0.5` (NAME or NAME:WEIGHT joined by +).

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

    def __init__(self, ignore_index: int = DEFAULT_IGNORE_INDEX, smooth: float = 1.0,
                 present_only: bool = False) -> None:
        super().__init__()
        if smooth < 0:
            raise ConfigError(f"dice smooth must be >= 0, got {smooth}; use the default 1.0")
        self.ignore_index = ignore_index
        self.smooth = float(smooth)
        self.present_only = present_only

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
        if self.present_only:
            # A class absent from the batch's labels adds no term: with the all-classes mean, every batch
            # without a rare class (roads in land cover) pushes that class's probabilities down everywhere.
            present = one_hot.sum(dims) > 0
            return 1.0 - dice[present].mean() if bool(present.any()) else logits.sum() * 0.0
        # Seed's choice: average over ALL classes; a class absent from target and prediction scores
        # ~1 thanks to `smooth`, and background keeps gradients alive on tiles without the target class.
        return 1.0 - dice.mean()


LOSS_TERMS = ("ce", "dice", "dice_present", "focal", "lovasz", "edge_ce")
EDGE_RADIUS = 2  # pixels: a pixel is "near a boundary" when a (2r+1)² window around it holds another class


def parse_loss(spec: str) -> list[tuple[str, float]]:
    """"ce+lovasz:0.5" -> [("ce", 1.0), ("lovasz", 0.5)]; ConfigError naming the problem otherwise."""
    terms: list[tuple[str, float]] = []
    for part in (p.strip() for p in spec.split("+")):
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in LOSS_TERMS:
            raise ConfigError(f"loss {spec!r}: unknown term {name!r}; use NAME or NAME:WEIGHT joined by +, "
                              f"NAME one of {', '.join(LOSS_TERMS)}")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ConfigError(f"loss {spec!r}: weight {weight!r} of {name} is not a number") from None
        if value < 0:
            raise ConfigError(f"loss {spec!r}: weight of {name} must be >= 0, got {value}")
        if name in (t for t, _ in terms):
            raise ConfigError(f"loss {spec!r}: {name} is named twice; give it once with its weight")
        terms.append((name, value))
    return terms


def _valid_mean(per_pixel: Tensor, target: Tensor, ignore_index: int, weight: Tensor | None) -> Tensor:
    """Mean of a per-pixel loss over the valid pixels, each weighted by its class's weight (as torch's
    weighted cross-entropy normalises)."""
    valid = target != ignore_index
    pixel_weight = valid.to(per_pixel.dtype)
    if weight is not None:
        pixel_weight = pixel_weight * weight[torch.where(valid, target, torch.zeros_like(target))]
    return (per_pixel * pixel_weight).sum() / pixel_weight.sum().clamp_min(1e-12)


def focal_loss(logits: Tensor, target: Tensor, ignore_index: int, weight: Tensor | None = None,
               gamma: float = 2.0) -> Tensor:
    """Cross-entropy scaled by (1 - p_true)^gamma: confident, easy pixels count less."""
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    return _valid_mean((1.0 - torch.exp(-ce)).pow(gamma) * ce, target, ignore_index, weight)


def edge_smoothed_ce(logits: Tensor, target: Tensor, ignore_index: int, weight: Tensor | None = None,
                     smoothing: float = 0.0, edge_smoothing: float = 0.2, radius: int = EDGE_RADIUS) -> Tensor:
    """Cross-entropy with label smoothing `edge_smoothing` on pixels within `radius` of another class (or
    of ignored pixels: labels are least sure there) and `smoothing` elsewhere."""
    labels = torch.where(target == ignore_index, torch.full_like(target, -1), target).unsqueeze(1).float()
    size = 2 * radius + 1
    highest = F.max_pool2d(labels, size, stride=1, padding=radius)
    lowest = -F.max_pool2d(-labels, size, stride=1, padding=radius)
    near_edge = (highest != lowest).squeeze(1)
    eps = torch.where(near_edge, edge_smoothing, smoothing)
    log_probs = torch.log_softmax(logits.float(), dim=1)
    safe = torch.where(target == ignore_index, torch.zeros_like(target), target)
    nll = -log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return _valid_mean((1.0 - eps) * nll + eps * uniform, target, ignore_index, weight)


def lovasz_softmax(logits: Tensor, target: Tensor, ignore_index: int) -> Tensor:
    """Lovász-softmax over the batch's valid pixels, averaged over the classes present in the target."""
    probs = torch.softmax(logits.float(), dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    labels = target.reshape(-1)
    valid = labels != ignore_index
    probs, labels = probs[valid], labels[valid]
    losses = []
    for c in range(probs.shape[1]):
        foreground = (labels == c).float()
        if not bool(foreground.any()):
            continue
        errors = (foreground - probs[:, c]).abs()
        errors_sorted, order = torch.sort(errors, descending=True)
        losses.append(torch.dot(errors_sorted, _lovasz_gradient(foreground[order])))
    return torch.stack(losses).mean() if losses else logits.sum() * 0.0


def _lovasz_gradient(sorted_foreground: Tensor) -> Tensor:
    """Gradient of the Lovász extension of the Jaccard loss at the sorted errors (Berman et al., Alg. 1)."""
    total = sorted_foreground.sum()
    intersection = total - sorted_foreground.cumsum(0)
    union = total + (1.0 - sorted_foreground).cumsum(0)
    jaccard = 1.0 - intersection / union
    jaccard[1:] = jaccard[1:] - jaccard[:-1].clone()
    return jaccard


class SegmentationLoss(nn.Module):
    """A weighted sum of named terms (`ce` and `dice` by default, each with weight 1); a zero weight skips
    its term entirely. `terms` names others (see LOSS_TERMS); `ce_weight`/`dice_weight` scale the ce and
    dice terms wherever they appear.

    `class_weights` weight the cross-entropy-like terms (ce, focal, edge_ce), not dice or lovasz.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        label_smoothing: float = 0.0,
        class_weights: Sequence[float] | None = None,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        dice_smooth: float = 1.0,
        terms: Sequence[tuple[str, float]] | None = None,
        focal_gamma: float = 2.0,
        edge_smoothing: float = 0.2,
    ) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0:
            raise ConfigError(
                f"loss weights must be >= 0, got ce_weight={ce_weight}, dice_weight={dice_weight}"
            )
        scale = {"ce": float(ce_weight), "dice": float(dice_weight), "dice_present": float(dice_weight)}
        named = list(terms) if terms is not None else [("ce", 1.0), ("dice", 1.0)]
        self.weights = {name: weight * scale.get(name, 1.0) for name, weight in named}
        if not any(w > 0 for w in self.weights.values()):
            if terms is None:
                raise ConfigError("ce_weight and dice_weight are both 0; set at least one of them > 0")
            raise ConfigError(f"loss {'+'.join(n for n, _ in named)}: every term has weight 0; give one a weight > 0")
        self.weights = {name: w for name, w in self.weights.items() if w > 0}
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}; 0.0 disables it")
        if not 0.0 <= edge_smoothing < 1.0:
            raise ConfigError(f"edge_smoothing must be in [0, 1), got {edge_smoothing}")
        if focal_gamma < 0:
            raise ConfigError(f"focal_gamma must be >= 0, got {focal_gamma}")
        self.label_smoothing = float(label_smoothing)
        self.edge_smoothing = float(edge_smoothing)
        self.focal_gamma = float(focal_gamma)
        self.ignore_index = ignore_index
        self.dice = ClasswiseDiceLoss(ignore_index=ignore_index, smooth=dice_smooth)
        self.dice_present = ClasswiseDiceLoss(ignore_index=ignore_index, smooth=dice_smooth, present_only=True)
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
        """The active terms (e.g. 'ce', 'dice') and their weighted sum ('loss'), all scalar tensors."""
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
            return {**{name: zero for name in self.weights}, "loss": zero}
        out = {name: self._term(name, logits, target, weight) for name in self.weights}
        out["loss"] = sum((self.weights[name] * value for name, value in out.items()), logits.new_zeros(()))
        return out

    def _term(self, name: str, logits: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
        if name == "ce":
            return F.cross_entropy(logits, target, weight=weight, ignore_index=self.ignore_index,
                                   label_smoothing=self.label_smoothing)
        if name == "dice":
            return self.dice(logits, target)
        if name == "dice_present":
            return self.dice_present(logits, target)
        if name == "focal":
            return focal_loss(logits, target, self.ignore_index, weight, self.focal_gamma)
        if name == "lovasz":
            return lovasz_softmax(logits, target, self.ignore_index)
        return edge_smoothed_ce(logits, target, self.ignore_index, weight, self.label_smoothing, self.edge_smoothing)

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


def deep_supervision_loss(loss_fn: MultiHeadLoss, output: Tensor | Sequence[Tensor], targets: Mapping[str, Tensor],
                          aux_weights: Sequence[float]) -> tuple[Tensor, Tensor, dict[str, float]]:
    """The loss of a model's training output: its logits' loss plus each auxiliary output's loss times its
    weight (auxiliary logits are resized bilinearly to the targets' size first).

    `output` is one logits tensor, or (logits, aux...) from a model whose `emit_aux` is set. Returns the
    total, the main logits (for metrics) and the parts (`aux<i>_loss` added per auxiliary output).
    """
    if isinstance(output, Tensor):
        output = (output,)
    logits, aux = output[0], output[1:]
    if len(aux) != len(aux_weights):
        raise ValueError(f"{len(aux)} auxiliary outputs but {len(aux_weights)} auxiliary loss weights")
    total, parts = loss_fn(logits.float(), targets)
    for i, (extra, weight) in enumerate(zip(aux, aux_weights)):
        if extra.shape[-2:] != logits.shape[-2:]:
            extra = F.interpolate(extra, size=logits.shape[-2:], mode="bilinear", align_corners=False)
        extra_loss, _ = loss_fn(extra.float(), targets)
        parts[f"aux{i}_loss"] = float(extra_loss.detach())
        total = total + float(weight) * extra_loss
    return total, logits, parts


def build_loss(
    groups: Sequence[OutputGroup],
    *,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    label_smoothing: float = 0.0,
    class_weights: ClassWeights = None,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    dice_smooth: float = 1.0,
    loss: str = "ce+dice",
    focal_gamma: float = 2.0,
    edge_smoothing: float = 0.2,
) -> MultiHeadLoss:
    """One SegmentationLoss per output group, each the terms `loss` names (e.g. "ce+lovasz:0.5").

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
    terms = parse_loss(loss)
    losses = {
        g.name: SegmentationLoss(
            ce_weight=ce_weight,
            dice_weight=dice_weight,
            label_smoothing=label_smoothing,
            class_weights=per_group.get(g.name),
            ignore_index=ignore_index,
            dice_smooth=dice_smooth,
            terms=terms,
            focal_gamma=focal_gamma,
            edge_smoothing=edge_smoothing,
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


def distillation_loss(student: Tensor, teacher: Tensor, groups: Sequence[OutputGroup], temperature: float) -> Tensor:
    """Hinton et al.'s soft-target loss: per output group, KL(softmax(teacher / T) || softmax(student / T)) over
    every pixel (the teacher's view of unlabelled and ignored pixels is the point), times T² so its gradients
    keep their scale as T changes; groups averaged."""
    terms = []
    for s, t in zip(torch.split(student.float(), [g.channels for g in groups], dim=1),
                    torch.split(teacher.float(), [g.channels for g in groups], dim=1), strict=True):
        log_p = F.log_softmax(s / temperature, dim=1)
        q = F.softmax(t / temperature, dim=1)
        kl = (q * (torch.log(q.clamp_min(1e-12)) - log_p)).sum(dim=1).mean()
        terms.append(kl * temperature * temperature)
    return torch.stack(terms).mean()
