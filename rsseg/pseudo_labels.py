"""`pseudo_label`: a teacher labels unlabelled scenes where it is sure. Each scene goes through the served tiling
(rsseg.client.segment_scene, streamed: any size) into the teacher (one registered version or several, logits
averaged as served); a pixel gets the teacher's class where that class's probability reaches `threshold` and
the ignore index elsewhere. The masks are written beside the output (`<out>-labels/`, images linked, masks as
GeoTIFFs) and `prepare` turns them into a prepared dataset whose spec records the teacher, the threshold and
the share of each class's pixels that was kept (`provenance`), so `train` can use it like any other.

A change teacher with semantic heads (SECOND-style data) follows the change-detection seed instead: `source`
is a labelled SECOND-layout folder (im1/, im2/, label1/, label2/); the pixels both labels call unchanged get
the teacher's land-cover class (the same on both dates) where it is sure, every labelled pixel stays as it
was, and the written dataset carries the labels' own change masks (change/), so only the semantic heads
learn from the filled pixels (validation scores semantic classes on changed pixels only, so the filled pixels
never enter a metric).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window as RioWindow

from rsseg import heads, tracking
from rsseg.config import PseudoLabelConfig
from rsseg.data.datasets import PreparedData
from rsseg.data.layouts import Scene, collect_scenes
from rsseg.data.masks import decode_mask, read_mask
from rsseg.data.raster import IMAGE_SUFFIXES
from rsseg.data.tiling import Window
from rsseg.errors import ConfigError, DataError
from rsseg.evaluation import OnnxModel
from rsseg.heads import SEMANTIC
from rsseg.scoring import onnx_ensemble
from rsseg.spec import ModelSpec, member_label

log = logging.getLogger(__name__)

IGNORED = 255  # what segment_scene writes for nodata, and the prepared datasets' default ignore index


class ConfidentTeacher:
    """Class maps where the teacher is sure (max probability >= threshold), IGNORED elsewhere; counts every
    class's predicted and kept pixels."""

    RULE = "sure pixels of unlabelled scenes"

    def __init__(self, model: OnnxModel, threshold: float) -> None:
        self.model, self.threshold = model, threshold
        self.groups = [(g.name, g.channels) for g in model.spec.outputs]
        channels = self.groups[0][1]
        self.predicted = np.zeros(channels, dtype=np.int64)
        self.kept = np.zeros(channels, dtype=np.int64)

    @property
    def spec(self):
        return self.model.spec

    def class_maps(self, tiles: np.ndarray) -> np.ndarray:
        logits = self.model.logits(tiles)
        probabilities = heads.softmax(heads.split(logits, self.groups)[self.groups[0][0]])
        maps = probabilities.argmax(axis=1).astype(np.uint8)
        sure = probabilities.max(axis=1) >= self.threshold
        channels = probabilities.shape[1]
        self.predicted += np.bincount(maps.ravel(), minlength=channels)
        self.kept += np.bincount(maps[sure].ravel(), minlength=channels)
        return np.where(sure, maps, np.uint8(IGNORED))[:, None]


