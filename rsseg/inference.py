"""From model logits to class maps: the one definition used by validation, export checks and serving."""

from __future__ import annotations

import torch

from rsseg.heads import CHANGE, SEMANTIC
from rsseg.spec import OutputGroup


def split_outputs(logits: torch.Tensor, groups: list[OutputGroup]) -> dict[str, torch.Tensor]:
    """Slice [N, sum(channels), H, W] logits into one tensor per output group."""
    parts = torch.split(logits, [g.channels for g in groups], dim=1)
    return {g.name: p for g, p in zip(groups, parts, strict=True)}


def class_maps(logits: torch.Tensor, groups: list[OutputGroup]) -> dict[str, torch.Tensor]:
    """Argmax per group. For change models the semantic maps of both dates are 0 ("unchanged") where
    no change is predicted and the best land-cover class (index >= 1) where it is, as in SenseEarth."""
    parts = split_outputs(logits, groups)
    maps = {name: part.argmax(dim=1) for name, part in parts.items()}
    if CHANGE in parts:
        changed = maps[CHANGE] == 1
        for name in SEMANTIC:
            if name in parts:
                best = parts[name][:, 1:].argmax(dim=1) + 1
                maps[name] = torch.where(changed, best, torch.zeros_like(best))
    return maps
