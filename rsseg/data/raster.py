"""Raster reading through rasterio (GeoTIFF, COG, PNG, JPEG, ...), always by window."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window as RioWindow

from rsseg.data.tiling import Window
from rsseg.errors import DataError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

# Plain PNG/JPEG training images carry no georeferencing; that is expected, not worth a warning.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)


@dataclass(frozen=True)
class RasterInfo:
    path: str
    height: int
    width: int
    count: int
    dtype: str
    nodata: float | None


def raster_info(path: str | Path) -> RasterInfo:
    try:
        with rasterio.open(path) as src:
            return RasterInfo(str(path), src.height, src.width, src.count, src.dtypes[0], src.nodata)
    except RasterioIOError as exc:
        raise DataError(f"{path}: cannot read as a raster ({_short(exc)}); check the file is a complete image") from None


def read_window(path: str | Path, window: Window | None = None, bands: list[int] | None = None) -> np.ndarray:
    """Read `bands` (1-based, default all) of a window as an HWC array in the file's dtype."""
    try:
        with rasterio.open(path) as src:
            rio_window = None if window is None else RioWindow(window.col, window.row, window.width, window.height)
            data = src.read(bands or list(range(1, src.count + 1)), window=rio_window)
    except RasterioIOError as exc:
        raise DataError(f"{path}: cannot read as a raster ({_short(exc)}); check the file is a complete image") from None
    return np.ascontiguousarray(np.moveaxis(data, 0, -1))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200]
