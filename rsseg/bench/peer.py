"""The peer our recipe must beat: a plain segmentation_models.pytorch script, as a new user writes it.

The seed's architecture through smp (`Unet("tu-tf_efficientnet_lite3", encoder_depth=4,
decoder_channels=(128, 64, 32, 16), decoder_attention_type="scse")`), random init, AdamW 1e-3, cross-entropy
+ Dice, random 256x256 crops with flips and 90-degree rotations, batch 8, constant learning rate, fp32,
for a wall-clock budget; then each whole image in one pass. Change pairs go in as both dates' bands
stacked (early fusion). Benchmark-only: smp is the `bench` extra, never a dependency of the package.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch

from rsseg.data.datasets import PreparedData
from rsseg.evaluation import (
    LabelledScene,
    ScenePredictor,
    labelled_scenes,
    scene_image,
    scene_targets,
)

log = logging.getLogger(__name__)

CROP, BATCH, LR = 256, 8, 1e-3


def _to_input(pixels: np.ndarray, dtype: str) -> torch.Tensor:
    """[N, H, W, C] raw -> [N, C, H, W] float in [-2, 2] (x / max, centred): what a plain script does."""
    top = 255.0 if dtype == "uint8" else 65535.0
    x = torch.from_numpy(np.ascontiguousarray(pixels)).float().permute(0, 3, 1, 2)
    return (x / top - 0.5) / 0.25


def train_peer(data: PreparedData, budget: float, seed: int = 0) -> torch.nn.Module:
    import segmentation_models_pytorch as smp

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    scenes = labelled_scenes(data, "train")
    group = "change" if data.spec.task == "change" else "classes"
    images = [scene_image(s, data) for s in scenes]
    targets = [scene_targets(s, data)[group] for s in scenes]
    classes = 2 if data.spec.task == "change" else data.spec.num_classes
    model = smp.Unet("tu-tf_efficientnet_lite3", encoder_weights=None, encoder_depth=4,
                     decoder_channels=(128, 64, 32, 16), decoder_attention_type="scse",
                     in_channels=images[0].shape[-1], classes=classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    ignore = data.spec.ignore_index
    ce = torch.nn.CrossEntropyLoss(ignore_index=ignore)
    dice = smp.losses.DiceLoss("multiclass", ignore_index=ignore)
    crop = min(CROP, *(min(i.shape[:2]) for i in images))
    model.train()
    steps, start = 0, time.monotonic()
    while time.monotonic() - start < budget:
        xs, ys = [], []
        for i in rng.integers(0, len(images), BATCH):
            h, w = images[i].shape[:2]
            r, c = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
            x, y = images[i][r : r + crop, c : c + crop], targets[i][r : r + crop, c : c + crop]
            k = int(rng.integers(0, 4))
            x, y = np.rot90(x, k), np.rot90(y, k)
            if rng.random() < 0.5:
                x, y = x[:, ::-1], y[:, ::-1]
            xs.append(x)
            ys.append(np.ascontiguousarray(y))
        logits = model(_to_input(np.stack(xs), data.spec.dtype))
        y = torch.from_numpy(np.stack(ys).astype(np.int64))
        loss = ce(logits, y) + dice(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    log.info("peer: %d steps of %d crops of %d in %.0f s (%.2f tiles/s)", steps, BATCH, crop,
             time.monotonic() - start, steps * BATCH / (time.monotonic() - start))
    model.peer_steps = steps  # type: ignore[attr-defined]
    return model.eval()


def peer_predictor(model: torch.nn.Module, data: PreparedData) -> ScenePredictor:
    """Each whole image in one pass (reflect-padded to a multiple of 16, the encoder's reduction)."""
    group = "change" if data.spec.task == "change" else "classes"

    @torch.no_grad()
    def predict(scene: LabelledScene) -> dict[str, np.ndarray]:
        image = scene_image(scene, data)
        h, w = image.shape[:2]
        padded = np.pad(image, ((0, math.ceil(h / 16) * 16 - h), (0, math.ceil(w / 16) * 16 - w), (0, 0)),
                        mode="reflect")
        logits = model(_to_input(padded[None], data.spec.dtype))
        return {group: logits[0].argmax(0).numpy()[:h, :w].astype(np.uint8)}

    return predict
