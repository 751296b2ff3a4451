"""Torch dataset over a prepared manifest: reads tile windows on demand, never copies pixels."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from rsseg.config import TrainConfig, split_list
from rsseg.data.exclusions import ExcludedAreas
from rsseg.data.masks import mask_targets, read_mask
from rsseg.data.raster import raster_info, read_window
from rsseg.data.tiling import Window
from rsseg.data.transforms import normalize
from rsseg.errors import ConfigError, DataError
from rsseg.spec import DatasetSpec

log = logging.getLogger(__name__)

# Images up to this many pixels are decoded once per worker and kept: PNG/JPEG cannot be read by
# window without decoding the whole file, and the seeds' datasets are many small images.
_CACHE_MAX_PIXELS = 4096 * 4096
_CACHE_SCENES = 64


@dataclass
class PreparedData:
    """A prepared dataset folder: spec, scenes and tiles (see rsseg.data.prepare)."""

    root: Path
    spec: DatasetSpec
    scenes: pd.DataFrame
    tiles: pd.DataFrame

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        root = Path(root)
        for name in ("dataset_spec.json", "scenes.csv", "tiles.csv"):
            if not (root / name).is_file():
                raise DataError(
                    f"{root}: not a prepared dataset ({name} missing); run prepare on your data first "
                    "(mlflow run . -e prepare -P source=DIR)"
                )
        spec = DatasetSpec.load(root / "dataset_spec.json")
        scenes = pd.read_csv(root / "scenes.csv", keep_default_na=False, dtype={"scene": str})
        tiles = pd.read_csv(root / "tiles.csv", keep_default_na=False, dtype={"scene": str})
        return cls(root, spec, scenes, tiles)

    @property
    def tile_size(self) -> int:
        """The prepared tile size (from tiles.csv for data prepared before the spec recorded it)."""
        return int(self.spec.tile_size or self.tiles["size"].iloc[0])

    def raw_tile(self, index: int) -> np.ndarray:
        """Tile `index` of tiles.csv as raw HWC pixels in model band order (both dates for change data)."""
        return self.raw_window(self.tiles.iloc[index])

    def raw_window(self, tile: Any) -> np.ndarray:
        """A tile (a row of tiles.csv: scene, row, col, size) as raw HWC pixels in model band order."""
        scene = self.scenes.set_index("scene").loc[tile["scene"]]
        window = Window(int(tile["row"]), int(tile["col"]), int(tile["size"]), int(tile["size"]))
        images = [read_window(scene["image"], window, self.spec.bands)]
        if self.spec.task == "change":
            images.append(read_window(scene["image_b"], window, self.spec.bands))
        return np.concatenate(images, axis=-1)

    def split_tiles(self, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(train, val) tiles: the 9:1 split when fold < 0, else fold k is validation (train_k/val_k)."""
        if fold < 0:
            is_val = self.tiles["split"] == "val"
        else:
            folds = int(self.tiles["fold"].max()) + 1
            if fold >= folds:
                raise ConfigError(f"fold {fold}: the dataset at {self.root} has folds 0..{folds - 1}")
            is_val = self.tiles["fold"] == fold
        train, val = self.tiles[~is_val], self.tiles[is_val]
        if train.empty or val.empty:
            raise DataError(
                f"{self.root}: the split leaves {len(train)} training and {len(val)} validation tiles; "
                "prepare with more scenes or another --val-fraction"
            )
        return train.reset_index(drop=True), val.reset_index(drop=True)


