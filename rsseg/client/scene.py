"""Segmenting a whole scene window by window with any `predict` (ONNX Runtime, Triton, a test stub).

The scene is read with rasterio one window at a time (never whole), predictions are stitched row of
windows by row of windows and finished rows are written as they complete, so memory is bounded by the
one or two rows of windows in flight (plus, when blending, the probability sums of the open rows).

This module puts the pieces together and reports: the modes ("centre", "blend") are in
rsseg.client.modes, reading in rsseg.client.reader, the request loop in rsseg.client.request_loop,
stitching in rsseg.client.stitch, writing in rsseg.client.writer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.errors import RasterioIOError

from rsseg.client.memory import peak_rss_mb
from rsseg.client.modes import MODES
from rsseg.client.progress import Progress
from rsseg.client.reader import WindowReader
from rsseg.client.request_loop import Predict, Requests, stream
from rsseg.client.stitch import NODATA
from rsseg.client.windows import PlannedWindow, choose_tile_size
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
        mode: "centre" (exact stitching) or "blend" (probability blending); see rsseg.client.modes.
        margin: centre: pixels dropped on each inner window side; blend: the overlap of neighbours.
            Default: the mode's `default_margin`. Must keep window starts on the stride grid.
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
    scene_mode = MODES[mode]
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
        margin = scene_mode.default_margin(tile, stride) if margin is None else int(margin)
        scene_mode.check_margin(tile, margin, stride)
        if nodata is None:
            nodata = src.nodata if src.nodata is not None else spec.dataset.nodata
        plan = scene_mode.plan(height, width, tile, margin, stride)
        reader = WindowReader(src, band_list, nodata, plan)
        run = Requests(predict, spec, tile, in_flight, scene_mode.outputs(probabilities_path is not None))
        to_read = len(plan) - len(reader.empty)
        log.info("segmenting %s: %dx%d pixels (%.1f MPix), bands %s, %s mode, tile %d, margin %d: %d windows "
                 "to read of %d (%d over blocks the file leaves empty)", src_path, width, height,
                 width * height / 1e6, band_list, mode, tile, margin, to_read, len(plan), len(reader.empty))
        bar = Progress(src_path, len(plan), progress)
        try:
            geo = dict(height=height, width=width, crs=src.crs, transform=src.transform, spec=spec)
            probability_file = ProbabilityWriter(probabilities_path, **geo) if probabilities_path else nullcontext()
            with ClassMapWriter(out_path, **geo) as writer, probability_file as prob_writer:
                output = _Output(writer, prob_writer, bar)
                rows = _rows(plan)
                stitcher = scene_mode.stitcher(output, rows, spec, width=width, height=height, tile=tile,
                                               margin=margin, probabilities=probabilities_path is not None)
                stream(rows, reader, run, batch, bar, stitcher)
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


def _rows(plan: list[PlannedWindow]) -> list[list[PlannedWindow]]:
    rows: dict[int, list[PlannedWindow]] = {}
    for w in plan:
        rows.setdefault(w.grid_row, []).append(w)
    return [rows[i] for i in sorted(rows)]


# ------------------------------------------------------------------------------------------------ writing


class _Output:
    """Where finished rows go: the class-map writer, the probability writer if any, the progress bar."""

    def __init__(self, maps: ClassMapWriter, probabilities: ProbabilityWriter | None, bar: Progress) -> None:
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
