"""Optimisation pieces of the training loop: optimiser, learning-rate schedule, weight averaging, precision.

The default schedule follows the run's real length: a short linear warm-up, then cosine decay to 1 % of
the peak at the end of training, where the end is the time budget when one is set (progress = elapsed
seconds / budget), else the last step of the last epoch. A run that stops on its budget therefore ends
with a small learning rate, not half-way through an epoch count it never reaches.
"""

from __future__ import annotations

import copy
import math

import torch

from rsseg.config import TrainConfig

FLOOR = 0.01  # the cosine schedule's last learning rate, as a share of the peak


def build_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """The epoch-based schedulers (cosine_restarts, constant). "cosine" is set per step by `cosine_factor`;
    a constant LambdaLR stands in for it so checkpoints always hold a scheduler state."""
    if config.scheduler == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=max(config.restart_epochs, 1), T_mult=max(config.restart_mult, 1), eta_min=config.lr * FLOOR
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def cosine_factor(progress: float, warmup: float) -> float:
    """Learning-rate multiplier at `progress` in [0, 1]: linear warm-up to 1, then cosine down to FLOOR."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return max(progress / warmup, FLOOR)
    span = max(1.0 - warmup, 1e-9)
    return FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * (progress - warmup) / span))


def snapshot_factor(progress: float, warmup: float, cycles: int) -> float:
    """Learning-rate multiplier of a snapshot-ensemble run: `cycles` cosine cycles over [0, 1], each
    restarting at the peak (warm-up in the first only), each ending at FLOOR where a snapshot is taken."""
    cycles = max(cycles, 1)
    position = min(max(progress, 0.0), 1.0) * cycles
    cycle = min(int(position), cycles - 1)
    return cosine_factor(position - cycle, warmup * cycles if cycle == 0 else 0.0)


def cycle_index(progress: float, cycles: int) -> int:
    """The cosine cycle (0-based) a snapshot-ensemble run is in at `progress`."""
    return min(int(max(progress, 0.0) * max(cycles, 1)), max(cycles, 1) - 1)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class WeightAverage:
    """An exponential moving average of a model's weights (buffers copied), for validation and export.

    The decay ramps up as (1 + n) / (10 + n) over the first updates, so a short run is not dominated by
    its random initial weights.
    """

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        source = model.state_dict()
        for name, average in self.model.state_dict().items():
            value = source[name].detach()
            if average.dtype.is_floating_point:
                average.mul_(decay).add_(value, alpha=1 - decay)
            else:
                average.copy_(value)


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" -> "bf16" where the device computes bf16 natively (CUDA with bf16 support, CPUs with
    AVX-512 BF16 or AMX), else "fp32"."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if native else "fp32"
