"""Exclusion lists: tiles of a prepared dataset not to train on (written by `audit` as exclude.csv, or by
hand), one row per tile: scene, row, col, size, as in the dataset's tiles.csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rsseg.errors import ConfigError

KEY = ["scene", "row", "col", "size"]


def read_exclusions(path: str | Path, tiles: pd.DataFrame) -> pd.DataFrame:
    """The listed tiles; every one must be a tile of `tiles` (the dataset's tiles.csv)."""
    path = Path(path)
    try:
        listed = pd.read_csv(path, dtype={"scene": str}, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ConfigError(f"exclude {path}: cannot read it as CSV ({exc}); give an audit's exclude.csv") from None
    missing = [c for c in KEY if c not in listed.columns]
    if missing:
        raise ConfigError(f"exclude {path}: columns {', '.join(missing)} missing; give an audit's exclude.csv "
                          f"(columns {', '.join(KEY)})")
    listed = listed[KEY].astype({"row": int, "col": int, "size": int}).drop_duplicates()
    known = listed.merge(tiles[KEY].drop_duplicates(), on=KEY, how="left", indicator=True)
    unknown = known[known["_merge"] == "left_only"]
    if len(unknown):
        first = unknown.iloc[0]
        raise ConfigError(f"exclude {path}: {len(unknown)} listed tile(s) are not tiles of this dataset (e.g. "
                          f"{first['scene']} at {first['row']},{first['col']}); audit the dataset you train on")
    return listed.reset_index(drop=True)


def drop_excluded(tiles: pd.DataFrame, excluded: pd.DataFrame) -> pd.DataFrame:
    """`tiles` without the excluded ones."""
    if excluded.empty:
        return tiles
    marked = tiles.merge(excluded[KEY], on=KEY, how="left", indicator=True)
    return tiles[(marked["_merge"] == "left_only").to_numpy()].reset_index(drop=True)


class ExcludedAreas:
    """The excluded tiles' rectangles per scene: a training window whose centre falls in one is drawn again."""

    def __init__(self, excluded: pd.DataFrame | None) -> None:
        self.rects: dict[str, np.ndarray] = {}
        if excluded is not None and not excluded.empty:
            for scene, group in excluded.groupby("scene"):
                self.rects[str(scene)] = group[["row", "col", "size"]].to_numpy(dtype=np.int64)

    def __bool__(self) -> bool:
        return bool(self.rects)

    def covers(self, scene: str, row: float, col: float) -> bool:
        rects = self.rects.get(scene)
        if rects is None:
            return False
        r, c, s = rects[:, 0], rects[:, 1], rects[:, 2]
        return bool(((row >= r) & (row < r + s) & (col >= c) & (col < c + s)).any())
