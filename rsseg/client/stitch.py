"""Putting window predictions back together: centre-keep strips and weighted probability blending,
and the stitchers that drive them row of windows by row of windows (the `Stitcher` interface the
request loop calls).

Both keep only what is needed for the current row of windows (plus, for blending, the rows still
overlapped by the next row of windows), so memory does not grow with the scene height.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from rsseg import heads
from rsseg.client.windows import PlannedWindow, blend_weights, on_scene_edges
from rsseg.spec import OutputGroup

NODATA = 255  # class value of nodata pixels in the output map


def class_maps_from_probabilities(probabilities: np.ndarray, groups: Sequence[OutputGroup]) -> np.ndarray:
    """[N, K, H, W] per-group probabilities (or logits) -> [N, G, H, W] uint8 class maps (the served
    postprocess's own definition, rsseg/heads.py)."""
    return heads.class_maps(probabilities, [(g.name, g.channels) for g in groups])


class CentreStrip:
    """The output rows of one row of centre-keep windows: [G, h, W] class maps plus a validity mask and,
    when `channels` > 0, the [K, h, W] probabilities kept as float16 (what the server sends)."""

    def __init__(self, windows: Sequence[PlannedWindow], heads: int, width: int, channels: int = 0) -> None:
        self.row = windows[0].out.row
        height = windows[0].out.height
        self.maps = np.full((heads, height, width), NODATA, dtype=np.uint8)
        self.valid = np.zeros((height, width), dtype=bool)
        self.probabilities = np.full((channels, height, width), np.nan, dtype=np.float16) if channels else None

    def set_valid(self, window: PlannedWindow, valid: np.ndarray) -> None:
        """`valid`: the window's [size, size] validity; its kept part is copied."""
        k, o = window.keep, window.out
        self.valid[:, o.col:o.col + o.width] = valid[k.row:k.row + k.height, k.col:k.col + k.width]

    def put(self, window: PlannedWindow, maps: np.ndarray, probabilities: np.ndarray | None = None) -> None:
        """`maps`: the window's [G, size, size] class maps (and [K, size, size] probabilities); their kept
        part goes into the strip."""
        k, o = window.keep, window.out
        self.maps[:, :, o.col:o.col + o.width] = maps[:, k.row:k.row + k.height, k.col:k.col + k.width]
        if self.probabilities is not None and probabilities is not None:
            self.probabilities[:, :, o.col:o.col + o.width] = \
                probabilities[:, k.row:k.row + k.height, k.col:k.col + k.width]

    def finish(self) -> np.ndarray:
        """The strip's class maps with nodata pixels set to NODATA."""
        # copyto(where=) rather than boolean indexing: ~5x faster, which counts on sparse giant scenes
        np.copyto(self.maps, NODATA, where=~self.valid[None])
        return self.maps

    def finish_probabilities(self) -> np.ndarray:
        """The strip's probabilities as float32 with NaN where there is no data (call after finish)."""
        out = self.probabilities.astype(np.float32)
        out[:, ~self.valid] = np.nan
        return out


class BlendBand:
    """Weighted sums of window probabilities over the scene rows that are still open.

    Windows of one layout row are added, then `pop_until(next_row_start)` returns the rows no later
    window touches (normalised by the summed weights, argmaxed per group, nodata applied) and drops them.
    Weights taper only towards neighbouring windows: on the scene edge a window is the only
    (and best-informed) prediction, so it keeps full weight there.
    """

    def __init__(self, groups: Sequence[OutputGroup], width: int, tile: int, margin: int,
                 last_grid_row: int, last_grid_col: int) -> None:
        self.groups = list(groups)
        self.channels = sum(g.channels for g in groups)
        self.width = width
        self.tile = tile
        self.margin = margin
        self.last = (last_grid_row, last_grid_col)
        self._weights: dict[tuple[bool, ...], np.ndarray] = {}  # by edge flags: at most 9 distinct
        self.top = 0  # scene row of acc[:, 0]
        self.acc = np.zeros((self.channels, 0, width), dtype=np.float32)
        self.weight = np.zeros((0, width), dtype=np.float32)
        self.valid = np.zeros((0, width), dtype=bool)

    def _grow(self, bottom: int) -> None:
        extra = bottom - (self.top + self.acc.shape[1])
        if extra > 0:
            self.acc = np.concatenate([self.acc, np.zeros((self.channels, extra, self.width), np.float32)], axis=1)
            self.weight = np.concatenate([self.weight, np.zeros((extra, self.width), np.float32)])
            self.valid = np.concatenate([self.valid, np.zeros((extra, self.width), bool)])

    def weights_for(self, window: PlannedWindow) -> np.ndarray:
        edges = on_scene_edges(window, *self.last)
        key = tuple(edges.values())
        if key not in self._weights:
            self._weights[key] = blend_weights(self.tile, self.margin, **edges)
        return self._weights[key]

    def set_valid(self, window: PlannedWindow, valid: np.ndarray) -> None:
        o = window.out
        self._grow(o.row + o.height)
        r0 = o.row - self.top
        self.valid[r0:r0 + o.height, o.col:o.col + o.width] = valid[:o.height, :o.width]

    def add(self, window: PlannedWindow, probabilities: np.ndarray) -> None:
        """`probabilities`: the window's [K, size, size]; its in-scene part is accumulated."""
        o = window.out
        if o.row < self.top:
            raise ValueError(f"window at row {o.row} adds to rows already written (up to {self.top})")
        self._grow(o.row + o.height)
        w = self.weights_for(window)[:o.height, :o.width]
        r0 = o.row - self.top
        self.acc[:, r0:r0 + o.height, o.col:o.col + o.width] += probabilities[:, :o.height, :o.width] * w
        self.weight[r0:r0 + o.height, o.col:o.col + o.width] += w

    def pop_until(self, row: int) -> tuple[int, np.ndarray, np.ndarray] | None:
        """The open rows above `row`: (their first row, class maps [G, h, W], blended probabilities
        [K, h, W] float32, NaN where there is no data), or None if there are none."""
        n = min(row - self.top, self.acc.shape[1])
        if n <= 0:
            return None
        weight = self.weight[:n]
        covered = weight > 0  # 0 only where every window was skipped as nodata
        probs = self.acc[:, :n] / np.where(covered, weight, 1.0)
        maps = class_maps_from_probabilities(probs[None], self.groups)[0]
        missing = ~(covered & self.valid[:n])
        maps[:, missing] = NODATA
        probs[:, missing] = np.nan
        top = self.top
        self.acc, self.weight, self.valid = self.acc[:, n:], self.weight[n:], self.valid[n:]
        self.top += n
        return top, maps, probs


# ------------------------------------------------------------------------------------------------ stitchers


class RowSink(Protocol):
    """Where finished rows go (the scene's writers). `probabilities` is called only when they are
    written, so a strip converts them only when asked for."""

    def write(self, row: int, maps: np.ndarray, probabilities: Callable[[], np.ndarray]) -> None: ...


class Stitcher(ABC):
    """What the request loop drives: rows of windows are started and read in order, each window's
    validity is set as it is read, predictions are put as they arrive (any order within the open rows),
    and row `i` is finished once it is fully read and its last prediction is in, rows in order."""

    def start_row(self, i: int, row: list[PlannedWindow]) -> None:
        """Row of windows `i` is about to be read (nothing to prepare by default)."""

    @abstractmethod
    def set_valid(self, w: PlannedWindow, valid: np.ndarray) -> None:
        """The window's [size, size] validity, for the pixels it contributes."""

    @abstractmethod
    def skip(self, w: PlannedWindow, valid: np.ndarray) -> bool:
        """True when no pixel the window contributes is valid: predict is not called for it."""

    @abstractmethod
    def put(self, w: PlannedWindow, maps: np.ndarray | None, probabilities: np.ndarray | None) -> None:
        """The window's prediction: [G, size, size] class maps and/or [K, size, size] probabilities."""

    @abstractmethod
    def finish_row(self, i: int) -> None:
        """Row of windows `i` is complete: write what no later window changes."""


class CentreStitcher(Stitcher):
    """Centre-keep: one CentreStrip per row of windows, written when the row's last result arrives."""

    def __init__(self, output: RowSink, heads: int, width: int, channels: int) -> None:
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


class BlendStitcher(Stitcher):
    """Blending: one BlendBand over the open rows; when a row of windows is complete, the rows above the
    next row of windows get no more contributions and are written."""

    def __init__(self, output: RowSink, band: BlendBand, row_starts: list[int], height: int) -> None:
        self.output, self.band = output, band
        self.next_start = row_starts[1:] + [height]

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
