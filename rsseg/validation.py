"""Validation during training: a model's loss, metrics and overlays on the holdout tiles."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from rsseg.checkpoints import state_on_cpu
from rsseg.config import TrainConfig
from rsseg.evaluation import Evaluator
from rsseg.plots import Overlay
from rsseg.run_progress import RunProgress
from rsseg.spec import DatasetSpec, ModelSpec

log = logging.getLogger(__name__)


@torch.no_grad()
def validate(model, val_set, loss_fn, evaluator: Evaluator, device, config: TrainConfig, precision: str):
    model.eval()
    loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False, num_workers=config.workers)
    total_loss, total = 0.0, 0
    overlays: list[Overlay] = []
    spec = evaluator.spec.dataset
    for batch in tqdm(loader, desc="validate", unit="batch", mininterval=2.0, leave=False, dynamic_ncols=True):
        images = batch["image"].to(device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {k: v.to(device) for k, v in batch["targets"].items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(images)
        logits = logits.float()
        loss, _ = loss_fn(logits, targets)
        total_loss += float(loss) * images.shape[0]
        total += images.shape[0]
        maps = evaluator.update(logits, targets)
        main = evaluator.main_group
        for i in range(images.shape[0]):
            if len(overlays) >= config.overlays:
                break
            overlays.append(Overlay(_display_image(images[i].cpu(), spec), targets[main][i].cpu().numpy(),
                                    maps[main][i].cpu().numpy()))
    return total_loss / max(total, 1), overlays


def _display_image(image: torch.Tensor, spec: DatasetSpec) -> np.ndarray:
    """Normalised CHW tensor -> HxWx3 uint8 for overlays (first three bands, stretched per band)."""
    bands = image[: min(3, spec.num_bands)].numpy()
    lo = np.percentile(bands, 2, axis=(1, 2), keepdims=True)
    hi = np.percentile(bands, 98, axis=(1, 2), keepdims=True)
    scaled = np.clip((bands - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    if scaled.shape[0] < 3:
        scaled = np.repeat(scaled[:1], 3, axis=0)
    return (scaled.transpose(1, 2, 0) * 255).astype(np.uint8)


def validated_snapshots(model, run: RunProgress, val_set, loss_fn, spec: ModelSpec, device, config: TrainConfig,
                         precision: str) -> list[dict[str, Any]]:
    """The snapshots of a snapshots=true run (the last cycle's: the weights training ended with), each a
    copy of the model validated on its own."""
    if not config.snapshots:
        return []
    states = [*run.snapshots, state_on_cpu(model)]
    out = []
    for cycle, state in enumerate(states[:config.cycles]):
        snapshot = copy.deepcopy(model)
        snapshot.load_state_dict(state)
        evaluator = Evaluator(spec)
        validate(snapshot, val_set, loss_fn, evaluator, device, config, precision)
        metrics = {f"val_{k}": v for k, v in evaluator.compute().items()}
        snapshot.emit_aux = False
        out.append({"cycle": cycle, "model": snapshot.to(memory_format=torch.contiguous_format).cpu().eval(),
                    "metrics": metrics})
        log.info("snapshot %d/%d: val %s %.4f", cycle + 1, config.cycles, spec.dataset.headline_metric,
                 metrics.get(f"val_{spec.dataset.headline_metric}", math.nan))
    return out


def spread(n: int, k: int) -> list[int]:
    """k indexes spread evenly over range(n), so a capped validation still sees every scene."""
    return sorted({int(i) for i in np.linspace(0, n - 1, k)})
