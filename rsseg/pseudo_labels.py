"""`pseudo_label`: a teacher labels unlabelled scenes where it is sure. Each scene goes through the served tiling
(rsseg.client.segment_scene, streamed: any size) into the teacher (one registered version or several, logits
averaged as served); a pixel gets the teacher's class where that class's probability reaches `threshold` and
the ignore index elsewhere. The masks are written beside the output (`<out>-labels/`, images linked, masks as
GeoTIFFs) and `prepare` turns them into a prepared dataset whose spec records the teacher, the threshold and
the share of each class's pixels that was kept (`provenance`), so `train` can use it like any other.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from rsseg import heads, tracking
from rsseg.config import PseudoLabelConfig
from rsseg.data.datasets import PreparedData
from rsseg.data.raster import IMAGE_SUFFIXES
from rsseg.errors import ConfigError, DataError
from rsseg.evaluation import OnnxModel
from rsseg.scoring import onnx_ensemble
from rsseg.spec import member_label

log = logging.getLogger(__name__)

IGNORED = 255  # what segment_scene writes for nodata, and the prepared datasets' default ignore index


class ConfidentTeacher:
    """Class maps where the teacher is sure (max probability >= threshold), IGNORED elsewhere; counts every
    class's predicted and kept pixels."""

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


def pseudo_label(config: PseudoLabelConfig) -> dict[str, Any]:
    """Label `config.source` with the teacher and prepare it; returns the summary (also logged as a run)."""
    from rsseg.client.scene import segment_scene
    from rsseg.data.prepare import prepare_dataset

    if not config.teacher:
        raise ConfigError("pseudo_label: name the teacher (teacher=models:/NAME/VERSION, a list, or runs:/RUN_ID)")
    if not 0.0 < config.threshold <= 1.0:
        raise ConfigError(f"pseudo_label: threshold must be in (0, 1], got {config.threshold}")
    images = unlabelled_images(Path(config.source))
    out = Path(config.out or Path("data/prepared") / f"{Path(config.source).resolve().name}-pseudo")
    labels = out.with_name(out.name + "-labels")
    for path in (out, labels):
        if path.exists() and any(path.iterdir()):
            raise ConfigError(f"{path} exists and is not empty; choose another out= or remove it")
    members = [tracking.load_model_uri(uri, what="teacher") for uri in tracking.expand_model_uris(config.teacher)]
    if any(spec.dataset.task == "change" for _, spec in members):
        raise ConfigError("pseudo_label: change teachers (pairs of dates, SECOND-style unchanged areas) are not built "
                          "yet; give a binary or multiclass teacher")
    with tempfile.TemporaryDirectory(prefix="rsseg-pseudo-") as tmp:
        teacher = ConfidentTeacher(onnx_ensemble(members, Path(tmp), tta=config.tta), config.threshold)
        spec = teacher.spec
        work = labels.with_name(labels.name + f".tmp-{os.getpid()}")
        try:
            (work / "images").mkdir(parents=True)
            (work / "masks").mkdir()
            for i, image in enumerate(images):
                (work / "images" / image.name).symlink_to(image.resolve())
                segment_scene(image, work / "masks" / f"{image.stem}.tif", teacher.class_maps, spec,
                              batch=config.batch, progress=False)
                log.info("pseudo-labelled %d/%d %s", i + 1, len(images), image.name)
            work.rename(labels)  # the masks' final place before prepare records their paths
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    try:
        ds = spec.dataset
        tile = config.tile_size or spec.tile_size
        overlap = config.overlap if config.overlap >= 0 else min(ds.overlap or 0, tile // 2)
        prepare_dataset(labels, out, layout="pairs", task=ds.task, name=out.name, classes=list(ds.classes),
                        bands=list(ds.bands), ignore_index=IGNORED, tile_size=tile, overlap=overlap, progress=False)
        data = PreparedData.load(out)
        if data.spec.mask_encoding != "index":
            raise DataError(f"{labels}: the teacher was sure of no {ds.classes[-1]} pixel at threshold "
                            f"{config.threshold}; lower the threshold or use a stronger teacher")
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(labels, ignore_errors=True)
        raise
    kept_share = {name: (float(k / p) if p else float("nan"))
                  for name, k, p in zip(ds.classes, teacher.kept, teacher.predicted, strict=True)}
    provenance = {"kind": "pseudo_label", "teacher": config.teacher,
                  "members": [member_label(s) for _, s in members], "threshold": config.threshold, "tta": config.tta,
                  "source": str(Path(config.source).resolve()), "labels": str(labels.resolve()),
                  "kept_share": kept_share, "kept_pixels": dict(zip(ds.classes, map(int, teacher.kept), strict=True)),
                  "predicted_pixels": dict(zip(ds.classes, map(int, teacher.predicted), strict=True))}
    data.spec.provenance = provenance
    data.spec.save(out / "dataset_spec.json")
    summary = {"out": str(out), "scenes": len(images), **provenance}
    summary["run_id"] = tracking.log_pseudo_labels(summary)
    return summary


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
