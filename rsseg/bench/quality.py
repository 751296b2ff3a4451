"""Quality per training minute against a peer: our default recipe and a plain segmentation_models.pytorch
script (rsseg.bench.peer), trained with the same wall-clock budget on the same training scenes, scored
on the same validation scenes with the same metric code.

Ours is scored the way it is served: exported to ONNX and run through the scene client's tiling and
stitching (rsseg.evaluation.served_predictor); also each whole image in one pass, to show what the
tiling costs. The peer predicts each whole image in one pass, as its script does. Beside both: the
trivial baseline (all positive, or the majority class, on the same pixels).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rsseg.bench.datasets import benchmark_config, prepare_benchmark
from rsseg.bench.peer import peer_predictor, train_peer
from rsseg.config import TrainConfig
from rsseg.data.datasets import PreparedData
from rsseg.evaluation import (
    LabelledScene,
    OnnxModel,
    ScenePredictor,
    labelled_scenes,
    scene_targets,
    score_scenes,
    served_predictor,
    whole_image_predictor,
)
from rsseg.export.onnx import export_onnx
from rsseg.spec import ModelSpec
from rsseg.training import train

log = logging.getLogger(__name__)


def quality_benchmark(name: str, budget: float, *, peer: bool = True, tta: str = "none",
                      **overrides: Any) -> dict[str, Any]:
    """One row for a benchmark dataset of ../shared/data (rsseg.bench.datasets.RECIPES)."""
    logging.getLogger("rsseg.client").setLevel(logging.WARNING)  # one line per scene is noise here
    data = prepare_benchmark(name)
    config = benchmark_config(name, data.root, budget, **overrides)
    return quality_row(name, data, config, peer=peer, tta=tta, overrides=overrides)


def quality_row(name: str, data: PreparedData, config: TrainConfig, *, peer: bool = True, tta: str = "none",
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train `config` (with its time budget) and, with `peer`, the peer script for the same budget, on the
    training scenes of `data`; score both on its validation scenes. The headline metric of ours (served
    path and whole image), of the peer, and the trivial baseline. With `tta` other than none, the same
    trained model is also scored through the served tiling with that test-time augmentation
    (`ours_served_tta`), as `promote -P tta=...` would serve it."""
    budget = config.time_budget
    scenes = labelled_scenes(data, "val")
    started = time.monotonic()
    result = train(config, data)
    train_s = time.monotonic() - started
    spec = result.spec
    metric = spec.dataset.headline_metric
    with tempfile.TemporaryDirectory(prefix="rsseg-quality-") as tmp:
        onnx_path = export_onnx(result.model, spec, Path(tmp) / "model.onnx")
        model = OnnxModel(onnx_path, spec)
        served_maps: list[np.ndarray] = []
        whole_maps: list[np.ndarray] = []
        group = spec.outputs[0].name
        tiled = _keeping(served_predictor(model, data), group, served_maps)
        served, per_scene = score_scenes(data, spec, scenes, tiled)
        whole, _ = score_scenes(data, spec, scenes, _keeping(whole_image_predictor(model, data), group, whole_maps))
        if tta != "none":
            augmented = OnnxModel(onnx_path, spec, tta=tta)
            served_tta, _ = score_scenes(data, spec, scenes, served_predictor(augmented, data))
    row: dict[str, Any] = {
        "dataset": name, "budget_s": budget, "metric": metric, "train_scenes": len(labelled_scenes(data, "train")),
        "val_scenes": len(scenes), "ours_served": served[metric], "ours_whole_image": whole[metric],
        "ours_train_s": round(train_s, 1), "ours_epochs": result.history[-1]["epoch"] if result.history else 0,
        "ours_tiles_per_s": round(result.history[-1]["train_tiles_per_s"], 2) if result.history else None,
        # Selection among the validated weights uses these same scenes (the peer keeps its last weights):
        # when the selected epoch is not the last, the figure is slightly optimistic.
        "ours_selected_epoch": result.best_epoch,
        "ours_per_class": {k: round(v, 4) for k, v in served.items() if k.startswith("iou_")},
        # 1.0 where the tiling margin covers the receptive field; global-context models (PSP, OCR, attention)
        # cannot reach it: their tiles see less context than the whole image
        "served_whole_agreement": pixel_agreement(served_maps, whole_maps),
        "baseline": trivial_baseline(data, spec, scenes),
        "config": dict(overrides or {}),
    }
    if tta != "none":
        row.update(tta=tta, ours_served_tta=served_tta[metric])
    if peer:
        started = time.monotonic()
        peer_model = train_peer(data, budget, seed=config.seed)
        row["peer_train_s"] = round(time.monotonic() - started, 1)
        row["peer_steps"] = getattr(peer_model, "peer_steps", None)
        peer_scores, _ = score_scenes(data, spec, scenes, peer_predictor(peer_model, data))
        row["peer"] = peer_scores[metric]
        row["peer_per_class"] = {k: round(v, 4) for k, v in peer_scores.items() if k.startswith("iou_")}
        row["ours_minus_peer"] = row["ours_served"] - row["peer"]
        row["ratio_ours_to_peer"] = row["ours_served"] / row["peer"] if row["peer"] else None
    row["served_minus_whole_image"] = row["ours_served"] - row["ours_whole_image"]
    row["worst_scenes"] = [{"scene": r["scene"], metric: r.get(metric)}
                           for r in sorted(per_scene, key=lambda r: r.get(metric, 0.0))[:3]]
    return _rounded(row)


def pixel_agreement(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Share of pixels where two lists of class maps agree."""
    same = sum(int(np.count_nonzero(x == y)) for x, y in zip(a, b))
    return same / max(sum(x.size for x in a), 1)


def _keeping(predict: ScenePredictor, group: str, kept: list[np.ndarray]) -> ScenePredictor:
    def keep(scene: LabelledScene) -> dict[str, np.ndarray]:
        maps = predict(scene)
        kept.append(maps[group])
        return maps

    return keep


def trivial_baseline(data: PreparedData, spec: ModelSpec, scenes: list) -> float:
    """The headline metric of a constant prediction on the validation pixels: all positive (binary IoU,
    change F1) or the majority class everywhere (mIoU over the classes present)."""
    group = "change" if spec.dataset.task == "change" else "classes"
    classes = 2 if spec.dataset.task == "change" else spec.dataset.num_classes
    counts = np.zeros(classes, dtype=np.int64)
    for scene in scenes:
        target = scene_targets(scene, data)[group]
        counts += np.bincount(target[target != spec.dataset.ignore_index].ravel(), minlength=classes)[:classes]
    total = counts.sum()
    if spec.dataset.task in ("binary", "change"):
        share = counts[1] / total
        return float(2 * share / (1 + share)) if "f1" in spec.dataset.headline_metric else float(share)
    return float(counts.max() / total / (counts > 0).sum())


def format_table(rows: list[dict[str, Any]]) -> str:
    header = "| dataset | budget | metric | ours (served) | ours (whole image) | peer (smp script) | ours - peer | baseline |"
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peer = f"{r['peer']:.3f}" if "peer" in r else "-"
        delta = f"{r['ours_minus_peer']:+.3f}" if "ours_minus_peer" in r else "-"
        lines.append(f"| {r['dataset']} | {r['budget_s']:.0f} s | {r['metric']} | {r['ours_served']:.3f} | "
                     f"{r['ours_whole_image']:.3f} | {peer} | {delta} | {r['baseline']:.3f} |")
    return "\n".join(lines)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value
