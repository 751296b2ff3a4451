"""One process's share of training: its device, the torchrun process group, seeds, and which training
samples it reads per epoch."""

from __future__ import annotations

import math
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from rsseg.config import TrainConfig
from rsseg.errors import ConfigError


def select_device(name: str, distributed: bool) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda: no CUDA device is available; use --device cpu")
        index = int(os.environ.get("LOCAL_RANK", 0)) if distributed else 0
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def init_distributed() -> bool:
    """True under torchrun with several processes (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def is_main_process() -> bool:
    """Rank 0 under torchrun (before or after the process group starts), or a plain process."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_sampler(train_set, config: TrainConfig, epoch: int, distributed: bool):
    if distributed:
        sampler = DistributedSampler(train_set, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
        return sampler
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    order = torch.randperm(len(train_set), generator=generator).tolist()
    if config.max_train_tiles:
        order = order[: config.max_train_tiles]
    return order


def steps_per_epoch(samples: int, config: TrainConfig, distributed: bool) -> int:
    per_process = math.ceil(samples / dist.get_world_size()) if distributed else samples
    if config.max_train_tiles:
        per_process = min(per_process, config.max_train_tiles)
    return max(1, per_process // config.batch_size if per_process > config.batch_size else 1)
