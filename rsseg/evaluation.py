"""Scoring models: the task's metrics from class maps, and whole labelled scenes scored the way they are
served.

`Evaluator` accumulates a task's metrics (training validation uses it on tiles). `score_scenes` runs a
scene predictor over labelled scenes and scores the full-size maps; `served_predictor` predicts a scene
through the scene client's own tiling and stitching (rsseg.client.segment_scene: adaptive tile size,
centre-keep margins, reflective padding) with an ONNX model in process, which is what a served model
produces; `whole_image_predictor` predicts it in one padded pass, to show what tiling costs.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from rsseg import averaging, heads, runtimes
from rsseg.data.datasets import PreparedData
from rsseg.data.masks import mask_targets, read_mask
from rsseg.data.raster import read_window
from rsseg.data.transforms import normalize
from rsseg.errors import ConfigError
from rsseg.heads import CHANGE, CLASSES, SEMANTIC
from rsseg.inference import class_maps
from rsseg.metrics import ChangeMetrics, ConfusionMatrix, binary_metrics
from rsseg.spec import ModelSpec

# A scene predictor: labelled scene -> {output group: HxW class map} at the scene's full size.
ScenePredictor = Callable[["LabelledScene"], dict[str, np.ndarray]]


class Evaluator:
    """Accumulates validation metrics for a task; keys are metric names without the 'val_' prefix."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        ds = spec.dataset
        if ds.task == "change":
            semantic = len(ds.semantic_classes) if ds.has_semantic else None
            self.change = ChangeMetrics(semantic, ignore_index=ds.ignore_index)
            self.confusion = ConfusionMatrix(2, ignore_index=ds.ignore_index)
        else:
            self.confusion = ConfusionMatrix(ds.num_classes, ignore_index=ds.ignore_index)

    @property
    def main_group(self) -> str:
        return CHANGE if self.spec.dataset.task == "change" else CLASSES

    @property
    def class_names(self) -> list[str]:
        return ["unchanged", "changed"] if self.spec.dataset.task == "change" else self.spec.dataset.classes

    def update(self, logits: Any, targets: dict[str, Any]) -> dict[str, Any]:
        """From a batch of logits (torch); returns the class maps (torch)."""
        maps = class_maps(logits, self.spec.outputs)
        self.update_maps({k: v.cpu().numpy() for k, v in maps.items()},
                         {k: v.cpu().numpy() for k, v in targets.items()})
        return maps

    def update_maps(self, maps: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> None:
        """From class maps (change models: semantic maps already 0 outside predicted change)."""
        self.confusion.update(maps[self.main_group], targets[self.main_group])
        if self.spec.dataset.task == "change":
            kwargs = {}
            if SEMANTIC[0] in maps:
                changed = targets[CHANGE] == 1
                for date in ("a", "b"):
                    # Full semantic labels (0 = unchanged) for SeK: the dataset ignores unchanged pixels.
                    kwargs[f"sem_pred_{date}"] = maps[f"semantic_{date}"]
                    kwargs[f"sem_target_{date}"] = np.where(changed, targets[f"semantic_{date}"], 0)
            self.change.update(maps[CHANGE], targets[CHANGE], **kwargs)

    def compute(self) -> dict[str, float]:
        if self.spec.dataset.task == "change":
            return self.change.compute()
        if self.spec.dataset.task == "binary":
            return binary_metrics(self.confusion, self.spec.dataset.classes)
        return self.confusion.compute(self.spec.dataset.classes)


@dataclass(frozen=True)
class LabelledScene:
    """One scene of a prepared dataset: its image(s) and mask(s) (paths), and its size."""

    name: str
    image: str
    mask: str
    height: int
    width: int
    image_b: str = ""
    mask_b: str = ""
    mask_change: str = ""


def labelled_scenes(data: PreparedData, split: str = "val") -> list[LabelledScene]:
    """The scenes of `split` ("train" or "val") of a prepared dataset."""
    rows = data.scenes[data.scenes["split"] == split]
    return [LabelledScene(str(r["scene"]), r["image"], r["mask"], int(r["height"]), int(r["width"]),
                          r.get("image_b", "") or "", r.get("mask_b", "") or "", r.get("mask_change", "") or "")
            for _, r in rows.iterrows()]


def scene_targets(scene: LabelledScene, data: PreparedData) -> dict[str, np.ndarray]:
    """The scene's full-size targets per output group (class indices, ignore index where unlabelled)."""
    raw_b = read_mask(scene.mask_b, data.spec) if scene.mask_b else None
    raw_change = read_window(scene.mask_change, None, [1]) if scene.mask_change else None
    return mask_targets(read_mask(scene.mask, data.spec), raw_b, data.spec, raw_change)


def scene_image(scene: LabelledScene, data: PreparedData) -> np.ndarray:
    """The whole scene as raw HWC pixels in model band order (both dates stacked for change data)."""
    images = [read_window(scene.image, None, data.spec.bands)]
    if scene.image_b:
        images.append(read_window(scene.image_b, None, data.spec.bands))
    return np.concatenate(images, axis=-1)


def score_scenes(data: PreparedData, spec: ModelSpec, scenes: list[LabelledScene], predict: ScenePredictor,
                 total: Evaluator | None = None, on_scene: Callable[[int, dict[str, Any]], None] | None = None,
                 ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The task's metrics over all scenes' pixels, and one row per scene (its own metrics). `total`: the
    evaluator to accumulate into (to read its confusion matrix afterwards); `on_scene(i, row)` after each."""
    total = total or Evaluator(spec)
    rows = []
    for i, scene in enumerate(scenes):
        maps, targets = predict(scene), scene_targets(scene, data)
        total.update_maps(maps, targets)
        own = Evaluator(spec)
        own.update_maps(maps, targets)
        rows.append({"scene": scene.name, **own.compute()})
        if on_scene is not None:
            on_scene(i, rows[-1])
    return total.compute(), rows


class OnnxModel:
    """Exported model(s) in ONNX Runtime or OpenVINO (rsseg.runtimes, as the served segmenter runs them): raw
    tiles in (the spec's dtype, HWC), class maps out, computed as the served ensemble computes them
    (normalise, logits averaged over the models and `tta` views by rsseg.averaging, heads.class_maps).
    Several ONNX files: a logit-averaging ensemble."""

    def __init__(self, onnx_paths: str | Path | Sequence[str | Path], spec: ModelSpec, tta: str = "none",
                 runtime: str = "onnxruntime") -> None:
        self.spec = spec
        paths = [onnx_paths] if isinstance(onnx_paths, (str, Path)) else list(onnx_paths)
        averaging.tta_transforms(tta)  # validate
        self.tta = tta
        self.runtime = runtime
        try:
            self._runners = [runtimes.load_runner(p, runtime)[0] for p in paths]
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._groups = [(g.name, g.channels) for g in spec.outputs]

    def logits(self, tiles: np.ndarray) -> np.ndarray:
        batch = np.stack([normalize(t, self.spec.dataset) for t in tiles])
        return averaging.average_logits(self._runners, batch, self.tta)

    def class_maps(self, tiles: np.ndarray) -> np.ndarray:
        """[N, H, W, C] raw -> [N, G, H, W] uint8."""
        return heads.class_maps(self.logits(tiles), self._groups)


def served_predictor(model: OnnxModel, data: PreparedData, *, batch: int = 4, margin: int | None = None,
                     tile: int | None = None) -> ScenePredictor:
    """Predict scenes through the scene client's tiling and stitching, as `clients/segment.py` does."""
    from rsseg.client.pairs import stack_pair
    from rsseg.client.scene import segment_scene

    spec = model.spec

    def predict(scene: LabelledScene) -> dict[str, np.ndarray]:
        with tempfile.TemporaryDirectory(prefix="rsseg-eval-") as tmp:
            source: str | Path = scene.image
            bands = list(spec.dataset.bands)
            if scene.image_b:
                source = stack_pair(Path(scene.image), Path(scene.image_b), bands, Path(tmp) / "pair.vrt")
                bands = list(range(1, 2 * len(bands) + 1))
            out = Path(tmp) / "classes.tif"
            segment_scene(source, out, model.class_maps, spec, bands=bands, batch=batch, margin=margin, tile=tile,
                          progress=False)
            with rasterio.open(out) as src:
                maps = src.read()
        return {g.name: maps[i] for i, g in enumerate(spec.outputs)}

    return predict


def whole_image_predictor(model: OnnxModel, data: PreparedData) -> ScenePredictor:
    """Predict each scene in one pass, reflect-padded to a multiple of the model stride."""
    stride = int(model.spec.stride)

    def predict(scene: LabelledScene) -> dict[str, np.ndarray]:
        image = scene_image(scene, data)
        h, w = image.shape[:2]
        padded = np.pad(image, ((0, math.ceil(h / stride) * stride - h), (0, math.ceil(w / stride) * stride - w),
                                (0, 0)), mode="reflect")
        maps = model.class_maps(padded[None])[0, :, :h, :w]
        return {g.name: maps[i] for i, g in enumerate(model.spec.outputs)}

    return predict
