"""Output files of a segmented scene: the class-map GeoTIFF, a colour PNG preview and a JSON summary.

Every file is written under a temp name in its destination folder and renamed once complete, so a
reader (or a failed run) never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.errors import NotGeoreferencedWarning
from rasterio.transform import Affine
from rasterio.windows import Window as RioWindow

from rsseg.atomic import write_text_atomically
from rsseg.client.stitch import NODATA
from rsseg.plots import colorize
from rsseg.spec import ModelSpec, default_colors

log = logging.getLogger(__name__)

CHANGE_COLORS = [[0, 0, 0], [255, 255, 255]]  # change maps: unchanged black, changed white
PREVIEW_MAX_SIZE = 1024
_MIN_OVERVIEW = 256  # stop adding overview levels once the smallest is below this


def head_colors(spec: ModelSpec, head: int = 0) -> list[list[int]]:
    """Class colours of output head `head`: the dataset's, black/white for a change map, the semantic
    colours (or defaults) for the semantic maps of change models."""
    name = spec.outputs[head].name
    if spec.dataset.task != "change":
        return [list(c) for c in spec.dataset.colors]
    if name == "change":
        return CHANGE_COLORS
    return [list(c) for c in (spec.dataset.semantic_colors or default_colors(spec.outputs[head].channels))]


def head_classes(spec: ModelSpec, head: int = 0) -> list[str]:
    group = spec.outputs[head]
    if spec.dataset.task != "change":
        return list(spec.dataset.classes)
    if group.name == "change":
        return ["unchanged", "changed"]
    return list(spec.dataset.semantic_classes or [f"class_{i}" for i in range(group.channels)])


def block_size(height: int, width: int) -> int:
    """512-pixel blocks for large maps, 256 otherwise (less padding in the last block of small ones)."""
    return 512 if min(height, width) >= 2048 else 256


def temp_path(path: Path, kind: str = "tmp") -> Path:
    """Where `path` is written before its rename: the same folder (the rename stays atomic), hidden from
    globbing *.tif, a suffix GDAL drivers recognise, and this process's id (rsseg.client.leftovers
    removes the files of processes that are gone)."""
    return path.with_name(f".{path.stem}.{kind}-{os.getpid()}{path.suffix}")


class _RowStreamWriter:
    """Streams [bands, h, W] rows, top to bottom, into a tiled DEFLATE GeoTIFF.

    Use as a context manager: rows are buffered to whole block rows (each compressed block is written
    once, never re-read and re-compressed) and the file is renamed to `path` only when the `with` block
    exits without an exception; otherwise the temp file is removed. Subclasses describe the bands
    (`_describe`) and may add overviews (`_finish`).
    """

    def __init__(self, path: str | Path, *, height: int, width: int, count: int, dtype: str, crs: CRS | None,
                 transform: Affine, nodata: float, **creation: Any) -> None:
        self.path = Path(path)
        self.height, self.width, self.count = height, width, count
        self.dtype = np.dtype(dtype)
        self.block = block_size(height, width)
        self._profile = {
            "driver": "GTiff", "height": height, "width": width, "count": count, "dtype": dtype,
            "crs": crs, "transform": transform, "nodata": nodata, "tiled": True,
            "blockxsize": self.block, "blockysize": self.block, "compress": "deflate",
            "interleave": "band", "BIGTIFF": "IF_SAFER",
            # blocks all nodata are left out of the file (GDAL reads them back as nodata): a 100000 x 100000
            # scene with a small patch of data gives a map of a few hundred KB, written in seconds
            "SPARSE_OK": True, **creation,
        }
        self._tmp = temp_path(self.path)
        self._dst: Any = None
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._written = 0  # rows handed to GDAL
        self._received = 0  # rows handed to write_rows
        self.seconds = 0.0  # in GDAL: writing (compression), overviews, closing

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # a stop signal may land anywhere in here: the temp file must not outlive it
            with warnings.catch_warnings():  # a scene without georeferencing gets a map without, as expected
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                self._dst = rasterio.open(self._tmp, "w", **self._profile)
            self._describe(self._dst)
        except BaseException:
            if self._dst is not None:
                self._dst.close()
            self._tmp.unlink(missing_ok=True)
            raise
        return self

    def _describe(self, dst: Any) -> None:
        """Band descriptions, tags, colour tables: called once the file is open."""

    def _finish(self, dst: Any) -> None:
        """Called after the last row, before closing (overviews)."""

    def _received_rows(self, rows: np.ndarray) -> None:
        """Called with every block of rows as it arrives (statistics)."""

    def write_rows(self, row: int, rows: np.ndarray) -> None:
        """Append rows [row, row + h) of the raster; rows must arrive in order without gaps."""
        if row != self._received:
            raise ValueError(f"rows must arrive in order: expected row {self._received}, got {row}")
        if rows.shape[0] != self.count or rows.shape[2] != self.width or rows.dtype != self.dtype:
            raise ValueError(f"expected {self.dtype} rows [{self.count}, h, {self.width}], got {rows.dtype} "
                             f"{rows.shape}")
        self._received += rows.shape[1]
        if self._received > self.height:
            raise ValueError(f"rows past the end of the raster ({self._received} > {self.height})")
        self._received_rows(rows)
        self._pending.append(rows)
        self._pending_rows += rows.shape[1]
        full = self._pending_rows // self.block * self.block
        if full:
            self._flush(full)

    def _flush(self, rows: int) -> None:
        t0 = time.perf_counter()
        buffered = np.concatenate(self._pending, axis=1) if len(self._pending) > 1 else self._pending[0]
        out, rest = buffered[:, :rows], buffered[:, rows:]
        self._dst.write(out, window=RioWindow(0, self._written, self.width, rows))
        self._written += rows
        self._pending = [rest] if rest.shape[1] else []
        self._pending_rows = rest.shape[1]
        self.seconds += time.perf_counter() - t0

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                if self._pending_rows:
                    self._flush(self._pending_rows)
                if self._written != self.height:
                    raise ValueError(f"{self.path}: {self._written} of {self.height} rows written")
                t0 = time.perf_counter()
                self._finish(self._dst)
            self._dst.close()
            if exc_type is None:
                self._publish(self._tmp).replace(self.path)
                self.seconds += time.perf_counter() - t0
        finally:
            if not self._dst.closed:
                self._dst.close()
            self._tmp.unlink(missing_ok=True)
            temp_path(self.path, "cog").unlink(missing_ok=True)
            self._pending = []

    def _publish(self, tmp: Path) -> Path:
        """The finished file to rename to `path` (subclasses may rewrite `tmp` first)."""
        return tmp


class ClassMapWriter(_RowStreamWriter):
    """The class map: a cloud-optimised GeoTIFF with one uint8 band per output head, nodata 255, the
    class colours as its colour table (single-head maps) and in band tags, nearest-neighbour overviews.
    Pixel counts per class and head are kept as rows go by (`counts`)."""

    def __init__(self, path: str | Path, *, height: int, width: int, crs: CRS | None, transform: Affine,
                 spec: ModelSpec) -> None:
        for group in spec.outputs:
            if group.channels >= NODATA:
                raise ValueError(f"output {group.name!r} has {group.channels} classes; class {NODATA} is the "
                                 "nodata value of the map")
        super().__init__(path, height=height, width=width, count=len(spec.outputs), dtype="uint8", crs=crs,
                         transform=transform, nodata=NODATA)
        self.heads = self.count
        self.counts = np.zeros((self.heads, 256), dtype=np.int64)
        self._spec = spec

    def _describe(self, dst: Any) -> None:
        spec = self._spec
        for band, group in enumerate(spec.outputs, start=1):
            dst.set_band_description(band, group.name)
            dst.update_tags(band, classes=json.dumps(head_classes(spec, band - 1)),
                            colors=json.dumps(head_colors(spec, band - 1)))
        dst.update_tags(model_name=spec.model_name or "", model_version=spec.model_version or "",
                        nodata_class=str(NODATA))
        if self.heads == 1:
            table = {i: (*map(int, c), 255) for i, c in enumerate(head_colors(spec, 0))}
            table[NODATA] = (0, 0, 0, 0)
            dst.write_colormap(1, table)
        else:
            # TIFF keeps a colour table only for single-band files (PHOTOMETRIC=PALETTE); the colours
            # are in each band's `colors` tag instead.
            log.info("%s: %d bands, so the class colours go to band tags, not a colour table", self.path,
                     self.heads)

    def _received_rows(self, rows: np.ndarray) -> None:
        for head in range(self.heads):
            if rows[head].min() == NODATA:  # all nodata (empty parts of big scenes): no histogram needed
                self.counts[head, NODATA] += rows[head].size
            else:
                self.counts[head] += np.bincount(rows[head].ravel(), minlength=256)

    def _finish(self, dst: Any) -> None:
        factors = overview_factors(self.height, self.width)
        if factors:
            dst.build_overviews(factors, Resampling.nearest)
            dst.update_tags(ns="rio_overview", resampling="nearest")

    def _publish(self, tmp: Path) -> Path:
        """Rewritten by GDAL's COG driver (overviews first, then the blocks in order: readers over HTTP
        range requests fetch only what they show). It reuses the overviews built above and keeps the
        colour table and tags; one more pass over the compressed map (~0.5 s at 8192 x 8192)."""
        cog = temp_path(self.path, "cog")
        rasterio.shutil.copy(tmp, cog, driver="COG", compress="DEFLATE", blocksize=self.block,
                             overviews="FORCE_USE_EXISTING", overview_resampling="NEAREST", bigtiff="IF_SAFER",
                             sparse_ok=True)
        return cog


class ProbabilityWriter(_RowStreamWriter):
    """Per-class probabilities: one band per output channel ("head:class" descriptions), stored as
    16-bit floats (GDAL 3.10 has no Float16 type: Float32 bands with NBITS=16 are written as IEEE
    half floats and read back as float32), NaN where the input had no data."""

    def __init__(self, path: str | Path, *, height: int, width: int, crs: CRS | None, transform: Affine,
                 spec: ModelSpec) -> None:
        super().__init__(path, height=height, width=width, count=spec.num_output_channels, dtype="float32",
                         crs=crs, transform=transform, nodata=float("nan"), nbits=16)
        self._spec = spec

    def _describe(self, dst: Any) -> None:
        band = 1
        for head, group in enumerate(self._spec.outputs):
            for name in head_classes(self._spec, head):
                dst.set_band_description(band, f"{group.name}:{name}")
                band += 1
        dst.update_tags(model_name=self._spec.model_name or "", model_version=self._spec.model_version or "")


def overview_factors(height: int, width: int) -> list[int]:
    """2, 4, 8, ... while the overview's longer side stays >= _MIN_OVERVIEW pixels."""
    factors, f = [], 2
    while max(height, width) // f >= _MIN_OVERVIEW:
        factors.append(f)
        f *= 2
    return factors