class UnchangedAreaTeacher(ConfidentTeacher):
    """SECOND-style change data (the change-detection seed's practice): the teacher's semantic heads give the
    pixels that both dates' labels call unchanged a land-cover class, the same on both dates (their
    probabilities averaged over the two heads), where it is sure; labelled pixels are never touched.
    `predicted`/`kept` count the unchanged pixels per land-cover class (semantic classes 1..K-1)."""

    RULE = "unchanged areas of both dates (semantic heads averaged)"

    def __init__(self, model: OnnxModel, threshold: float) -> None:
        self.model, self.threshold = model, threshold
        self.groups = [(g.name, g.channels) for g in model.spec.outputs]
        semantic = [g for g in model.spec.outputs if g.name in SEMANTIC]
        self.filler_spec = replace(model.spec, outputs=semantic)  # two bands: sure class, most likely class
        classes = semantic[0].channels - 1  # index 0 ("unchanged") is never a land-cover class
        self.predicted = np.zeros(classes, dtype=np.int64)
        self.kept = np.zeros(classes, dtype=np.int64)

    def class_maps(self, tiles: np.ndarray) -> np.ndarray:
        """[N, H, W, 2C] pair tiles -> [N, 2, H, W]: the sure class (IGNORED where unsure), the likeliest."""
        parts = heads.split(self.model.logits(tiles), self.groups)
        probabilities = (heads.softmax(parts[SEMANTIC[0]]) + heads.softmax(parts[SEMANTIC[1]]))[:, 1:] / 2
        likeliest = (probabilities.argmax(axis=1) + 1).astype(np.uint8)
        sure = probabilities.max(axis=1) >= self.threshold
        return np.stack([np.where(sure, likeliest, np.uint8(IGNORED)), likeliest], axis=1)

    def fill(self, scene: Scene, classes: Path, outputs: dict[str, Path], block: int = 256) -> None:
        """Write label1/label2/change for `scene` from its labels and the teacher's `classes` raster, by row
        blocks (any scene size)."""
        ds = self.model.spec.dataset
        ignore = np.uint8(ds.ignore_index)
        with rasterio.open(classes) as src, ExitStack() as stack:
            profile = {"driver": "GTiff", "height": src.height, "width": src.width, "count": 1, "dtype": "uint8",
                       "crs": src.crs, "transform": src.transform, "compress": "deflate"}
            sinks = {name: stack.enter_context(rasterio.open(path, "w", **profile)) for name, path in outputs.items()}
            for row in range(0, src.height, block):
                window = Window(row, 0, min(block, src.height - row), src.width)
                rio_window = RioWindow(0, row, src.width, window.height)
                sure, likeliest = src.read([1, 2], window=rio_window)
                a = decode_mask(read_mask(scene.mask, ds, window), ds)
                b = decode_mask(read_mask(scene.mask_b, ds, window), ds)  # type: ignore[arg-type]
                unchanged = (a == 0) & (b == 0)
                filled = unchanged & (sure != IGNORED)
                self.predicted += np.bincount(likeliest[unchanged].ravel(), minlength=len(self.predicted) + 1)[1:]
                self.kept += np.bincount(sure[filled].ravel(), minlength=len(self.kept) + 1)[1:]
                sinks["label1"].write(np.where(filled, sure, a)[None], window=rio_window)
                sinks["label2"].write(np.where(filled, sure, b)[None], window=rio_window)
                sinks["change"].write(np.where(a == ignore, ignore, (a != 0).astype(np.uint8))[None],
                                      window=rio_window)


def pseudo_label(config: PseudoLabelConfig) -> dict[str, Any]:
    """Label `config.source` with the teacher and prepare it; returns the summary (also logged as a run)."""
    if not config.teacher:
        raise ConfigError("pseudo_label: name the teacher (teacher=models:/NAME/VERSION, a list, or runs:/RUN_ID)")
    if not Path(config.source).is_dir():  # before the teacher is loaded
        raise ConfigError(f"{config.source}: not a folder; give source= a folder of unlabelled scenes (or, for a "
                          "change teacher, a SECOND-layout folder)")
    members = [tracking.load_model_uri(uri, what="teacher") for uri in tracking.expand_model_uris(config.teacher)]
    return pseudo_label_loaded(members, config)


