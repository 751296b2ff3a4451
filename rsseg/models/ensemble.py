"""The PyTorch side of a logit-averaging ensemble: the reference the served average (several ONNX files,
rsseg.averaging) is parity-checked against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class LogitAverage(nn.Module):
    """Mean of the members' logits; members take the same input and give the same channels."""

    def __init__(self, members: Sequence[nn.Module], specs: Sequence[Any] = ()) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.specs = list(specs)  # each member's ModelSpec, when known (a registered ensemble's)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)
