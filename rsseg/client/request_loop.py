"""The request loop: windows read row after row, sent to `predict` in batches with up to `in_flight`
requests at once, their answers checked and handed to the stitcher, finished rows written in order and
the progress bar moved on as windows go by."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from rsseg import contract
from rsseg.client.progress import Progress
from rsseg.client.reader import WindowReader
from rsseg.client.stitch import Stitcher
from rsseg.client.windows import PlannedWindow
from rsseg.errors import DataError
from rsseg.spec import ModelSpec

MAX_OPEN_ROWS = 2  # rows of windows read but not yet written, beyond which reading waits for results
# predict(tiles [N, H, W, C] raw, the spec's dtype) -> class maps [N, G, H, W] (centre) or probabilities
# [N, K, H, W] (blend); a tuple is read as (class_maps, probabilities), like infer_tiles' answer.
Predict = Callable[[np.ndarray], "np.ndarray | tuple[np.ndarray, ...]"]


class Requests:
    """Calls predict on batches, at most `in_flight` at once, checks what comes back and delivers each
    window's (class maps, probabilities) to its callback in submission order, on the caller's thread."""

    def __init__(self, predict: Predict, spec: ModelSpec, tile: int, in_flight: int, outputs: tuple[str, ...]) -> None:
        self.predict, self.tile, self.in_flight = predict, tile, in_flight
        self.heads, self.channels = len(spec.outputs), spec.num_output_channels
        # what predict answers with: the served outputs the mode asks for (Mode.outputs)
        self.want_maps, self.want_probabilities = contract.CLASS_MAP in outputs, contract.PROBABILITIES in outputs
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


def stream(rows: list[list[PlannedWindow]], reader: WindowReader, run: Requests, batch: int, bar: Progress,
           stitcher: Stitcher) -> None:
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
