"""Client library for segmenting whole scenes, independent of how tiles are served.

`segment_scene(src, out, predict, spec)` reads a raster window by window, calls `predict` on batches
of raw tiles ([N, H, W, C] in the spec's dtype, like the served ensemble's TILES), stitches the
predictions and streams a class-map GeoTIFF (plus, on request, a colour preview and a JSON summary).
`predict` can be anything: ONNX Runtime in the tests, Triton's gRPC client in production.
"""

from rsseg.client.modes import MODES, default_margin
from rsseg.client.request_loop import Predict
from rsseg.client.scene import SceneSummary, segment_scene
from rsseg.client.stitch import NODATA, class_maps_from_probabilities
from rsseg.client.windows import (
    PlannedWindow,
    blend_weights,
    choose_tile_size,
    padded_extent,
    plan_blend_windows,
    plan_windows,
)
from rsseg.client.writer import ClassMapWriter, write_preview, write_summary

__all__ = [
    "MODES",
    "NODATA",
    "ClassMapWriter",
    "PlannedWindow",
    "Predict",
    "SceneSummary",
    "blend_weights",
    "choose_tile_size",
    "class_maps_from_probabilities",
    "default_margin",
    "padded_extent",
    "plan_blend_windows",
    "plan_windows",
    "segment_scene",
    "write_preview",
    "write_summary",
]
