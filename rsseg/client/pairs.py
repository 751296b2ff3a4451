"""Change pairs as one raster: the two dates' bands stacked in a VRT, read by the same windows."""

from __future__ import annotations

from pathlib import Path

import rasterio

from rsseg.data.raster import write_stacked_vrt
from rsseg.errors import DataError


def grid_differences(a: rasterio.DatasetReader, b: rasterio.DatasetReader) -> list[str]:
    """What differs between two rasters' grids, each as "what A vs B" (transforms in GDAL's order)."""
    differences = []
    if (a.width, a.height) != (b.width, b.height):
        differences.append(f"size {a.width}x{a.height} vs {b.width}x{b.height}")
    if a.crs != b.crs:
        differences.append(f"CRS {a.crs.to_string() if a.crs else 'none'} vs {b.crs.to_string() if b.crs else 'none'}")
    if a.transform != b.transform:
        differences.append(f"transform {a.transform.to_gdal()} vs {b.transform.to_gdal()}")
    return differences


def stack_pair(before: Path, after: Path, bands: list[int], vrt: Path) -> Path:
    """A VRT whose bands are `bands` of `before` then of `after`: one raster, read by the same windows."""
    with rasterio.open(before) as a, rasterio.open(after) as b:
        differences = grid_differences(a, b)
        if differences:
            raise DataError(f"{before} and {after} are not on the same grid ({'; '.join(differences)}); reproject "
                            "one onto the other first")
        for path, src in ((before, a), (after, b)):
            if max(bands) > src.count:
                raise DataError(f"{path}: has {src.count} band(s), needs {bands}; choose bands with --bands")
        return write_stacked_vrt(vrt, (before, after), bands, a)
