"""What do unlabelled scenes and a bigger teacher buy a student? On a benchmark dataset whose training scenes
are split into a labelled part and an "unlabelled" part (masks hidden; the validation split is never
pseudo-labelled), at the same student training budget:

- labelled only: the default recipe on the labelled part;
- + pseudo labels: a teacher (a larger encoder, trained on the labelled part for `teacher_budget`) labels the
  unlabelled part where it is sure (`pseudo_label`), mixed 1:1 with the labelled part;
- + distillation: the student also learns the teacher's soft logits (`train -P teacher=`);
- both; and all labels (the hidden masks given back: the ceiling).

On SECOND-style change data (`second_row`: LEVIR-CD made SECOND-style, see `levir_as_second`) the teacher
(a larger siamese UNet) fills the unchanged areas of the training pairs instead (the change-detection
seed's rule), and the student trains on the filled set, or distils, or neither.

Every figure is `evaluate`'s (whole validation scenes through the served tiling, ONNX Runtime in process),
logged in a throwaway MLflow store."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from rsseg.bench.datasets import benchmark_config, prepare_benchmark, throwaway_store
from rsseg.config import EvaluateConfig, PseudoLabelConfig
from rsseg.data.datasets import PreparedData
from rsseg.pseudo_labels import pseudo_label_loaded
from rsseg.scoring import evaluate_loaded
from rsseg.training import train

log = logging.getLogger(__name__)

TEACHER_ENCODER = "tf_efficientnet_lite4"
# LEVIR-CD made SECOND-style: semantic classes as the Dubai palette's, a changed pixel (a new building) is
# land before and building after.
SECOND_CLASSES = ["unchanged", "land", "water", "building", "vegetation", "road"]
SECOND_STUDENTS = ("labelled only", "+ unchanged areas pseudo-labelled", "+ distillation")
STUDENTS = ("labelled only", "+ pseudo labels", "+ distillation", "+ pseudo labels + distillation", "all labels")


def split_labelled(data: PreparedData, labelled_share: float, out: Path, seed: int = 0) -> tuple[PreparedData, Path]:
    """A prepared dataset keeping the validation scenes and `labelled_share` of the training scenes (drawn at
    random), and a folder of links to the other training scenes' images (their masks hidden)."""
    train_scenes = sorted(data.scenes.loc[data.scenes["split"] == "train", "scene"])
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(train_scenes, size=max(1, round(len(train_scenes) * labelled_share)), replace=False))
    hidden = [s for s in train_scenes if s not in keep]
    labelled = out / "labelled"
    labelled.mkdir(parents=True)
    shutil.copy(data.root / "dataset_spec.json", labelled / "dataset_spec.json")
    data.scenes[~data.scenes["scene"].isin(hidden)].to_csv(labelled / "scenes.csv", index=False)
    data.tiles[~data.tiles["scene"].isin(hidden)].to_csv(labelled / "tiles.csv", index=False)
    unlabelled = out / "unlabelled"
    unlabelled.mkdir()
    for _, scene in data.scenes[data.scenes["scene"].isin(hidden)].iterrows():
        image = Path(scene["image"])
        (unlabelled / f"{scene['scene']}{image.suffix}").symlink_to(image)
    return PreparedData.load(labelled), unlabelled


def pseudo_row(name: str, budget: float, teacher_budget: float, labelled_share: float = 1 / 3,
               threshold: float = 0.9) -> dict[str, Any]:
    """The five students (STUDENTS) and the teacher on one benchmark dataset."""
    logging.getLogger("rsseg.client").setLevel(logging.WARNING)
    data = prepare_benchmark(name)
    with tempfile.TemporaryDirectory(prefix="rsseg-bench-pseudo-") as tmp, throwaway_store(Path(tmp)):
        return _row(name, data, Path(tmp), budget, teacher_budget, labelled_share, threshold)


def _row(name: str, data: PreparedData, tmp: Path, budget: float, teacher_budget: float, labelled_share: float,
         threshold: float) -> dict[str, Any]:
    labelled, unlabelled = split_labelled(data, labelled_share, tmp / "split")
    config = benchmark_config(name, labelled.root, budget)
    teacher = train(replace(config, time_budget=teacher_budget, encoder=TEACHER_ENCODER), labelled)
    members = [(teacher.model, teacher.spec)]
    pseudo = pseudo_label_loaded(members, PseudoLabelConfig(teacher=f"{TEACHER_ENCODER} ({teacher_budget:.0f} s)",
                                                            source=str(unlabelled), out=str(tmp / "pseudo"),
                                                            threshold=threshold))
    pseudo_data = PreparedData.load(pseudo["out"])
    students = {
        STUDENTS[0]: train(config, labelled),
        STUDENTS[1]: train(replace(config, mix="1:1"), labelled, extra=[pseudo_data]),
        STUDENTS[2]: train(config, labelled, teacher=members[0]),
        STUDENTS[3]: train(replace(config, mix="1:1"), labelled, extra=[pseudo_data], teacher=members[0]),
        STUDENTS[4]: train(replace(config, data=str(data.root)), data),
    }
    scores = {label: _score(result, labelled.root) for label, result in [("teacher", teacher), *students.items()]}
    kept = pseudo["kept_pixels"]
    return {"dataset": name, "metric": teacher.spec.dataset.headline_metric, "budget_s": budget,
            "teacher_budget_s": teacher_budget, "teacher_encoder": TEACHER_ENCODER,
            "labelled_scenes": int((labelled.scenes["split"] == "train").sum()), "unlabelled_scenes": pseudo["scenes"],
            "threshold": threshold,
            "pseudo_kept_share": round(sum(kept.values()) / max(1, sum(pseudo["predicted_pixels"].values())), 3),
            **scores}


