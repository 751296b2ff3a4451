"""The manifest prepare writes: scene folds and splits, tile windows, statistics, and the output folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsseg import faults
from rsseg.data.layouts import Scene
from rsseg.data.scan import Scan
from rsseg.data.tiling import grid_windows
from rsseg.errors import DataError
from rsseg.outputs import replace_output_dir
from rsseg.spec import DatasetSpec

log = logging.getLogger("rsseg.data.prepare")  # part of the prepare command: its log lines keep that name

SCENE_COLUMNS = ["scene", "image", "mask", "image_b", "mask_b", "mask_change", "height", "width", "fold",
                 "split"]
TILE_COLUMNS = ["scene", "row", "col", "size", "fold", "split"]
# Outputs of prepare from before the owner marker (rsseg.outputs): exactly these files.
LEGACY_OUTPUT = {"prepare": {"scenes.csv", "tiles.csv", "dataset_spec.json", "stats.json"}}


def manifest(
    scenes: list[Scene], tile_size: int, overlap: int, folds: int, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scene-level folds and split (no scene's tiles on both sides), then the tile windows of each scene."""
    n = len(scenes)
    rng = np.random.default_rng(seed)
    fold = np.empty(n, dtype=np.int64)
    fold[rng.permutation(n)] = np.arange(n) % folds  # round-robin over a seeded shuffle
    n_val = 0
    if n >= 2 and val_fraction > 0:
        n_val = min(n - 1, max(1, round(n * val_fraction)))
    split = np.full(n, "train", dtype=object)
    split[rng.permutation(n)[:n_val]] = "val"
    if n_val == 0:
        log.warning("no validation scene (%d scene(s), val fraction %s): validate on the folds or add scenes",
                    n, val_fraction)
    if n < folds:
        log.warning("%d scenes for %d folds: some folds are empty", n, folds)
    scene_rows = []
    tile_rows = []
    for i, s in enumerate(scenes):
        scene_rows.append({
            "scene": s.name,
            "image": str(s.image.resolve()),
            "mask": str(s.mask.resolve()),
            "image_b": str(s.image_b.resolve()) if s.image_b else "",
            "mask_b": str(s.mask_b.resolve()) if s.mask_b else "",
            "mask_change": str(s.mask_change.resolve()) if s.mask_change else "",
            "height": s.height,
            "width": s.width,
            "fold": int(fold[i]),
            "split": split[i],
        })
        for w in grid_windows(s.height, s.width, tile_size, overlap):
            tile_rows.append((s.name, w.row, w.col, tile_size, int(fold[i]), split[i]))
    return pd.DataFrame(scene_rows, columns=SCENE_COLUMNS), pd.DataFrame(tile_rows, columns=TILE_COLUMNS)


def _band_stats(hist: np.ndarray) -> dict[str, list[float | int | None]]:
    values = np.arange(hist.shape[1], dtype=np.float64)
    out: dict[str, list[Any]] = {k: [] for k in ("mean", "std", "min", "max", "p1", "p99", "pixels")}
    for h in hist:
        n = int(h.sum())
        out["pixels"].append(n)
        if n == 0:
            for k in ("mean", "std", "min", "max", "p1", "p99"):
                out[k].append(None)
            continue
        hf = h.astype(np.float64)
        mean = float((hf * values).sum() / n)
        var = float((hf * (values - mean) ** 2).sum() / n)
        nz = np.flatnonzero(h)
        cdf = np.cumsum(h)
        out["mean"].append(round(mean, 4))
        out["std"].append(round(var**0.5, 4))
        out["min"].append(int(nz[0]))
        out["max"].append(int(nz[-1]))
        out["p1"].append(int(np.searchsorted(cdf, 0.01 * n)))
        out["p99"].append(int(np.searchsorted(cdf, 0.99 * n)))
    return out


def stats(
    spec: DatasetSpec, layout: str, source: Path, scene_df: pd.DataFrame, tile_df: pd.DataFrame, folds: int,
    tile_size: int, overlap: int, scan: Scan, class_stats: dict[str, Any],
) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "name": spec.name,
        "layout": layout,
        "source": str(source.resolve()),
        "task": spec.task,
        "tile_size": tile_size,
        "overlap": overlap,
        **class_stats,
        "bands": {"index": spec.bands, **_band_stats(scan.band_hist)},
        "scenes": {"total": len(scene_df), **{s: int((scene_df["split"] == s).sum()) for s in ("train", "val")}},
        "tiles": {"total": len(tile_df), **{s: int((tile_df["split"] == s).sum()) for s in ("train", "val")}},
        "folds": {
            str(f): {"scenes": int((scene_df["fold"] == f).sum()), "tiles": int((tile_df["fold"] == f).sum())}
            for f in range(folds)
        },
    }
    return stats


def write_output(
    out: Path, spec: DatasetSpec, scene_df: pd.DataFrame, tile_df: pd.DataFrame, stats: dict[str, Any],
    overwrite: bool,
) -> Path:
    """Write into a temp folder beside `out`, then swap it in: `out` is never half-written."""

    def fill(tmp: Path) -> None:
        scene_df.to_csv(tmp / "scenes.csv", index=False)
        tile_df.to_csv(tmp / "tiles.csv", index=False)
        spec.save(tmp / "dataset_spec.json")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        faults.point("prepare-filled")

    try:
        return replace_output_dir(out, fill, command="prepare", overwrite=overwrite, legacy=LEGACY_OUTPUT)
    except OSError as exc:  # disk full, a folder made read-only meanwhile: the temp folder is already gone
        raise DataError(f"{out}: cannot write the manifest ({exc.strerror or exc}); check free space and "
                        "permissions, or give another --out (nothing was changed)") from None