def write_preview(png_path: str | Path, class_map_path: str | Path, spec: ModelSpec, *,
                  max_size: int = PREVIEW_MAX_SIZE, head: int = 0) -> Path:
    """A colour PNG of one head of a class map, at most `max_size` pixels on its longer side.

    Read decimated (nearest), which GDAL serves from the map's overviews: the full-resolution map is
    never loaded. Nodata is transparent.
    """
    png_path = Path(png_path)
    with rasterio.open(class_map_path) as src:
        scale = max(1.0, max(src.height, src.width) / max_size)
        shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale)))
        small = src.read(head + 1, out_shape=shape, resampling=Resampling.nearest)
    rgb = colorize(small, head_colors(spec, head))
    alpha = np.where(small == NODATA, 0, 255).astype(np.uint8)
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(png_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(tmp, "w", driver="PNG", height=shape[0], width=shape[1], count=4,
                               dtype="uint8") as dst:
                dst.write(np.moveaxis(rgba, -1, 0))
        tmp.replace(png_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".aux.xml").unlink(missing_ok=True)
    return png_path


def write_summary(path: str | Path, summary: dict[str, Any]) -> Path:
    """The scene summary as indented JSON, written atomically."""
    return write_text_atomically(path, json.dumps(summary, indent=2, sort_keys=True) + "\n")
