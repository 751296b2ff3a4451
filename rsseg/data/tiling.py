"""Window geometry over a scene. Pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    row: int
    col: int
    height: int
    width: int


def tile_starts(length: int, size: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `size` covering [0, length) with at least `overlap` pixels shared.

    The last tile is shifted back to end exactly at the edge, so every tile is full-size and no pixel
    is left out (the seeds cut the same way). Requires length >= size.
    """
    if size <= 0:
        raise ValueError(f"tile size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"overlap must be in [0, tile size), got {overlap} for size {size}")
    if length < size:
        raise ValueError(f"length {length} is smaller than tile size {size}")
    stride = size - overlap
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def grid_windows(height: int, width: int, size: int, overlap: int) -> Iterator[Window]:
    """Full-size square windows covering a height x width scene, row-major."""
    for row in tile_starts(height, size, overlap):
        for col in tile_starts(width, size, overlap):
            yield Window(row, col, size, size)