def pseudo_label_loaded(members: list[tuple[Any, ModelSpec]], config: PseudoLabelConfig) -> dict[str, Any]:
    """pseudo_label() with the teacher's models already loaded (one, or several whose logits are averaged);
    `config.teacher` is only recorded."""
    from rsseg.data.prepare import prepare_dataset

    if not 0.0 < config.threshold <= 1.0:
        raise ConfigError(f"pseudo_label: threshold must be in (0, 1], got {config.threshold}")
    change = any(spec.dataset.task == "change" for _, spec in members)
    if change and not all(spec.dataset.has_semantic for _, spec in members):
        raise ConfigError("pseudo_label: a change teacher needs semantic heads (SECOND-style data) to label unchanged "
                          "areas; a binary change model has no classes to give them")
    source = Path(config.source)
    scenes = collect_scenes(source, "second") if change else unlabelled_images(source)
    out = Path(config.out or Path("data/prepared") / f"{source.resolve().name}-pseudo")
    labels = out.with_name(out.name + "-labels")
    for path in (out, labels):
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"{path} exists and is not empty; choose another out= or remove it")
    with tempfile.TemporaryDirectory(prefix="rsseg-pseudo-") as tmp:
        model = onnx_ensemble(members, Path(tmp), tta=config.tta)
        spec = model.spec
        work = labels.with_name(labels.name + f".tmp-{os.getpid()}")
        try:
            if change:
                teacher: ConfidentTeacher = UnchangedAreaTeacher(model, config.threshold)
                _label_unchanged_areas(scenes, teacher, work, config)
            else:
                teacher = ConfidentTeacher(model, config.threshold)
                _label_images(scenes, teacher, work, config)
            work.rename(labels)  # the masks' final place before prepare records their paths
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    ds = spec.dataset
    classes = list(ds.semantic_classes if change else ds.classes)
    try:
        tile = config.tile_size or spec.tile_size
        overlap = config.overlap if config.overlap >= 0 else min(ds.overlap or 0, tile // 2)
        prepare_dataset(labels, out, layout="second" if change else "pairs", task=ds.task, name=out.name,
                        classes=classes, bands=list(ds.bands), ignore_index=IGNORED, tile_size=tile, overlap=overlap,
                        progress=False)
        data = PreparedData.load(out)
        if not change and data.spec.mask_encoding != "index":
            raise DataError(f"{labels}: the teacher was sure of no {ds.classes[-1]} pixel at threshold "
                            f"{config.threshold}; lower the threshold or use a stronger teacher")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(labels, ignore_errors=True)
        raise
    counted = classes[1:] if change else classes  # change: land-cover classes given to unchanged pixels
    kept_share = {name: (float(k / p) if p else float("nan"))
                  for name, k, p in zip(counted, teacher.kept, teacher.predicted, strict=True)}
    provenance = {"kind": "pseudo_label", "teacher": config.teacher, "rule": teacher.RULE,
                  "members": [member_label(s) for _, s in members], "threshold": config.threshold, "tta": config.tta,
                  "source": str(source.resolve()), "labels": str(labels.resolve()),
                  "kept_share": kept_share, "kept_pixels": dict(zip(counted, map(int, teacher.kept), strict=True)),
                  "predicted_pixels": dict(zip(counted, map(int, teacher.predicted), strict=True))}
    data.spec.provenance = provenance
    data.spec.save(out / "dataset_spec.json")
    summary = {"out": str(out), "scenes": len(scenes), **provenance}
    summary["run_id"] = tracking.log_pseudo_labels(summary)
    return summary


def _label_images(images: list[Path], teacher: ConfidentTeacher, work: Path, config: PseudoLabelConfig) -> None:
    """images/ (links) and masks/ (the teacher's sure classes) in `work`, a pairs layout."""
    from rsseg.client.scene import segment_scene

    (work / "images").mkdir(parents=True)
    (work / "masks").mkdir()
    for i, image in enumerate(images):
        (work / "images" / image.name).symlink_to(image.resolve())
        segment_scene(image, work / "masks" / f"{image.stem}.tif", teacher.class_maps, teacher.spec,
                      batch=config.batch, progress=False)
        log.info("pseudo-labelled %d/%d %s", i + 1, len(images), image.name)


def _label_unchanged_areas(scenes: list[Scene], teacher: UnchangedAreaTeacher, work: Path,
                           config: PseudoLabelConfig) -> None:
    """A second layout in `work`: im1/, im2/ (links), label1/ and label2/ with the teacher's sure class on the
    pixels both labels call unchanged (the same class on both dates) and every other pixel as labelled, and
    change/ holding the labels' own change mask (so filling unchanged pixels does not make them changed)."""
    from rsseg.client.pairs import stack_pair
    from rsseg.client.scene import segment_scene

    for folder in ("im1", "im2", "label1", "label2", "change"):
        (work / folder).mkdir(parents=True)
    ds = teacher.spec.dataset
    bands = list(ds.bands)
    for i, scene in enumerate(scenes):
        assert scene.image_b is not None and scene.mask_b is not None  # the second layout pairs them
        (work / "im1" / scene.image.name).symlink_to(scene.image.resolve())
        (work / "im2" / scene.image_b.name).symlink_to(scene.image_b.resolve())
        with tempfile.TemporaryDirectory(prefix="rsseg-pseudo-pair-") as tmp:
            pair = stack_pair(scene.image, scene.image_b, bands, Path(tmp) / "pair.vrt")
            classes = Path(tmp) / "classes.tif"
            segment_scene(pair, classes, teacher.class_maps, teacher.filler_spec,
                          bands=list(range(1, 2 * len(bands) + 1)), batch=config.batch, progress=False)
            teacher.fill(scene, classes, {name: work / name / f"{scene.name}.tif"
                                          for name in ("label1", "label2", "change")})
        log.info("pseudo-labelled the unchanged areas of %d/%d %s", i + 1, len(scenes), scene.name)


def unlabelled_images(source: Path) -> list[Path]:
    """The image files of `source` (or of its images/ or image/ folder), sorted."""
    if not source.is_dir():
        raise ConfigError(f"{source}: not a folder; give source= a folder of unlabelled scenes")
    for folder in (source / "images", source / "image", source):
        if folder.is_dir():
            found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if found:
                return found
    raise DataError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or in images/; give a folder of "
                    "unlabelled scenes")
