"""Normalisation (the one definition shared by training, export checks and serving) and augmentations.

Augmentations are albumentations pipelines built from a short list of names and serialised with the
run (`A.to_dict`), so what a model was trained with can be rebuilt from its MLflow artifacts.
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np

from rsseg.errors import ConfigError
from rsseg.spec import DatasetSpec


class SwapDates(A.ImageOnlyTransform):
    """Exchange the two dates of a change pair (the first and second half of the channels): "changed" is
    the same either way, so each pair is also seen as B -> A. Binary change only: semantic maps of the
    two dates would have to swap with them."""

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        half = img.shape[-1] // 2
        return np.concatenate([img[..., half:], img[..., :half]], axis=-1)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


class BandJitter(A.ImageOnlyTransform):
    """Radiometric jitter for any band count and dtype: one brightness gain for the tile, a contrast
    factor around each band's mean and a small gain per band, clipped to the dtype's range (scenes from
    other dates, sensors or processing differ like this; albumentations' colour transforms assume RGB
    uint8 or float)."""

    def __init__(self, brightness: float = 0.2, contrast: float = 0.2, band_gain: float = 0.05,
                 p: float = 0.5) -> None:
        super().__init__(p=p)
        self.brightness, self.contrast, self.band_gain = brightness, contrast, band_gain

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        return {"brightness": rng.uniform(1 - self.brightness, 1 + self.brightness),
                "contrast": rng.uniform(1 - self.contrast, 1 + self.contrast),
                "seed": int(rng.integers(2**31))}

    def apply(self, img: np.ndarray, brightness: float = 1.0, contrast: float = 1.0, seed: int = 0,
              **params: Any) -> np.ndarray:
        gains = np.random.default_rng(seed).uniform(1 - self.band_gain, 1 + self.band_gain, img.shape[-1])
        pixels = img.astype(np.float32)
        mean = pixels.reshape(-1, img.shape[-1]).mean(axis=0)
        out = ((pixels - mean) * contrast + mean) * brightness * gains
        return np.clip(out, 0, np.iinfo(img.dtype).max if img.dtype.kind == "u" else None).astype(img.dtype)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness", "contrast", "band_gain")


# Name -> albumentations transform. Geometric ones only by default: they are safe for every band
# count and dtype (the seed used HorizontalFlip and RandomRotate90). `scale` zooms 0.75-1.33x (masks
# nearest-neighbour, borders mirrored); `rotate` turns by any angle up to 45 degrees either way (with
# rot90 and hflip: any orientation; overhead scenes have no "up", and diagonal roads are rarer than
# axis-aligned ones in most cities); `jitter` is BandJitter.
_AUGMENTATIONS = {
    "hflip": lambda: A.HorizontalFlip(p=0.5),
    "vflip": lambda: A.VerticalFlip(p=0.5),
    "rot90": lambda: A.RandomRotate90(p=0.5),
    "transpose": lambda: A.Transpose(p=0.5),
    "swap_dates": lambda: SwapDates(p=0.5),
    "scale": lambda: A.Affine(scale=(0.75, 1.33), keep_ratio=True, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
    "rotate": lambda: A.Rotate(limit=45, border_mode=cv2.BORDER_REFLECT_101, p=0.5),
    "jitter": lambda: BandJitter(p=0.5),
}
DATE_AUGMENTATIONS = ("swap_dates",)  # for binary change pairs only


def build_augmentation(names: str, spec: DatasetSpec | None = None) -> A.Compose:
    """`names` is a comma-separated list from `_AUGMENTATIONS` ("" or "none" for no augmentation); with
    `spec`, date augmentations are refused unless its data are binary change pairs."""
    wanted = [n.strip() for n in names.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in wanted if n not in _AUGMENTATIONS]
    if unknown:
        raise ConfigError(f"augment: unknown name(s) {', '.join(unknown)}; choose from {', '.join(_AUGMENTATIONS)}")
    dated = [n for n in wanted if n in DATE_AUGMENTATIONS]
    if dated and spec is not None and (spec.task != "change" or spec.has_semantic):
        raise ConfigError(f"augment: {', '.join(dated)} needs binary change pairs; this dataset is "
                          f"{'semantic change' if spec.task == 'change' else spec.task}")
    return A.Compose([_AUGMENTATIONS[n]() for n in wanted])


def augmentation_to_dict(transform: A.Compose) -> dict[str, Any]:
    return A.to_dict(transform)


def input_mean_std(spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    """Per-input-channel mean/std: the spec's per-band values, repeated for both dates of a change pair."""
    repeat = 2 if spec.task == "change" else 1
    mean = np.asarray(spec.mean * repeat, dtype=np.float32)
    std = np.asarray(spec.std * repeat, dtype=np.float32)
    return mean, std


def normalize(tile_hwc: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Raw uint8/uint16 HWC tile -> float32 CHW, (x - mean) / std per band.

    The DALI preprocessing in the served ensemble computes exactly this; tests compare the two.
    """
    mean, std = input_mean_std(spec)
    if tile_hwc.shape[-1] != mean.size:
        raise ConfigError(f"tile has {tile_hwc.shape[-1]} bands, the spec expects {mean.size}")
    out = (tile_hwc.astype(np.float32) - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))