class TileDataset(Dataset):
    """Samples are dicts: image (float32 CHW, normalised), targets {group: int64 HW}, scene, row, col."""

    def __init__(self, data: PreparedData, tiles: pd.DataFrame, augmentation: A.Compose | None = None) -> None:
        self.spec = data.spec
        self.tiles = tiles.reset_index(drop=True)
        self.scenes = data.scenes.set_index("scene")
        self.augmentation = augmentation
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self.tiles)

    def _image(self, path: str, window: Window) -> np.ndarray:
        return self._read(path, window, lambda w: read_window(path, w, self.spec.bands))

    def _mask(self, path: str, window: Window) -> np.ndarray:
        # read_mask, not read_window: colour-table masks must be expanded to RGB for palette decoding.
        return self._read(path, window, lambda w: read_mask(path, self.spec, w))

    def _read(self, path: str, window: Window, reader: Callable[[Window | None], np.ndarray]) -> np.ndarray:
        if path not in self._cache:
            info = raster_info(path)
            if info.height * info.width > _CACHE_MAX_PIXELS:
                return reader(window)
            self._cache[path] = reader(None)
            if len(self._cache) > _CACHE_SCENES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(path)
        whole = self._cache[path]
        return whole[window.row : window.row + window.height, window.col : window.col + window.width]

    def __getitem__(self, index: int) -> dict:
        tile = self.tiles.iloc[index]
        return self.sample(tile["scene"], Window(int(tile["row"]), int(tile["col"]), int(tile["size"]), int(tile["size"])))

    def sample(self, scene_name: str, window: Window) -> dict:
        """The (augmented) sample of `window` in scene `scene_name`."""
        scene = self.scenes.loc[scene_name]
        image = self._image(scene["image"], window)
        raw_mask = self._mask(scene["mask"], window)
        raw_mask_b = raw_change = None
        if self.spec.task == "change":
            image = np.concatenate([image, self._image(scene["image_b"], window)], axis=-1)
            if scene["mask_b"]:
                raw_mask_b = self._mask(scene["mask_b"], window)
            if scene.get("mask_change", ""):
                path = scene["mask_change"]
                raw_change = self._read(path, window, lambda w: read_window(path, w, [1]))
        targets = mask_targets(raw_mask, raw_mask_b, self.spec, raw_change)
        names = list(targets)
        if self.augmentation is not None and self.augmentation.transforms:
            out = self.augmentation(image=image, masks=[targets[n] for n in names])
            image, targets = out["image"], dict(zip(names, out["masks"], strict=True))
        return {
            "image": torch.from_numpy(normalize(image, self.spec)),
            "targets": {n: torch.from_numpy(np.ascontiguousarray(t).astype(np.int64)) for n, t in targets.items()},
            "scene": scene_name,
            "row": window.row,
            "col": window.col,
        }


class RandomWindowDataset(TileDataset):
    """Windows of `size` at random positions anywhere in the scenes of `tiles`, new ones every epoch.

    A fixed tile grid shows the model the same few crops each epoch (a 400x400 image gives four); random
    positions show it every shift. Scenes are drawn in proportion to their area. `len()` is the number of
    grid tiles, so an epoch keeps its size, but at least MIN_EPOCH (a dataset of four small images would
    otherwise spend its time starting epochs); the windows of (seed, epoch, index) are reproducible, so
    a resumed run repeats them. Windows centred in an `excluded` tile (an audit's list) are drawn again.
    """

    MIN_EPOCH = 128
    MAX_DRAWS = 20  # windows drawn again while their centre is in an excluded tile

    def __init__(self, data: PreparedData, tiles: pd.DataFrame, size: int, augmentation: A.Compose | None = None,
                 seed: int = 0, excluded: ExcludedAreas | None = None) -> None:
        super().__init__(data, tiles, augmentation)
        self.excluded = excluded or ExcludedAreas(None)
        names = list(dict.fromkeys(self.tiles["scene"]))
        heights = self.scenes.loc[names, "height"].astype(int).to_numpy()
        widths = self.scenes.loc[names, "width"].astype(int).to_numpy()
        if (heights < size).any() or (widths < size).any():
            small = names[int(np.argmin(np.minimum(heights, widths)))]
            raise ConfigError(f"crop size {size} is larger than scene {small} of {data.root}; use a smaller crop_size")
        self.size, self.seed, self.epoch = int(size), int(seed), 0
        self._names, self._heights, self._widths = names, heights, widths
        area = heights.astype(np.float64) * widths
        self._p = area / area.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return max(len(self.tiles), self.MIN_EPOCH)

    def window(self, index: int) -> tuple[str, Window]:
        rng = np.random.default_rng((self.seed, self.epoch, int(index)))
        for _ in range(self.MAX_DRAWS):
            i = int(rng.choice(len(self._names), p=self._p))
            row = int(rng.integers(0, self._heights[i] - self.size + 1))
            col = int(rng.integers(0, self._widths[i] - self.size + 1))
            half = self.size / 2
            if not self.excluded.covers(self._names[i], row + half, col + half):
                break  # after MAX_DRAWS the last draw stands (a scene almost wholly excluded)
        return self._names[i], Window(row, col, self.size, self.size)

    def __getitem__(self, index: int) -> dict:
        return self.sample(*self.window(index))


