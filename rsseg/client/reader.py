"""Reading a scene window by window: each planned window's pixels (reflect-padded past the scene's
bottom/right edge) and which of them are valid, never the whole scene."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from rasterio.enums import MaskFlags
from rasterio.windows import Window as RioWindow

from rsseg.client.windows import PlannedWindow, reflect_index


class WindowReader:
    """Reads a planned window (reflect-padded past the bottom/right edge) and its validity mask.

    Windows whose every block is absent from a GeoTIFF (sparse: no offset in the file, so GDAL returns
    the nodata value, or 0) are known to be empty without reading a pixel when that fill value is the
    nodata value: a 100000 x 100000 scene with a small patch of data costs only its patch. With a
    mask and no such nodata, only the (one-byte) mask of those windows is read.
    """

    def __init__(self, src: Any, bands: list[int], nodata: float | None, plan: list[PlannedWindow]) -> None:
        self.src, self.bands, self.nodata = src, bands, nodata
        flags = [src.mask_flag_enums[b - 1] for b in bands]
        # An internal/sidecar mask or an alpha band marks missing pixels beside (or instead of) nodata.
        self.use_mask = any(MaskFlags.per_dataset in f or MaskFlags.alpha in f for f in flags)
        self.seconds = 0.0
        self.fill = src.nodata if src.nodata is not None else 0  # what GDAL returns for an absent block
        self.fill_is_nodata = nodata is not None and self.fill == nodata
        self.empty: set[tuple[int, int]] = set()  # (grid_row, grid_col) of windows over absent blocks only
        if plan and (self.fill_is_nodata or self.use_mask) and src.driver == "GTiff":
            absent = [(src.block_shapes[b - 1], _absent_blocks(src, b)) for b in self._distinct_block_bands()]
            self.empty = {(w.grid_row, w.grid_col) for w in plan if self._over(absent, w)}
        self._nothing = np.zeros((plan[0].size,) * 2, dtype=bool) if plan else None

    def _distinct_block_bands(self) -> list[int]:
        """Bands whose blocks lie apart: all of them when band-interleaved, else one (pixel-interleaved
        blocks hold every band)."""
        interleave = self.src.interleaving.name if self.src.interleaving else "BAND"
        return list(self.bands) if interleave == "BAND" and len(self.bands) > 1 else self.bands[:1]

    def _region(self, w: PlannedWindow) -> tuple[RioWindow, tuple[np.ndarray, np.ndarray] | None]:
        """The file window a planned window reads, and the index that reflects it into the tile (None
        when the window lies inside the scene: nothing to reflect)."""
        if not (w.pad_bottom or w.pad_right):
            return RioWindow(w.col, w.row, w.size, w.size), None
        rows = reflect_index(np.arange(w.row, w.row + w.size), self.src.height)
        cols = reflect_index(np.arange(w.col, w.col + w.size), self.src.width)
        r0, c0 = int(rows.min()), int(cols.min())
        rio = RioWindow(c0, r0, int(cols.max()) - c0 + 1, int(rows.max()) - r0 + 1)
        return rio, np.ix_(rows - r0, cols - c0)

    def _over(self, absent: list[tuple[tuple[int, int], np.ndarray]], w: PlannedWindow) -> bool:
        """Whether every block the window reads is absent, in every band."""
        rio, _ = self._region(w)
        r0, c0 = int(rio.row_off), int(rio.col_off)
        r1, c1 = r0 + int(rio.height) - 1, c0 + int(rio.width) - 1
        return all(blocks[r0 // bh:r1 // bh + 1, c0 // bw:c1 // bw + 1].all() for (bh, bw), blocks in absent)

    def read(self, w: PlannedWindow) -> tuple[np.ndarray | None, np.ndarray]:
        """(tile, valid); tile is None when no pixel is valid and the pixels were not read."""
        t0 = time.perf_counter()
        rio, index = self._region(w)
        if (w.grid_row, w.grid_col) in self.empty:
            if self.fill_is_nodata:
                return None, self._nothing
            valid = _reflect(self.src.read_masks(self.bands[0], window=rio), index) > 0
            tile = np.full((w.size, w.size, len(self.bands)), self.fill, dtype=self.src.dtypes[self.bands[0] - 1])
            self.seconds += time.perf_counter() - t0
            return (tile if valid.any() else None), valid
        data = self.src.read(self.bands, window=rio)
        tile = np.ascontiguousarray(_reflect(np.moveaxis(data, 0, -1), index))
        valid = np.ones(tile.shape[:2], dtype=bool)
        if self.nodata is not None:
            valid &= ~np.all(tile == self.nodata, axis=-1)
        if self.use_mask:
            valid &= _reflect(self.src.read_masks(self.bands[0], window=rio), index) > 0
        self.seconds += time.perf_counter() - t0
        return tile, valid


def _reflect(array: np.ndarray, index: tuple[np.ndarray, np.ndarray] | None) -> np.ndarray:
    return array if index is None else array[index]


def _absent_blocks(src: Any, band: int) -> np.ndarray:
    """[block rows, block cols] True where the GeoTIFF has no data for the block (offset 0 or none):
    GDAL's TIFF metadata, about a microsecond per block, no pixel read."""
    bh, bw = src.block_shapes[band - 1]
    rows, cols = -(-src.height // bh), -(-src.width // bw)
    absent = np.empty((rows, cols), dtype=bool)
    for i in range(rows):
        for j in range(cols):
            absent[i, j] = src.get_tag_item(f"BLOCK_OFFSET_{j}_{i}", "TIFF", bidx=band) in (None, "0")
    return absent
