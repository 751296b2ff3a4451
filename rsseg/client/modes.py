"""The two ways of stitching a scene, one object each, so that what differs between them is decided
here and nowhere else (segment_scene and the CLI ask the mode; see rsseg.client.windows for the geometry).

- "centre": windows at stride tile - 2*margin, each keeps its centre. With margin >= the model's
  receptive field the stitched map equals a whole-image pass exactly. `predict` returns class maps.
- "blend": windows at stride tile - margin, probabilities blended with smooth weights, then argmax.
  `predict` must return probabilities (softmax per output group, as Triton's PROBABILITIES).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from rsseg import contract
from rsseg.client.stitch import BlendBand, BlendStitcher, CentreStitcher, RowSink, Stitcher
from rsseg.client.windows import PlannedWindow, plan_blend_windows, plan_windows
from rsseg.errors import ConfigError
from rsseg.spec import ModelSpec


class Mode(ABC):
    """A stitching mode: its margin (default and check), its window plan, the served outputs `predict`
    must answer with, and the stitcher that puts the windows back together."""

    name: str

    @abstractmethod
    def default_margin(self, tile: int, stride: int) -> int:
        """The margin when none is given (pixels; on the stride grid)."""

    @abstractmethod
    def check_margin(self, tile: int, margin: int, stride: int) -> None:
        """Raise ConfigError, saying what is allowed, for a margin that would move windows off the grid."""

    @abstractmethod
    def plan(self, height: int, width: int, tile: int, margin: int, stride: int) -> list[PlannedWindow]:
        """The windows over a height x width scene, row of windows by row of windows."""

    @abstractmethod
    def outputs(self, probabilities: bool) -> tuple[str, ...]:
        """The served outputs (rsseg.contract names, in answer order) `predict` returns; `probabilities`:
        the per-class probabilities are written too."""

    @abstractmethod
    def stitcher(self, output: RowSink, rows: list[list[PlannedWindow]], spec: ModelSpec, *, width: int,
                 height: int, tile: int, margin: int, probabilities: bool) -> Stitcher:
        """The stitcher for the planned `rows`, writing finished rows to `output`."""


def _centre_margin(tile: int, stride: int) -> int:
    cap = (tile - stride) // 2 // stride * stride
    return min(max(stride, stride * round(tile / 8 / stride)), max(cap, 0))


class CentreMode(Mode):
    """Centre-keep ('dilated'): exact stitching from class maps."""

    name = "centre"

    def default_margin(self, tile: int, stride: int) -> int:
        """tile/8 rounded to a multiple of the stride (at least one stride while the tile allows)."""
        return _centre_margin(tile, stride)

    def check_margin(self, tile: int, margin: int, stride: int) -> None:
        if margin < 0 or tile - 2 * margin < stride or (2 * margin) % stride:
            raise ConfigError(f"centre margin {margin} for tile {tile}: need 0 <= 2*margin <= tile - {stride} "
                              f"with 2*margin a multiple of the stride {stride} (windows must start on its grid)")

    def plan(self, height: int, width: int, tile: int, margin: int, stride: int) -> list[PlannedWindow]:
        return plan_windows(height, width, tile, margin, stride)

    def outputs(self, probabilities: bool) -> tuple[str, ...]:
        return (contract.CLASS_MAP, contract.PROBABILITIES) if probabilities else (contract.CLASS_MAP,)

    def stitcher(self, output: RowSink, rows: list[list[PlannedWindow]], spec: ModelSpec, *, width: int,
                 height: int, tile: int, margin: int, probabilities: bool) -> Stitcher:
        channels = spec.num_output_channels if probabilities else 0
        return CentreStitcher(output, len(spec.outputs), width, channels)


class BlendMode(Mode):
    """Probability blending: smooth weights over overlapping windows, then argmax."""

    name = "blend"

    def default_margin(self, tile: int, stride: int) -> int:
        """Twice the centre margin, the overlap, capped at tile/2: the same number of windows and, at the
        blending switch-over, about the same context as centre mode."""
        return min(2 * _centre_margin(tile, stride), tile // 2 // stride * stride)

    def check_margin(self, tile: int, margin: int, stride: int) -> None:
        if margin < 0 or 2 * margin > tile or margin % stride:
            raise ConfigError(f"blend margin {margin} for tile {tile}: need a multiple of the stride {stride} "
                              "in [0, tile/2]")

    def plan(self, height: int, width: int, tile: int, margin: int, stride: int) -> list[PlannedWindow]:
        return plan_blend_windows(height, width, tile, margin, stride)

    def outputs(self, probabilities: bool) -> tuple[str, ...]:
        return (contract.PROBABILITIES,)  # blended probabilities are what the map is made of

    def stitcher(self, output: RowSink, rows: list[list[PlannedWindow]], spec: ModelSpec, *, width: int,
                 height: int, tile: int, margin: int, probabilities: bool) -> Stitcher:
        band = BlendBand(spec.outputs, width, tile, margin, len(rows) - 1, len(rows[0]) - 1)
        return BlendStitcher(output, band, [r[0].row for r in rows], height)


# by name: the CLI's --mode choices and segment_scene's `mode`
MODES: dict[str, Mode] = {"centre": CentreMode(), "blend": BlendMode()}


def default_margin(tile: int, stride: int, mode: str = "centre") -> int:
    """The mode's default margin (Mode.default_margin)."""
    return MODES[mode].default_margin(tile, stride)
