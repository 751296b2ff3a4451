"""Segmenting a whole scene window by window with any `predict` (ONNX Runtime, Triton, a test stub).

The scene is read with rasterio one window at a time (never whole), predictions are stitched row of
windows by row of windows and finished rows are written as they complete, so memory is bounded by the
one or two rows of windows in flight (plus, when blending, the probability sums of the open rows).

Two modes (see rsseg.client.windows for the geometry):

- "centre": windows at stride tile - 2*margin, each keeps its centre. With margin >= the model's
  receptive field the stitched map equals a whole-image pass exactly. `predict` returns class maps.
- "blend": windows at stride tile - margin, probabilities blended with smooth weights, then argmax.
  `predict` must return probabilities (softmax per output group, as Triton's PROBABILITIES).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import MaskFlags
from rasterio.errors import RasterioIOError
from rasterio.windows import Window as RioWindow
from tqdm import tqdm

from rsseg.client.memory import peak_rss_mb
from rsseg.client.stitch import NODATA, BlendBand, CentreStrip
from rsseg.client.windows import (
    PlannedWindow,
    choose_tile_size,
    plan_blend_windows,
    plan_windows,
    reflect_index,
)
from rsseg.client.writer import (
    ClassMapWriter,
    ProbabilityWriter,
    head_classes,
    write_preview,
    write_summary,
)
from rsseg.data.raster import gdal_cause
from rsseg.errors import ConfigError, DataError
from rsseg.spec import ModelSpec

log = logging.getLogger(__name__)

MODES = ("centre", "blend")
MAX_OPEN_ROWS = 2  # rows of windows read but not yet written, beyond which reading waits for results
# log lines with the time left: once a row of windows is done and ETA_FIRST_S have passed (a scene of a
# second or two needs none), then every ETA_EVERY_S
ETA_FIRST_S, ETA_EVERY_S = 2.0, 60.0
# predict(tiles [N, H, W, C] raw, the spec's dtype) -> class maps [N, G, H, W] (centre) or probabilities
# [N, K, H, W] (blend); a tuple is read as (class_maps, probabilities), like infer_tiles' answer.
Predict = Callable[[np.ndarray], "np.ndarray | tuple[np.ndarray, ...]"]


@dataclass
class SceneSummary:
    """What segment_scene did: geometry, class pixel counts and areas per output head, timings."""

    src: str
    out: str
    model_name: str | None
    model_version: str | None
    mode: str
    tile: int
    margin: int
    stride: int
    batch: int
    height: int
    width: int
    crs: str | None
    transform: list[float]
    pixel_area: float  # in area_unit (CRS units squared, from the transform)
    area_unit: str
    heads: dict[str, dict[str, Any]]  # head -> classes, pixels {class: n}, area {class: a}, nodata_pixels
    windows: int
    windows_predicted: int
    windows_skipped: int  # all nodata: predict was not called for them
    windows_unread: int  # of those, windows over blocks absent from the file (sparse): not even read
    predict_calls: int
    # read_s, predict_s (summed over calls: exceeds wall time when in_flight > 1), write_s (compression,
    # overviews), total_s (wall, preview and summary included)
    timings: dict[str, float] = field(default_factory=dict)
    probabilities: str | None = None  # the fp16 probability GeoTIFF, when asked for
    inputs: list[str] = field(default_factory=list)  # absolute paths of the input file(s)
    preview: str | None = None
    summary: str | None = None
    peak_rss_mb: float = 0.0  # this client process's peak resident memory when the scene was done

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_margin(tile: int, stride: int, mode: str = "centre") -> int:
    """Centre: tile/8 rounded to a multiple of the stride (at least one stride while the tile allows).
    Blend: twice that, the overlap, capped at tile/2: the same number of windows and, at the blending
    switch-over, about the same context as centre mode."""
    cap = (tile - stride) // 2 // stride * stride
    centre = min(max(stride, stride * round(tile / 8 / stride)), max(cap, 0))
    if mode == "centre":
        return centre
    return min(2 * centre, tile // 2 // stride * stride)


def segment_scene(
    src_path: str | Path,
    out_path: str | Path,
    predict: Predict,
    spec: ModelSpec,
    *,
    mode: str = "centre",
    margin: int | None = None,
    tile: int | None = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    batch: int = 4,
    progress: bool = True,
    in_flight: int = 1,
    summary_path: str | Path | None = None,
    preview_path: str | Path | None = None,
    probabilities_path: str | Path | None = None,
    inputs: Sequence[str | Path] | None = None,
) -> SceneSummary:
    """Segment the raster at `src_path` into a class-map GeoTIFF at `out_path`.

    Args:
        predict: raw tiles [N, tile, tile, C] (the spec's dtype, C = len(bands)) -> in "centre" mode
            class maps [N, G, tile, tile] (integers < 255), in "blend" mode probabilities [N, K, tile,
            tile] (float, softmax per output group, K = spec.num_output_channels). A returned tuple is
            read as (class_maps, probabilities). N <= batch. Never called for windows with no valid pixel.
        spec: the model's spec (bands, dtype, nodata, classes/colours, tile sizes, stride, outputs).
        mode: "centre" (exact stitching) or "blend" (probability blending); see the module docstring.
        margin: centre: pixels dropped on each inner window side; blend: the overlap of neighbours.
            Default: `default_margin`. Must keep window starts on the stride grid.
        tile: window size, a multiple of spec.stride; default choose_tile_size over spec.tile_sizes (one
            window for a scene that fits one of them).
        bands: 1-based bands of the file, in model order; default spec.dataset.bands.
        nodata: input value marking missing pixels (all bands equal to it); default the file's nodata,
            else spec.dataset.nodata. Pixels masked by the file's dataset mask / alpha are missing too.
            Missing pixels are 255 in the output.
        batch: windows per predict call.
        progress: show a progress bar (stderr).
        in_flight: predict calls allowed to run at once (threads; they run on across rows); 1 calls
            predict in this thread. `predict` must be thread-safe when > 1.
        summary_path / preview_path: also write the JSON summary / a colour PNG preview there.
        probabilities_path: also write per-class probabilities there (ProbabilityWriter: fp16, NaN for
            nodata). Centre mode: `predict` must then return (class_maps, probabilities); blend mode
            writes the blended probabilities. Costs K x 2 bytes per pixel of a row of windows in memory.
        inputs: the files the scene was made of, for the summary (default `src_path`; a change pair's
            two dates when `src_path` is their stacked VRT).

    Returns the SceneSummary. Outputs are written under temp names and renamed when complete: on any
    error (a failing predict included) no file is left at `out_path` (or `probabilities_path`).
    """
    start = time.perf_counter()
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if batch < 1 or in_flight < 1:
        raise ConfigError(f"batch and in_flight must be >= 1, got batch={batch}, in_flight={in_flight}")
    src_path, out_path = Path(src_path), Path(out_path)
    try:
        src = rasterio.open(src_path)
    except RasterioIOError as exc:
        raise DataError(f"{src_path}: cannot read as a raster ({gdal_cause(exc)})") from None
    with src:
        band_list = _check_bands(src, spec, bands)
        height, width, stride = src.height, src.width, int(spec.stride)
        tile = int(tile or choose_tile_size(height, width, spec.tile_sizes, stride))
        if tile % stride:
            raise ConfigError(f"tile {tile} is not a multiple of the model stride {stride}")
        margin = default_margin(tile, stride, mode) if margin is None else int(margin)
        _check_margin(tile, margin, stride, mode)
        if nodata is None:
            nodata = src.nodata if src.nodata is not None else spec.dataset.nodata
        plan = (plan_windows if mode == "centre" else plan_blend_windows)(height, width, tile, margin, stride)
        reader = _WindowReader(src, band_list, nodata, plan)
        run = _Run(predict, spec, tile, in_flight, mode, probabilities_path is not None)
        to_read = len(plan) - len(reader.empty)
        log.info("segmenting %s: %dx%d pixels (%.1f MPix), bands %s, %s mode, tile %d, margin %d: %d windows "
                 "to read of %d (%d over blocks the file leaves empty)", src_path, width, height,
                 width * height / 1e6, band_list, mode, tile, margin, to_read, len(plan), len(reader.empty))
        bar = _Progress(src_path, len(plan), progress)
        try:
            geo = dict(height=height, width=width, crs=src.crs, transform=src.transform, spec=spec)
            probability_file = ProbabilityWriter(probabilities_path, **geo) if probabilities_path else nullcontext()
            with ClassMapWriter(out_path, **geo) as writer, probability_file as prob_writer:
                output = _Output(writer, prob_writer, bar)
                rows = _rows(plan)
                if mode == "centre":
                    channels = spec.num_output_channels if probabilities_path else 0
                    stitcher = _CentreStitcher(output, writer.heads, width, channels)
                else:
                    band = BlendBand(spec.outputs, width, tile, margin, len(rows) - 1, len(rows[0]) - 1)
                    stitcher = _BlendStitcher(output, band, [r[0].row for r in rows], height)
                _stream(rows, reader, run, batch, bar, stitcher)
        finally:
            run.close()
            bar.close()
        crs, transform = src.crs, src.transform
    write_s = writer.seconds + (prob_writer.seconds if prob_writer else 0.0)
    timings = {"read_s": reader.seconds, "predict_s": run.seconds, "write_s": write_s, "total_s": 0.0}
    pixel_area = abs(transform.a * transform.e - transform.b * transform.d)  # rotated/sheared too
    summary = SceneSummary(
        src=str(src_path), out=str(out_path), model_name=spec.model_name, model_version=spec.model_version,
        mode=mode, tile=tile, margin=margin, stride=stride, batch=batch, height=height, width=width,
        crs=crs.to_string() if crs else None, transform=list(transform)[:6],
        pixel_area=pixel_area, area_unit=f"{_linear_unit(crs)}^2",
        heads=_head_counts(writer.counts, spec, pixel_area),
        windows=len(plan), windows_predicted=run.windows, windows_skipped=len(plan) - run.windows,
        windows_unread=len(reader.empty), predict_calls=run.calls, timings=timings,
        probabilities=str(probabilities_path) if probabilities_path else None,
        inputs=[os.path.abspath(p) for p in (inputs or [src_path])],
    )
    if preview_path is not None:
        summary.preview = str(write_preview(preview_path, out_path, spec))
    summary.timings["total_s"] = time.perf_counter() - start
    summary.peak_rss_mb = peak_rss_mb()
    if summary_path is not None:
        summary.summary = str(summary_path)
        write_summary(summary_path, summary.to_dict())
    log.info("segmented %s -> %s in %.1f s (%d windows, %d skipped as nodata, %d predict calls)", src_path,
             out_path, summary.timings["total_s"], len(plan), summary.windows_skipped, run.calls)
    return summary


# ------------------------------------------------------------------------------------------------ checks


def _check_bands(src: Any, spec: ModelSpec, bands: Sequence[int] | None) -> list[int]:
    band_list = [int(b) for b in (bands or spec.dataset.bands)]
    bad = [b for b in band_list if not 1 <= b <= src.count]
    if bad:
        raise ConfigError(f"{src.name}: band(s) {bad} do not exist; the file has bands 1..{src.count}")
    if len(band_list) != spec.in_channels:
        raise ConfigError(f"{src.name}: {len(band_list)} bands {band_list} selected but the model takes "
                          f"{spec.in_channels} channels; pass bands= (change models: both dates' bands, stacked in "
                          "one file)")
    dtypes = {src.dtypes[b - 1] for b in band_list}
    if dtypes != {spec.dataset.dtype}:
        raise DataError(f"{src.name}: bands {band_list} are {', '.join(sorted(dtypes))} but the model takes "
                        f"{spec.dataset.dtype}; convert the scene (e.g. gdal_translate -ot) to what it was "
                        "trained on")
    return band_list


def _check_margin(tile: int, margin: int, stride: int, mode: str) -> None:
    if mode == "centre":
        if margin < 0 or tile - 2 * margin < stride or (2 * margin) % stride:
            raise ConfigError(f"centre margin {margin} for tile {tile}: need 0 <= 2*margin <= tile - {stride} "
                              f"with 2*margin a multiple of the stride {stride} (windows must start on its grid)")
    elif margin < 0 or 2 * margin > tile or margin % stride:
        raise ConfigError(f"blend margin {margin} for tile {tile}: need a multiple of the stride {stride} "
                          "in [0, tile/2]")


def _linear_unit(crs: Any) -> str:
    """The unit of the CRS axes ("metre", "US survey foot", "degree" for geographic CRSs)."""
    if crs is None:
        return "pixel"
    try:
        return crs.units_factor[0] or "unknown"
    except Exception:  # noqa: BLE001 - a CRS without units (engineering, custom WKT): say so, do not fail
        return "unknown"


def _head_counts(counts: np.ndarray, spec: ModelSpec, area: float) -> dict[str, dict[str, Any]]:
    heads = {}
    for i, group in enumerate(spec.outputs):
        names = head_classes(spec, i)
        pixels = {name: int(counts[i, k]) for k, name in enumerate(names)}
        heads[group.name] = {
            "classes": names,
            "pixels": pixels,
            "area": {name: n * area for name, n in pixels.items()},
            "nodata_pixels": int(counts[i, NODATA]),
            # classes predict should never return (0 unless it misbehaves)
            "other_pixels": int(counts[i].sum() - sum(pixels.values()) - counts[i, NODATA]),
        }
    return heads


# ------------------------------------------------------------------------------------------------ reading


class _WindowReader:
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


def _rows(plan: list[PlannedWindow]) -> list[list[PlannedWindow]]:
    rows: dict[int, list[PlannedWindow]] = {}
    for w in plan:
        rows.setdefault(w.grid_row, []).append(w)
    return [rows[i] for i in sorted(rows)]


# ------------------------------------------------------------------------------------------------ predict


class _Run:
    """Calls predict on batches, at most `in_flight` at once, checks what comes back and delivers each
    window's (class maps, probabilities) to its callback in submission order, on the caller's thread."""

    def __init__(self, predict: Predict, spec: ModelSpec, tile: int, in_flight: int, mode: str,
                 probabilities: bool) -> None:
        self.predict, self.tile, self.mode, self.in_flight = predict, tile, mode, in_flight
        self.heads, self.channels = len(spec.outputs), spec.num_output_channels
        self.want_maps, self.want_probabilities = mode == "centre", mode == "blend" or probabilities
        self.pool = ThreadPoolExecutor(in_flight, thread_name_prefix="rsseg-predict") if in_flight > 1 else None
        self.pending: deque[tuple[Future, list[PlannedWindow], Callable]] = deque()
        self.lock = threading.Lock()
        self.seconds = 0.0
        self.calls = 0
        self.windows = 0

    def _call(self, tiles: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        t0 = time.perf_counter()
        result = self.predict(tiles)
        with self.lock:
            self.seconds += time.perf_counter() - t0
            self.calls += 1
        return self._check(result, len(tiles))

    def _check(self, result: Any, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        if isinstance(result, tuple):
            maps, probs = (result + (None,))[:2]
        elif self.want_maps:
            maps, probs = result, None
        else:
            maps, probs = None, result
        if self.want_maps:
            maps = np.asarray(maps)
            if maps.shape != (n, self.heads, self.tile, self.tile):
                raise DataError(f"predict returned class maps of shape {maps.shape}; expected "
                                f"{(n, self.heads, self.tile, self.tile)}")
            if not np.issubdtype(maps.dtype, np.integer):
                raise DataError(f"centre mode: predict returned {maps.dtype}; it must return integer class maps "
                                "(use mode='blend' for probabilities)")
            maps = maps.astype(np.uint8, copy=False)
        if self.want_probabilities:
            if probs is None:
                raise DataError("predict must return probabilities (in centre mode with probabilities: a "
                                "(class_maps, probabilities) tuple)")
            probs = np.asarray(probs)
            if probs.shape != (n, self.channels, self.tile, self.tile):
                raise DataError(f"predict returned probabilities of shape {probs.shape}; expected "
                                f"{(n, self.channels, self.tile, self.tile)}")
            if not np.issubdtype(probs.dtype, np.floating):
                raise DataError(f"predict returned {probs.dtype} probabilities; they must be floats")
        return (maps if self.want_maps else None), (probs if self.want_probabilities else None)

    def submit(self, windows: list[PlannedWindow], tiles: list[np.ndarray],
               done: Callable[[PlannedWindow, np.ndarray | None, np.ndarray | None], None]) -> None:
        if not windows:
            return
        self.windows += len(windows)
        batch = np.stack(tiles)
        if self.pool is None:
            self._deliver(windows, self._call(batch), done)
            return
        while len(self.pending) >= self.in_flight:
            self._collect_oldest()
        self.pending.append((self.pool.submit(self._call, batch), windows, done))

    def _collect_oldest(self) -> None:
        future, windows, done = self.pending.popleft()
        self._deliver(windows, future.result(), done)

    @staticmethod
    def _deliver(windows: list[PlannedWindow], out: tuple[np.ndarray | None, np.ndarray | None],
                 done: Callable) -> None:
        maps, probs = out
        for i, w in enumerate(windows):
            done(w, None if maps is None else maps[i], None if probs is None else probs[i])

    def drain(self) -> None:
        while self.pending:
            self._collect_oldest()

    def collect(self, wait: bool) -> None:
        """Deliver the requests that are done, oldest first; with `wait`, at least the oldest one."""
        if wait and self.pending:
            self._collect_oldest()
        while self.pending and self.pending[0][0].done():
            self._collect_oldest()

    def close(self) -> None:
        if self.pool is not None:
            for future, _, _ in self.pending:
                future.cancel()
            self.pending.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ stitching


class _Progress:
    """The progress bar (windows, MPix/s) and, for runs watched through their log, lines with the rate so
    far and the time left (ETA_FIRST_S, ETA_EVERY_S)."""

    def __init__(self, name: str | Path, total: int, enabled: bool) -> None:
        self.bar = tqdm(total=total, desc="segment", unit="tile", disable=not enabled, file=sys.stderr)
        self.name, self.total = name, total
        self.read = 0  # windows read from the file (not those over absent blocks)
        self.start = time.perf_counter()
        self.logged: float | None = None

    def update(self, read: bool) -> None:
        self.read += read
        self.bar.update(1)

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.bar.set_postfix_str(text, refresh=refresh)

    def row_finished(self, rows_left: int, windows_done: int) -> None:
        """A row of windows is stitched and written: `windows_done` windows are behind us for good (the
        windows merely read or sent would give too high a rate while the first requests are in flight)."""
        now = time.perf_counter()
        wait, since = (ETA_FIRST_S, self.start) if self.logged is None else (ETA_EVERY_S, self.logged)
        if not rows_left or now - since < wait:
            return
        self.logged = now
        rate = windows_done / max(now - self.start, 1e-9)
        log.info("%s: %d of %d windows done in %.0f s (%.1f windows/s, %d read so far); ETA %s", self.name,
                 windows_done, self.total, now - self.start, rate, self.read,
                 _duration((self.total - windows_done) / rate))

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


class _Output:
    """Where finished rows go: the class-map writer, the probability writer if any, the progress bar."""

    def __init__(self, maps: ClassMapWriter, probabilities: ProbabilityWriter | None, bar: _Progress) -> None:
        self.maps, self.probabilities, self.bar = maps, probabilities, bar
        self.start = time.perf_counter()
        self.pixels = 0

    def write(self, row: int, maps: np.ndarray, probabilities: Callable[[], np.ndarray]) -> None:
        self.maps.write_rows(row, maps)
        if self.probabilities is not None:
            self.probabilities.write_rows(row, probabilities())
        self.pixels += maps.shape[1] * maps.shape[2]
        elapsed = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"{self.pixels / 1e6 / max(elapsed, 1e-9):.2f} MPix/s", refresh=False)


class _CentreStitcher:
    """Centre-keep: one CentreStrip per row of windows, written when the row's last result arrives."""

    def __init__(self, output: _Output, heads: int, width: int, channels: int) -> None:
        self.output, self.heads, self.width, self.channels = output, heads, width, channels
        self.strips: dict[int, CentreStrip] = {}

    def start_row(self, i: int, row: list[PlannedWindow]) -> None:
        self.strips[i] = CentreStrip(row, self.heads, self.width, self.channels)

    def set_valid(self, w: PlannedWindow, valid: np.ndarray) -> None:
        self.strips[w.grid_row].set_valid(w, valid)

    @staticmethod
    def skip(w: PlannedWindow, valid: np.ndarray) -> bool:
        k = w.keep
        return not valid[k.row:k.row + k.height, k.col:k.col + k.width].any()

    def put(self, w: PlannedWindow, maps: np.ndarray | None, probabilities: np.ndarray | None) -> None:
        self.strips[w.grid_row].put(w, maps, probabilities)

    def finish_row(self, i: int) -> None:
        strip = self.strips.pop(i)
        self.output.write(strip.row, strip.finish(), strip.finish_probabilities)


class _BlendStitcher:
    """Blending: one BlendBand over the open rows; when a row of windows is complete, the rows above the
    next row of windows get no more contributions and are written."""

    def __init__(self, output: _Output, band: BlendBand, row_starts: list[int], height: int) -> None:
        self.output, self.band = output, band
        self.next_start = row_starts[1:] + [height]

    def start_row(self, i: int, row: list[PlannedWindow]) -> None:
        pass

    def set_valid(self, w: PlannedWindow, valid: np.ndarray) -> None:
        self.band.set_valid(w, valid)

    @staticmethod
    def skip(w: PlannedWindow, valid: np.ndarray) -> bool:
        return not valid[:w.out.height, :w.out.width].any()

    def put(self, w: PlannedWindow, maps: np.ndarray | None, probabilities: np.ndarray | None) -> None:
        self.band.add(w, probabilities)

    def finish_row(self, i: int) -> None:
        popped = self.band.pop_until(self.next_start[i])
        if popped is not None:
            top, maps, probabilities = popped
            self.output.write(top, maps, lambda: probabilities)


def _stream(rows: list[list[PlannedWindow]], reader: _WindowReader, run: _Run, batch: int, bar: _Progress,
            stitcher: _CentreStitcher | _BlendStitcher) -> None:
    """Read windows row after row and send those with valid pixels to predict in batches. Batches run
    across row boundaries, so requests keep flowing while a row is finished; a row is finished (stitched
    and written) as soon as it is fully read and its last result has arrived, rows in order. Memory:
    the rows between the oldest request in flight and the window being read (one or two rows; never
    more than MAX_OPEN_ROWS + 1, however sparse the data)."""
    outstanding = [0] * len(rows)
    read = 0  # rows fully read
    finished = windows_done = 0

    def finish_ready() -> None:
        nonlocal finished, windows_done
        while finished < read and outstanding[finished] == 0:
            stitcher.finish_row(finished)
            windows_done += len(rows[finished])
            finished += 1
            bar.row_finished(len(rows) - finished, windows_done)

    def done(w: PlannedWindow, maps: np.ndarray | None, probabilities: np.ndarray | None) -> None:
        stitcher.put(w, maps, probabilities)
        outstanding[w.grid_row] -= 1
        finish_ready()

    windows: list[PlannedWindow] = []
    tiles: list[np.ndarray] = []
    for i, row in enumerate(rows):
        stitcher.start_row(i, row)
        for w in row:
            tile, valid = reader.read(w)
            stitcher.set_valid(w, valid)
            if tile is not None and not stitcher.skip(w, valid):
                windows.append(w)
                tiles.append(tile)
                outstanding[i] += 1
            if len(windows) == batch:
                run.submit(windows, tiles, done)
                windows, tiles = [], []
            bar.update((w.grid_row, w.grid_col) not in reader.empty)
        if windows and windows[0].grid_row < i:
            # A part-filled batch from an earlier row (sparse data) holds that row and every row read
            # since in memory: send it rather than wait for it to fill.
            run.submit(windows, tiles, done)
            windows, tiles = [], []
        read = i + 1
        finish_ready()  # rows whose windows were all skipped, or all delivered already
        # Rows wait for their last result: collect what has come back, and when more than MAX_OPEN_ROWS
        # rows wait (a batch in flight while many empty rows go by), wait for it.
        run.collect(wait=False)
        while read - finished > MAX_OPEN_ROWS and run.pending:
            run.collect(wait=True)
    run.submit(windows, tiles, done)
    run.drain()
    finish_ready()
    if finished != len(rows):
        raise RuntimeError(f"{len(rows) - finished} rows of windows were never finished")
