"""`evaluate`: score a model the way it is served. Whole labelled scenes of a prepared dataset go through the
scene client's own tiling and stitching (rsseg.evaluation.served_predictor: adaptive tile size, centre-keep
margin, optional TTA) into ONNX Runtime in process, or into a running Triton server; the full-size maps are
scored with every metric of the task and the result is logged as a run of `rsseg-evaluations`, and tagged on
the evaluated version (`eval_<metric>`) so that promotion can rank versions on what is served.

Several models (`models:/NAME/3,5,7`) are scored as their logit-averaging ensemble, computed as the served
segmenter computes it (rsseg.averaging). `precision=int8|fp16` scores the reduced file promotion would serve
(rsseg.export.quantize; int8 calibrated on the model's training split); such runs do not tag the version.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsseg import tracking
from rsseg.config import EvaluateConfig
from rsseg.data.datasets import PreparedData
from rsseg.errors import ConfigError
from rsseg.evaluation import Evaluator, LabelledScene, OnnxModel, labelled_scenes, score_scenes, served_predictor
from rsseg.export.onnx import export_onnx
from rsseg.export.quantize import PrecisionRecipe, reduce_files
from rsseg.models.ensemble import LogitAverage
from rsseg.spec import ModelSpec, ensemble_spec, member_label

log = logging.getLogger(__name__)

SPLITS = {"val": ("val",), "train": ("train",), "all": ("train", "val")}


@dataclass
class ServedModel:
    """A running Triton server's ensemble, as served_predictor takes a model: its spec and class maps."""

    segmenter: Any  # rsseg.client.triton.TritonSegmenter

    @property
    def spec(self) -> ModelSpec:
        return self.segmenter.spec

    def class_maps(self, tiles: np.ndarray) -> np.ndarray:
        return self.segmenter(tiles)


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Score, log and tag; returns the summary (metrics, where they were computed, the run id)."""
    if not config.model and not config.url:
        raise ConfigError("evaluate: name a model (model=models:/NAME/VERSION, a list, or runs:/RUN_ID) or a "
                          "running server (url=HOST:PORT)")
    uris = tracking.expand_model_uris(config.model)
    members = [tracking.load_model_uri(uri, what="model") for uri in uris]
    if not config.url:
        return evaluate_loaded(members, config)
    from rsseg.client.triton import TritonSegmenter

    specs = [spec for _, spec in members]
    with TritonSegmenter([config.url], config.served_model or None, tta=config.tta) as segmenter:
        if specs:
            _check_served(segmenter.spec, specs[0] if len(specs) == 1 else ensemble_spec(specs))
        return _evaluate(config, ServedModel(segmenter), specs, where=f"triton {config.url}")


def evaluate_loaded(members: list[tuple[Any, ModelSpec]], config: EvaluateConfig) -> dict[str, Any]:
    """evaluate() for models already loaded (one, or an ensemble's members), in ONNX Runtime in process:
    each exported on its own, their logits averaged as the served segmenter averages them."""
    specs = [spec for _, spec in members]
    recipe = PrecisionRecipe.from_config(config)
    recipe.check_runtime(config.runtime)
    where = f"{config.runtime} in process" + ("" if recipe.precision == "fp32" else f", {recipe.precision}")
    with tempfile.TemporaryDirectory(prefix="rsseg-evaluate-") as tmp:
        model = onnx_ensemble(members, Path(tmp), tta=config.tta, recipe=recipe, runtime=config.runtime)
        return _evaluate(config, model, specs, where=where)


def onnx_ensemble(members: list[tuple[Any, ModelSpec]], folder: Path, tta: str = "none",
                  recipe: PrecisionRecipe | None = None, runtime: str = "onnxruntime") -> OnnxModel:
    """Loaded models (one, several, or registered ensembles) as the served segmenter runs them: each member
    exported to ONNX in `folder` (at `recipe`'s precision: int8 calibrated on the first member's training
    data), their logits averaged (over `tta` views too), computed by `runtime` (rsseg.runtimes)."""
    specs = [spec for _, spec in members]
    parts = [part for model, spec in members for part in _parts(model, spec)]
    spec = specs[0] if len(specs) == 1 else ensemble_spec([s for _, s in parts])
    paths = [export_onnx(model, part, folder / f"member{i}.onnx") for i, (model, part) in enumerate(parts)]
    if recipe is not None and recipe.precision != "fp32":
        trained = [s for _, s in parts]
        data = PreparedData.load(data_root("", trained)) if recipe.precision == "int8" else None
        paths = reduce_files(recipe, paths, folder, spec.dataset, data, training_fold(trained[0]))
    return OnnxModel(paths, spec, tta=tta, runtime=runtime)


def _evaluate(config: EvaluateConfig, model: Any, specs: list[ModelSpec], where: str) -> dict[str, Any]:
    spec: ModelSpec = model.spec
    root = Path(data_root(config.data, specs))
    with tempfile.TemporaryDirectory(prefix="rsseg-evaluate-data-") as tmp:
        if root.is_dir() and not (root / "dataset_spec.json").is_file():
            return _evaluate_prepared(config, model, specs, where, _prepare_folder(root, spec, Path(tmp)), "all")
        return _evaluate_prepared(config, model, specs, where, PreparedData.load(root), config.split)


def _prepare_folder(folder: Path, spec: ModelSpec, out: Path) -> PreparedData:
    """A folder of labelled scenes (any layout `prepare` reads), prepared on the fly with the model's classes
    and bands; every scene is scored."""
    from rsseg.data.prepare import prepare_dataset

    ds = spec.dataset
    if ds.mask_encoding == "palette":
        raise ConfigError(f"{folder}: colour masks need the dataset's palette; prepare the folder first (mlflow run "
                          ". -e prepare -P source=... -P palette=...) and give data= the prepared folder")
    log.info("preparing %s to score it (not a prepared dataset)", folder)
    prepare_dataset(folder, out / "prepared", task=ds.task, classes=list(ds.classes), bands=list(ds.bands),
                    mask_threshold=ds.mask_threshold, ignore_index=ds.ignore_index, tile_size=min(spec.tile_sizes),
                    overlap=0, progress=False)
    return PreparedData.load(out / "prepared")


def _evaluate_prepared(config: EvaluateConfig, model: Any, specs: list[ModelSpec], where: str, data: PreparedData,
                       split: str) -> dict[str, Any]:
    spec: ModelSpec = model.spec
    check_data(data, spec)
    scenes = split_scenes(data, split)
    headline = spec.dataset.headline_metric
    predict = served_predictor(model, data, batch=config.batch, margin=None if config.margin < 0 else config.margin,
                               tile=config.tile or None)
    total = Evaluator(spec)

    def progress(i: int, row: dict[str, Any]) -> None:
        log.info("scene %d/%d %s: %s %.4f", i + 1, len(scenes), row["scene"], headline, row.get(headline, math.nan))

    metrics, rows = score_scenes(data, spec, scenes, predict, total=total, on_scene=progress)
    rows.sort(key=lambda r: _sort_key(r.get(headline)))  # worst scenes first
    label = config.model or f"{config.url}/{config.served_model or spec.model_name}"
    summary = {"model": label, "members": [member_label(s) for s in specs] or None, "where": where,
               "data": str(config.data or data.root), "split": split, "scenes": len(scenes), "tta": config.tta,
               "headline_metric": headline, "headline": metrics.get(headline)}
    params = {"model": label, "members": len(specs) or 1, "data": summary["data"], "split": split,
              "where": where, "tta": config.tta, "margin": config.margin, "tile": config.tile, "batch": config.batch,
              "precision": config.precision, "runtime": config.runtime}
    summary["run_id"] = tracking.log_evaluation(summary, metrics, rows, total.confusion.matrix, total.class_names,
                                                params)
    registered = [s for s in specs if s.model_name and s.model_version]
    if config.tag and len(specs) == 1 and registered and config.precision == "fp32":  # eval_ tags rank fp32
        target = registered[0]
        tracking.tag_evaluation(target.model_name, target.model_version, metrics, {
            "eval_run_id": summary["run_id"], "eval_data": summary["data"], "eval_split": split,
            "eval_tta": config.tta, "eval_headline_metric": f"eval_{headline}"})
        summary["tagged"] = member_label(target)
    summary["metrics"] = metrics
    log.info("%s on %d %s scene(s) of %s (%s): %s %.4f", label, len(scenes), split, summary["data"], where, headline,
             metrics.get(headline, math.nan))
    return summary


def split_scenes(data: PreparedData, split: str) -> list[LabelledScene]:
    """The labelled scenes of `split` (val, train or all); ConfigError when there are none."""
    scenes = [s for name in SPLITS[split] for s in labelled_scenes(data, name)]
    if not scenes:
        raise ConfigError(f"{data.root}: no scenes in split {split!r}; choose split=train, val or all")
    return scenes


def served_metrics(model: OnnxModel, data: PreparedData, split: str = "val", batch: int = 4) -> dict[str, float]:
    """The task's metrics of `model` over the whole scenes of `split`, through the served tiling; not logged."""
    scenes = split_scenes(data, split)
    metrics, _ = score_scenes(data, model.spec, scenes, served_predictor(model, data, batch=batch))
    return metrics


def _parts(model: Any, spec: ModelSpec) -> list[tuple[Any, ModelSpec]]:
    """A registered ensemble's members (each exported on its own, as promotion serves them), or the model."""
    if isinstance(model, LogitAverage):
        return list(zip(model.members, model.specs, strict=True))
    return [(model, spec)]


def data_root(given: str, specs: list[ModelSpec]) -> str:
    """`given`, or the prepared dataset the (first) model was trained on (its run's `data` param)."""
    if given:
        return given
    trained_on = next((tracking.run_param(s.run_id, "data") for s in specs if s.run_id), None)
    trained_on = trained_on.split(",")[0].strip() if trained_on else None  # several: the first is validated on
    if not trained_on:
        raise ConfigError("no data given and the model's run does not record what it was trained on; "
                          "give data=PATH of a prepared dataset")
    if not Path(trained_on).is_dir():
        raise ConfigError(f"the model was trained on {trained_on}, which is not here; give data=PATH of a "
                          "prepared dataset")
    return trained_on


def training_fold(spec: ModelSpec) -> int:
    """The validation fold the model was trained with (its run's `fold` param; -1: the 9:1 holdout)."""
    value = tracking.run_param(spec.run_id, "fold") if spec.run_id else None
    try:
        return int(float(value)) if value not in (None, "") else -1
    except ValueError:
        return -1


def check_data(data: PreparedData, spec: ModelSpec) -> None:
    mine, theirs = spec.dataset, data.spec
    if (mine.task, mine.classes, mine.bands, mine.dtype) != (theirs.task, theirs.classes, theirs.bands, theirs.dtype):
        raise ConfigError(f"{data.root} is {theirs.task} data with classes {theirs.classes}, bands "
                          f"{theirs.bands} ({theirs.dtype}), but the model takes {mine.task} {mine.classes}, bands "
                          f"{mine.bands} ({mine.dtype}); give data= of the kind it was trained on")


def _check_served(served: ModelSpec, expected: ModelSpec) -> None:
    """With both url and model: the server must serve those very versions."""
    def versions(spec: ModelSpec) -> list[tuple[Any, Any]]:
        members = spec.members or [{"model_name": spec.model_name, "model_version": spec.model_version}]
        return [(m.get("model_name"), m.get("model_version")) for m in members]

    if versions(served) != versions(expected):
        raise ConfigError(f"evaluate: the server serves {versions(served)}, not the model named {versions(expected)}; "
                          "leave model empty to score what it serves")


def _sort_key(value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return math.inf
    return value if math.isfinite(value) else math.inf
