"""Progress of a scene: the progress bar and, for runs watched through their log, ETA lines."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from tqdm import tqdm

# the scene's logger: these lines belong to the scene being segmented (and read as before this module)
log = logging.getLogger("rsseg.client.scene")

# log lines with the time left: once a row of windows is done and ETA_FIRST_S have passed (a scene of a
# second or two needs none), then every ETA_EVERY_S
ETA_FIRST_S, ETA_EVERY_S = 2.0, 60.0


class Progress:
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
