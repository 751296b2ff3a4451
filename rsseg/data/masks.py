"""Decoding raw mask pixels to class-index targets, one rule per `DatasetSpec.mask_encoding`.

Used by `prepare` (to validate and count) and by the training dataset (to build targets), so both see
exactly the same classes.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.errors import RasterioError
from rasterio.windows import Window as RioWindow

from rsseg.data.tiling import Window
from rsseg.errors import DataError, first_line
from rsseg.heads import CHANGE, CLASSES, SEMANTIC
from rsseg.spec import DatasetSpec

log = logging.getLogger(__name__)


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """Pack the last axis (r, g, b) into one uint32 per pixel: 0x00RRGGBB."""
    rgb = np.asarray(rgb)
    return (
        (rgb[..., 0].astype(np.uint32) << 16)
        | (rgb[..., 1].astype(np.uint32) << 8)
        | rgb[..., 2].astype(np.uint32)
    )


def unpack_rgb(packed: int) -> tuple[int, int, int]:
    packed = int(packed)
    return (packed >> 16) & 255, (packed >> 8) & 255, packed & 255


def binarize_rgb(rgb: np.ndarray, threshold: int) -> np.ndarray:
    """Each channel to 0 or 255 at `threshold` (JPEG-noisy colour masks such as DeepGlobe's)."""
    return np.where(rgb >= threshold, 255, 0).astype(np.uint8)


def decode_palette(
    raw: np.ndarray,
    palette: list[list[int]],
    ignore_index: int,
    binarize: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Colour mask (H, W, >=3) -> (class indices uint8, boolean mask of colours not in the palette).

    Lookup by packed uint32 and a binary search over the sorted palette keys: O(N log K), no pixel loop.
    """
    if raw.ndim != 3 or raw.shape[-1] < 3:
        shape = "x".join(str(s) for s in raw.shape)
        raise ValueError(
            f"palette masks need 3 colour bands (RGB), got an array of shape {shape}; read masks with "
            "rsseg.data.masks.read_mask, which expands colour-table PNGs to RGB"
        )
    rgb = raw[..., :3]  # RGBA masks: alpha is not part of the colour
    if binarize is not None:
        rgb = binarize_rgb(rgb, binarize)
    keys = np.array([pack_rgb(np.array(p[:3])) for p in palette], dtype=np.uint32)
    values = np.array([p[3] for p in palette], dtype=np.uint8)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    packed = pack_rgb(rgb)
    pos = np.searchsorted(keys, packed)
    pos = np.minimum(pos, len(keys) - 1)
    known = keys[pos] == packed
    out = np.where(known, values[pos], np.uint8(ignore_index)).astype(np.uint8)
    return out, ~known


def colormap_lut(src: rasterio.DatasetReader) -> np.ndarray | None:
    """(N, 3) uint8 RGB lookup of a colour-table ("paletted") single-band raster, else None.

    Paletted PNGs store colour masks as indexes into a per-file colour table (some Dubai tiles do);
    colour decoding must see the colours, not the per-file indexes.
    """
    if src.count != 1 or src.colorinterp[0] != ColorInterp.palette:
        return None
    try:
        cmap = src.colormap(1)
    except ValueError:
        return None
    size = 256 if src.dtypes[0] == "uint8" else 65536
    lut = np.zeros((size, 3), dtype=np.uint8)
    for index, rgba in cmap.items():
        if 0 <= index < size:
            lut[index] = rgba[:3]
    return lut


def read_mask(path: str | Path, spec: DatasetSpec, window: Window | None = None) -> np.ndarray:
    """Read a mask window as raw HWC pixels ready for `decode_mask` / `mask_targets`.

    Like `rsseg.data.raster.read_window`, except that for palette specs a colour-table mask is expanded to
    RGB (index masks keep their raw indexes, as VOC-style paletted index PNGs mean them).
    """
    try:
        with rasterio.open(path) as src:
            rio_window = None if window is None else RioWindow(window.col, window.row, window.width, window.height)
            lut = colormap_lut(src) if spec.mask_encoding == "palette" else None
            if lut is not None:
                return lut[src.read(1, window=rio_window)]
            bands = [1, 2, 3] if spec.mask_encoding == "palette" and src.count >= 3 else [1]
            data = src.read(bands, window=rio_window)
    except RasterioError as exc:
        raise DataError(f"{path}: cannot read the mask ({first_line(exc)}); check the file is a complete image") from None
    return np.ascontiguousarray(np.moveaxis(data, 0, -1))


def _first_band(raw: np.ndarray) -> np.ndarray:
    return raw[..., 0] if raw.ndim == 3 else raw


def decode_mask(raw: np.ndarray, spec: DatasetSpec) -> np.ndarray:
    """Raw mask (HW or HWC, as `read_window` returns it) -> class indices (H, W) uint8.

    ignore_index stays ignore_index; anything that cannot be a class (unknown colour, index >= 256)
    becomes ignore_index rather than a wrong class.
    """
    enc = spec.mask_encoding
    ignore = np.uint8(spec.ignore_index)
    if enc == "palette":
        if not spec.palette:
            raise ValueError(f"dataset spec {spec.name!r}: mask_encoding 'palette' but no palette")
        # For palette masks mask_threshold is the per-channel binarisation threshold (DeepGlobe's "binarize").
        out, _unknown = decode_palette(raw, spec.palette, spec.ignore_index, spec.mask_threshold)
        return out
    band = _first_band(raw)
    if enc == "index":
        if band.dtype == np.uint8:
            return band.copy()
        return np.where(band > 255, ignore, band).astype(np.uint8)
    if enc == "binary255":
        # 255 -> 1, 0 -> 0; any other value is not a label of this encoding: ignore it.
        return np.where(band == 255, np.uint8(1), np.where(band == 0, np.uint8(0), ignore)).astype(np.uint8)
    if enc == "threshold":
        if spec.mask_threshold is None:
            raise ValueError(f"dataset spec {spec.name!r}: mask_encoding 'threshold' but no mask_threshold")
        return (band >= spec.mask_threshold).astype(np.uint8)
    raise ValueError(f"unknown mask encoding {enc!r}")


def change_targets(raw_a: np.ndarray, raw_b: np.ndarray | None, spec: DatasetSpec,
                   raw_change: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Targets of a change pair.

    Without semantic classes (LEVIR-CD) `raw_a` is the one change mask: {"change": 0/1}.
    With semantic classes (SECOND/SenseEarth) `raw_a`/`raw_b` are the semantic maps of both dates, 0 meaning
    unchanged: change = (a != 0); the semantic maps keep only changed pixels (0 -> ignore), as SenseEarth
    trains its semantic heads on changed pixels only. With an explicit change mask (`raw_change`: 0
    unchanged, any other value changed, the ignore index ignored) the change target is that mask and the
    semantic maps keep every non-zero pixel: unchanged areas with pseudo labels train the semantic heads too.
    """
    ignore = np.uint8(spec.ignore_index)
    a = decode_mask(raw_a, spec)
    if not spec.semantic_classes:
        return {CHANGE: a}
    if raw_b is None:
        raise ValueError(f"dataset spec {spec.name!r}: semantic change targets need both label maps")
    b = decode_mask(raw_b, spec)
    if raw_change is not None:
        explicit = raw_change[..., 0] if raw_change.ndim == 3 else raw_change
        change = np.where(explicit == ignore, ignore, (explicit != 0).astype(np.uint8)).astype(np.uint8)
    else:
        change = np.where(a == ignore, ignore, (a != 0).astype(np.uint8)).astype(np.uint8)
    return {
        CHANGE: change,
        SEMANTIC[0]: np.where(a == 0, ignore, a).astype(np.uint8),
        SEMANTIC[1]: np.where(b == 0, ignore, b).astype(np.uint8),
    }


def mask_targets(raw: np.ndarray, raw_b: np.ndarray | None, spec: DatasetSpec,
                 raw_change: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """All target maps of one sample, keyed by output-group name (see `rsseg.spec.output_groups_for`)."""
    if spec.task == "change":
        return change_targets(raw, raw_b, spec, raw_change)
    return {CLASSES: decode_mask(raw, spec)}
