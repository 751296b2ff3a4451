"""Window geometry: tiles cover a scene edge to edge, full-size, with at least the asked overlap."""

from __future__ import annotations

import pytest

from rsseg.data.tiling import Window, grid_windows, tile_starts


@pytest.mark.parametrize("length,size,overlap", [(256, 256, 0), (400, 256, 112), (1000, 256, 32), (513, 64, 16)])
def test_tiles_cover_the_length_with_the_overlap(length, size, overlap):
    starts = tile_starts(length, size, overlap)
    assert starts[0] == 0 and starts[-1] + size == length  # the last tile ends exactly at the edge
    assert all(b - a <= size - overlap for a, b in zip(starts, starts[1:]))  # at least `overlap` shared
    assert starts == sorted(set(starts))


@pytest.mark.parametrize("length,size,overlap,what", [(100, 0, 0, "positive"), (100, 64, 64, "overlap"),
                                                       (50, 64, 0, "smaller than tile size")])
def test_impossible_grids_are_refused(length, size, overlap, what):
    with pytest.raises(ValueError, match=what):
        tile_starts(length, size, overlap)


def test_grid_windows_are_row_major_and_square():
    windows = list(grid_windows(300, 200, 128, 0))
    assert windows[0] == Window(0, 0, 128, 128) and windows[-1] == Window(172, 72, 128, 128)
    assert [w.row for w in windows] == sorted(w.row for w in windows)
    assert len(windows) == len(tile_starts(300, 128, 0)) * len(tile_starts(200, 128, 0))
