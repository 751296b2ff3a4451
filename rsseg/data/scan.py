"""Reading the rasters: header checks of every file, then one block-by-block pass over every image and
mask for band histograms, mask values and palette decoding."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window as RioWindow
from tqdm import tqdm

from rsseg import faults
from rsseg.data.layouts import Scene
from rsseg.data.masks import (
    binarize_rgb,
    colormap_lut,
    decode_palette,
    pack_rgb,
    unpack_rgb,
)
from rsseg.data.palette import Palette, shipped_palettes
from rsseg.data.raster import RasterInfo, gdal_cause, raster_info
from rsseg.errors import ConfigError, DataError, UserError
from rsseg.spec import DTYPES

# Blocks read at a time: bounded memory whatever the scene size.
_BLOCK = 1024
# Make damaged files fail here rather than read as garbage: GDAL 3.10's whole-image PNG fast path returns
# junk without an error for a truncated PNG, and libjpeg only warns about a truncated JPEG.
_STRICT_READS = {"GDAL_PNG_WHOLE_IMAGE_OPTIM": "NO", "GDAL_ERROR_ON_LIBJPEG_WARNING": "TRUE"}


# ------------------------------------------------------------------------------------------------ checking


def _open_error(path: Path, exc: BaseException) -> DataError:
    return DataError(f"{path}: cannot read as a raster ({gdal_cause(exc)}); check the file is a complete image")


def _info(path: Path) -> RasterInfo:
    try:
        return raster_info(path)
    except UserError:
        raise
    except (RasterioError, OSError) as exc:
        raise _open_error(path, exc) from None


def check_rasters(
    scenes: list[Scene], tile_size: int, overlap: int, bands: list[int] | None, pal: Palette | None
) -> dict[Path, RasterInfo]:
    """Header checks of every file (cheap): readable, dtypes, band counts, sizes, tile fits."""
    infos: dict[Path, RasterInfo] = {}
    first: RasterInfo | None = None
    for scene in scenes:
        for img in scene.images:
            info = infos[img] = _info(img)
            if info.dtype not in DTYPES:
                raise DataError(f"{img}: pixel type {info.dtype} is not supported; convert the images to uint8 or "
                                "uint16 (e.g. gdal_translate -ot UInt16 -scale)")
            if first is None:
                first = info
                if bands:
                    bad = [b for b in bands if not 1 <= b <= info.count]
                    if bad:
                        raise ConfigError(f"--bands {bands}: band {bad[0]} does not exist; {img} has bands 1..{info.count}")
            elif info.count != first.count:
                raise DataError(f"{img}: {info.count} bands but {first.path} has {first.count}; all images of a "
                                "dataset need the same bands")
            elif info.dtype != first.dtype:
                raise DataError(f"{img}: pixel type {info.dtype} but {first.path} is {first.dtype}; convert the "
                                "images to one type")
        a = infos[scene.image]
        if scene.image_b is not None:
            b = infos[scene.image_b]
            if (b.height, b.width) != (a.height, a.width):
                raise DataError(f"{scene.image_b}: {b.width}x{b.height} px but its pair {scene.image} is "
                                f"{a.width}x{a.height}; both dates of a change pair need the same size")
        for mask in [*scene.masks, *([scene.mask_change] if scene.mask_change else [])]:
            info = infos[mask] = _info(mask)
            if (info.height, info.width) != (a.height, a.width):
                raise DataError(f"{mask}: mask is {info.width}x{info.height} px but its image {scene.image} is "
                                f"{a.width}x{a.height}; masks must match their image pixel for pixel")
            if pal is not None and info.count < 3 and not _has_colormap(mask):
                raise DataError(f"{mask}: {info.count} band(s) without a colour table, but the palette "
                                f"{pal.path.name} decodes RGB colour masks; drop --palette for index or binary masks")
            if not np.issubdtype(np.dtype(info.dtype), np.integer):
                raise DataError(f"{mask}: mask pixel type {info.dtype}; masks must hold integer class values")
        scene.height, scene.width = a.height, a.width
    smallest = min(scenes, key=lambda s: min(s.height, s.width))
    side = min(smallest.height, smallest.width)
    if side < tile_size:
        fit = side // 32 * 32 or side
        hint = f" (and --overlap below {fit})" if overlap >= fit else ""
        raise DataError(f"{smallest.image}: image is {smallest.width}x{smallest.height} px, smaller than the tile size "
                        f"{tile_size}; use --tile-size {fit}{hint}")
    return infos



# -------------------------------------------------------------------------------------------------- reading


def _has_colormap(path: Path) -> bool:
    try:
        with rasterio.open(path) as src:
            return colormap_lut(src) is not None
    except (RasterioError, OSError) as exc:
        raise _open_error(path, exc) from None


def _blocks(height: int, width: int, block: int | None = None) -> Iterator[RioWindow]:
    block = block or _BLOCK
    for row in range(0, height, block):
        for col in range(0, width, block):
            yield RioWindow(col, row, min(block, width - col), min(block, height - row))


@dataclass
class _MaskValues:
    """Distinct raw values of one mask with their pixel counts (grey/index masks)."""

    values: np.ndarray
    counts: np.ndarray

    def as_dict(self) -> dict[int, int]:
        return {int(v): int(c) for v, c in zip(self.values, self.counts)}


@dataclass
class Scan:
    band_hist: np.ndarray  # (bands, 256 | 65536) pixel counts per value
    mask_values: dict[Path, _MaskValues] = field(default_factory=dict)  # grey/index masks
    palette_counts: dict[Path, np.ndarray] = field(default_factory=dict)  # colour masks: decoded class bincount
    unknown_colors: dict[int, int] = field(default_factory=dict)  # packed rgb -> pixels
    ignore_colors: dict[int, int] = field(default_factory=dict)  # palette "ignore" colours (packed) -> pixels
    second_mismatch: int = 0  # pixels unchanged in one date's map but not the other's


def _hist(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if values.dtype in (np.uint8, np.uint16):
        counts = np.bincount(values.ravel(), minlength=256)
        nz = np.flatnonzero(counts)
        return nz, counts[nz]
    return np.unique(values, return_counts=True)


def merge(acc: dict[int, int], values: np.ndarray, counts: np.ndarray) -> None:
    for v, c in zip(values.tolist(), counts.tolist()):
        acc[v] = acc.get(v, 0) + c


def scan(
    scenes: list[Scene], infos: dict[Path, RasterInfo], bands: list[int], dtype: str, pal: Palette | None,
    unknown_colors: str, ignore_index: int, nodata: int | None, progress: bool,
) -> Scan:
    """Read every image and mask once, block by block: band histograms, mask values, palette decoding."""
    nvalues = 256 if dtype == "uint8" else 65536
    scan = Scan(band_hist=np.zeros((len(bands), nvalues), dtype=np.int64))
    with rasterio.Env(**_STRICT_READS):
        for scene in tqdm(scenes, desc="prepare", unit="scene", disable=not progress, file=sys.stderr):
            for img in scene.images:
                for data, _win in _read_blocks(img, bands, scene):
                    for i in range(len(bands)):
                        scan.band_hist[i] += np.bincount(data[i].ravel(), minlength=nvalues)
            _scan_masks(scene, infos, pal, unknown_colors, ignore_index, scan)
            faults.point("prepare-scanning")
    if nodata is not None and 0 <= nodata < nvalues:
        scan.band_hist[:, nodata] = 0  # nodata pixels are not part of the imagery's statistics
    return scan


def _read_blocks(path: Path, bands: list[int], scene: Scene) -> Iterator[tuple[np.ndarray, RioWindow]]:
    try:
        with rasterio.open(path) as src:
            for win in _blocks(scene.height, scene.width):
                yield src.read(bands, window=win), win
    except (RasterioError, OSError) as exc:
        raise _open_error(path, exc) from None


def _scan_masks(
    scene: Scene, infos: dict[Path, RasterInfo], pal: Palette | None, unknown_colors: str, ignore_index: int,
    scan: Scan,
) -> None:
    masks = scene.masks
    acc: list[dict[int, int]] = [{} for _ in masks]
    pal_counts = [np.zeros(256, dtype=np.int64) for _ in masks]
    unknown = [0 for _ in masks]
    unknown_example: list[int | None] = [None for _ in masks]
    with ExitStack() as stack:
        srcs = []
        for m in masks:
            try:
                srcs.append(stack.enter_context(rasterio.open(m)))
            except (RasterioError, OSError) as exc:
                raise _open_error(m, exc) from None
        # Colour-table masks are expanded to RGB for the palette (as `read_mask` does at training time).
        luts = [colormap_lut(src) if pal is not None else None for src in srcs]
        ignore_keys = [int(pack_rgb(np.array(e[:3]))) for e in pal.entries if e[3] == ignore_index] if pal else []
        for win in _blocks(scene.height, scene.width):
            zero_maps = []
            for k, (mask, src) in enumerate(zip(masks, srcs)):
                count = infos[mask].count
                try:
                    data = src.read([1, 2, 3] if count >= 3 else [1], window=win)
                except (RasterioError, OSError) as exc:
                    raise _open_error(mask, exc) from None
                if pal is not None:
                    lut = luts[k]
                    rgb_all = lut[data[0]] if lut is not None else np.moveaxis(data, 0, -1)
                    classes, unk = decode_palette(rgb_all, pal.entries, ignore_index, pal.binarize)
                    pal_counts[k] += np.bincount(classes.ravel(), minlength=256)
                    if ignore_keys:
                        packed_all = pack_rgb(binarize_rgb(rgb_all, pal.binarize) if pal.binarize else rgb_all)
                        for key in ignore_keys:
                            scan.ignore_colors[key] = scan.ignore_colors.get(key, 0) + int(
                                np.count_nonzero(packed_all == key))
                    n_unk = int(unk.sum())
                    if n_unk:
                        rgb = rgb_all[unk]
                        packed = (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2]
                        vals, cnts = np.unique(packed, return_counts=True)
                        merge(scan.unknown_colors, vals, cnts)
                        unknown[k] += n_unk
                        if unknown_example[k] is None:
                            unknown_example[k] = int(vals[np.argmax(cnts)])
                    zero_maps.append(classes == 0)
                else:
                    if count >= 3 and not (np.array_equal(data[0], data[1]) and np.array_equal(data[0], data[2])):
                        raise DataError(f"{mask}: colour mask (its RGB bands differ); give --palette FILE to decode "
                                        f"colours to classes (shipped: {', '.join(shipped_palettes())})")
                    merge(acc[k], *_hist(data[0]))
                    zero_maps.append(data[0] == 0)
            if len(zero_maps) == 2 and scene.mask_b is not None:
                scan.second_mismatch += int(np.count_nonzero(zero_maps[0] != zero_maps[1]))
    for k, mask in enumerate(masks):
        if pal is not None:
            scan.palette_counts[mask] = pal_counts[k]
            if unknown[k] and unknown_colors == "error":
                r, g, b = unpack_rgb(unknown_example[k] or 0)
                raise DataError(
                    f"{mask}: {unknown[k]} pixels have colours not in the palette {pal.path.name} (e.g. ({r}, {g}, {b})); "
                    "add the colour to the palette (under \"classes\" or \"ignore\") or give --unknown-colors ignore"
                )
        else:
            items = sorted(acc[k].items())
            scan.mask_values[mask] = _MaskValues(
                np.array([v for v, _ in items], dtype=np.int64), np.array([c for _, c in items], dtype=np.int64)
            )
