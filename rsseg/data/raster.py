"""Raster reading through rasterio (GeoTIFF, COG, PNG, JPEG, ...), always by window; VRTs that read
several files as one raster."""

from __future__ import annotations

import logging
import os
import stat
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning, RasterioIOError
from rasterio.windows import Window as RioWindow

from rsseg.data.tiling import Window
from rsseg.errors import DataError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")

# Plain PNG/JPEG training images carry no georeferencing; that is expected, not worth a warning.
warnings.filterwarnings("ignore", category=NotGeoreferencedWarning)
# rasterio echoes GDAL errors as INFO log lines (from rasterio._err and rasterio._env); the error itself
# reaches the user through the exception (`gdal_cause`), so the echo would only be a stray line before it.
logging.getLogger("rasterio").setLevel(logging.WARNING)


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
        raise DataError(f"{path}: cannot read as a raster ({gdal_cause(exc)}); check the file is a complete image") from None


def read_window(path: str | Path, window: Window | None = None, bands: list[int] | None = None) -> np.ndarray:
    """Read `bands` (1-based, default all) of a window as an HWC array in the file's dtype."""
    try:
        with rasterio.open(path) as src:
            rio_window = None if window is None else RioWindow(window.col, window.row, window.width, window.height)
            data = src.read(bands or list(range(1, src.count + 1)), window=rio_window)
    except RasterioIOError as exc:
        raise DataError(f"{path}: cannot read as a raster ({gdal_cause(exc)}); check the file is a complete image") from None
    return np.ascontiguousarray(np.moveaxis(data, 0, -1))


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def not_a_file(path: Path) -> str | None:
    """What `path` is when it is not a regular file that can be opened ("a folder", "a broken link
    pointing at X", ...), or None. A named pipe or device would make a reader block or misbehave."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"a broken link pointing at {os.readlink(path)}"
        return "missing"
    except OSError as exc:  # a link loop, a folder without search permission, ...
        target = f" pointing at {os.readlink(path)}" if path.is_symlink() else ""
        return f"a path that cannot be followed{target} ({exc.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    kinds = {stat.S_ISFIFO: "a named pipe", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a device",
             stat.S_ISBLK: "a device"}
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def gdal_cause(exc: BaseException) -> str:
    """The innermost GDAL message behind a rasterio error (the real cause, e.g. "TIFFFillTile: Read error
    at row 512 ... got 79995 bytes, expected 196625"), rather than "Read failed. See previous exception"."""
    messages, seen, current = [], set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        if text and "see previous exception" not in text.lower():
            messages.append(text.splitlines()[0])
        current = current.__cause__ or current.__context__
    return (messages[-1] if messages else type(exc).__name__)[:300]


def write_stacked_vrt(vrt: Path, paths: Sequence[str | Path], bands: Sequence[int], grid: Any) -> Path:
    """Write a VRT whose bands are `bands` of each file of `paths` in turn, so that they are read as one
    raster by the same windows. `grid`: the first file, open; its grid, data type and nodata are the
    VRT's (check the files share that grid first)."""
    dtype = {"uint8": "Byte", "uint16": "UInt16"}.get(grid.dtypes[0], grid.dtypes[0])
    parts = []
    for path in paths:
        for band in bands:
            parts.append(
                f'<VRTRasterBand dataType="{dtype}" band="{len(parts) + 1}"><SimpleSource>'
                f'<SourceFilename relativeToVRT="0">{Path(path).resolve()}</SourceFilename>'
                f"<SourceBand>{band}</SourceBand></SimpleSource></VRTRasterBand>")
    geo = ", ".join(repr(v) for v in grid.transform.to_gdal())
    crs = f"<SRS>{grid.crs.to_wkt()}</SRS>" if grid.crs else ""
    text = (f'<VRTDataset rasterXSize="{grid.width}" rasterYSize="{grid.height}">{crs}'
            f"<GeoTransform>{geo}</GeoTransform>{''.join(parts)}</VRTDataset>")
    if grid.nodata is not None:
        text = text.replace("<SimpleSource>", f"<NoDataValue>{grid.nodata}</NoDataValue><SimpleSource>")
    vrt.write_text(text)
    return vrt