class MixedDataset(Dataset):
    """Several training sets as one, each contributing `count` samples per epoch (index i of a part is taken
    modulo its length, so a small part repeats and a large one is sampled by the run's shuffled order)."""

    def __init__(self, parts: Sequence[Dataset], counts: Sequence[int]) -> None:
        if len(parts) != len(counts) or not parts or min(counts) < 1:
            raise ConfigError(f"mix: {len(parts)} dataset(s) but sample counts {list(counts)}; give one share > 0 each")
        self.parts, self.counts = list(parts), [int(c) for c in counts]
        self._starts = np.cumsum([0, *self.counts])

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            if hasattr(part, "set_epoch"):
                part.set_epoch(epoch)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(part, index within it) of a sample."""
        part = int(np.searchsorted(self._starts, index, side="right") - 1)
        return part, (index - int(self._starts[part])) % len(self.parts[part])

    def __getitem__(self, index: int) -> dict:
        part, inner = self.locate(index)
        return self.parts[part][inner]


def mixed_training_set(primary: TileDataset, extra: Sequence[PreparedData], spec: DatasetSpec, config: TrainConfig,
                       augmentation: Any, tile_size: int) -> MixedDataset:
    """The primary training set plus every scene of each extra dataset (normalised like the primary), with
    `config.mix` shares of samples per epoch (default: as many as each holds)."""
    parts: list[TileDataset] = [primary]
    for other in extra:
        theirs = other.spec
        for what in ("task", "classes", "bands", "dtype", "semantic_classes", "ignore_index"):
            if getattr(theirs, what) != getattr(spec, what):
                raise ConfigError(f"data {other.root}: its {what} {getattr(theirs, what)} differ from the first "
                                  f"dataset's {getattr(spec, what)}; mix datasets of the same classes and bands")
        if other.tile_size != tile_size:
            raise ConfigError(f"data {other.root}: tile size {other.tile_size}, the first dataset's is {tile_size}; "
                              f"prepare it with --tile-size {tile_size}")
        same = replace(other, spec=replace(spec, name=theirs.name))
        if config.sampling == "random":
            parts.append(RandomWindowDataset(same, other.tiles, config.crop_size or tile_size, augmentation,
                                             seed=config.seed + len(parts)))
        else:
            parts.append(TileDataset(same, other.tiles, augmentation))
    shares = split_list(config.mix.replace(":", ","), float) if config.mix else [float(len(p)) for p in parts]
    if len(shares) != len(parts) or min(shares) <= 0:
        raise ConfigError(f"mix {config.mix!r}: give one share > 0 per dataset ({len(parts)}), e.g. "
                          f"{':'.join(['1'] * len(parts))}")
    counts = [max(1, round(len(primary) * share / shares[0])) for share in shares]
    log.info("training on %d datasets, %s samples per epoch", len(parts), counts)
    return MixedDataset(parts, counts)