def levir_as_second(source: Path, out: Path) -> Path:
    """A SECOND-layout copy of LEVIR-CD (A/, B/, label/): im1/ and im2/ link the dates, label1/ marks changed
    pixels as land and label2/ as building (SECOND_CLASSES), unchanged pixels 0. No real SECOND data is in
    ../shared/data; this keeps LEVIR-CD's real images and change, with the semantics its change implies."""
    for folder in ("im1", "im2", "label1", "label2"):
        (out / folder).mkdir(parents=True)
    for label in sorted((source / "label").iterdir()):
        (out / "im1" / label.name).symlink_to((source / "A" / label.name).resolve())
        (out / "im2" / label.name).symlink_to((source / "B" / label.name).resolve())
        with rasterio.open(label) as src:
            changed = src.read(1) > 0
            profile = {"driver": "PNG", "height": src.height, "width": src.width, "count": 1, "dtype": "uint8"}
        for folder, value in (("label1", SECOND_CLASSES.index("land")), ("label2", SECOND_CLASSES.index("building"))):
            with rasterio.open(out / folder / label.name, "w", **profile) as dst:
                dst.write(np.where(changed, value, 0).astype(np.uint8)[None])
    return out


def second_row(budget: float, teacher_budget: float, threshold: float = 0.9) -> dict[str, Any]:
    """SECOND_STUDENTS and the teacher on LEVIR-CD made SECOND-style."""
    from rsseg.bench.datasets import RECIPES, SHARED_DATA
    from rsseg.data.prepare import prepare_dataset

    logging.getLogger("rsseg.client").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="rsseg-bench-second-") as tmp:
        source = levir_as_second(SHARED_DATA / RECIPES["levir"].folder, Path(tmp) / "second")
        prepare_dataset(source, Path(tmp) / "prepared", layout="second", classes=SECOND_CLASSES, tile_size=256,
                        overlap=0, val_fraction=0.4, name="levir-second", progress=False)
        data = PreparedData.load(Path(tmp) / "prepared")
        with throwaway_store(Path(tmp)):
            config = benchmark_config("levir", data.root, budget)
            teacher = train(replace(config, time_budget=teacher_budget, encoder=TEACHER_ENCODER), data)
            members = [(teacher.model, teacher.spec)]
            # Every pair's unchanged areas (validation ones too: validation scores semantics on changed pixels
            # only, and the filled set keeps prepare's split of the same scenes).
            pseudo = pseudo_label_loaded(members, PseudoLabelConfig(
                teacher=f"{TEACHER_ENCODER} ({teacher_budget:.0f} s)", source=str(source),
                out=str(Path(tmp) / "pseudo"), threshold=threshold, overlap=0))
            filled = PreparedData.load(pseudo["out"])
            students = {
                SECOND_STUDENTS[0]: train(config, data),
                SECOND_STUDENTS[1]: train(replace(config, data=str(filled.root)), filled),
                SECOND_STUDENTS[2]: train(config, data, teacher=members[0]),
            }
            scores = {label: _score(result, data.root) for label, result in [("teacher", teacher), *students.items()]}
    kept = sum(pseudo["kept_pixels"].values()) / max(1, sum(pseudo["predicted_pixels"].values()))
    return {"dataset": "levir-second", "metric": teacher.spec.dataset.headline_metric, "budget_s": budget,
            "teacher_budget_s": teacher_budget, "teacher_encoder": TEACHER_ENCODER, "pairs": len(data.scenes),
            "threshold": threshold, "pseudo_kept_share": round(kept, 3), **scores}


def _score(result: Any, data: Path) -> float:
    summary = evaluate_loaded([(result.model, result.spec)], EvaluateConfig(model="bench", data=str(data), tag=False))
    return round(float(summary["headline"]), 4)


def format_pseudo_table(rows: list[dict[str, Any]]) -> str:
    return _table(rows, "labelled / unlabelled scenes", STUDENTS,
                  lambda r: f"{r['labelled_scenes']} / {r['unlabelled_scenes']} (kept")


def format_second_table(rows: list[dict[str, Any]]) -> str:
    return _table(rows, "pairs", SECOND_STUDENTS, lambda r: f"{r['pairs']} (unchanged pixels kept")


def _table(rows: list[dict[str, Any]], data_column: str, students: Sequence[str],
           data_cell: Callable[[dict[str, Any]], str]) -> str:
    lines = [f"| dataset (metric) | {data_column} | teacher | " + " | ".join(students) + " |",
             "|---" * (3 + len(students)) + "|"]
    for r in rows:
        teacher = f"{r['teacher']:.3f} ({r['teacher_encoder']}, {r['teacher_budget_s']:.0f} s)"
        lines.append(f"| {r['dataset']} ({r['metric']}) | {data_cell(r)} {r['pseudo_kept_share']:.0%} at "
                     f"{r['threshold']}) | {teacher} | " + " | ".join(f"{r[s]:.3f}" for s in students) + " |")
    return "\n".join(lines)
