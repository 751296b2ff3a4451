"""`pseudo_label`: the teacher's classes where it is sure, the ignore index elsewhere, as a prepared dataset that
records its teacher and threshold and trains like any other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from mlflow import MlflowClient

from rsseg.config import PseudoLabelConfig
from rsseg.data.datasets import PreparedData
from rsseg.errors import ConfigError, DataError
from rsseg.pseudo_labels import IGNORED, ConfidentTeacher, pseudo_label, unlabelled_images
from rsseg.spec import DatasetSpec, ModelSpec, OutputGroup
from rsseg.tracked_training import train_and_register
from rsseg.training import train
from tests.conftest import tiny_config


class _FixedLogits:
    """A stand-in teacher whose logits are given."""

    def __init__(self, logits: np.ndarray) -> None:
        dataset = DatasetSpec(name="t", task="multiclass", classes=["a", "b", "c"], colors=[[0, 0, 0]] * 3,
                              bands=[1, 2, 3])
        self.spec = ModelSpec(dataset=dataset, architecture="unet", encoder="e", in_channels=3,
                              outputs=[OutputGroup("classes", 3)])
        self._logits = logits

    def logits(self, tiles: np.ndarray) -> np.ndarray:
        return self._logits


def test_confident_teacher_keeps_exactly_the_pixels_at_or_above_the_threshold():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(2, 3, 8, 8)).astype(np.float32)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = exp / exp.sum(axis=1, keepdims=True)
    teacher = ConfidentTeacher(_FixedLogits(logits), threshold=0.8)
    maps = teacher.class_maps(np.zeros((2, 8, 8, 3), dtype=np.uint8))[:, 0]
    sure = probabilities.max(axis=1) >= 0.8
    assert 0 < sure.mean() < 1  # the check means something
    np.testing.assert_array_equal(maps[sure], probabilities.argmax(axis=1)[sure])
    assert (maps[~sure] == IGNORED).all()
    np.testing.assert_array_equal(teacher.predicted, np.bincount(probabilities.argmax(axis=1).ravel(), minlength=3))
    np.testing.assert_array_equal(teacher.kept, np.bincount(probabilities.argmax(axis=1)[sure], minlength=3))


def test_mixed_dataset_takes_its_share_of_each_part():
    from rsseg.data.datasets import MixedDataset

    mixed = MixedDataset([list(range(10)), list("abc")], [10, 7])
    assert len(mixed) == 17
    assert [mixed[i] for i in range(10)] == list(range(10))
    assert [mixed[i] for i in range(10, 17)] == list("abcabca")  # the small part repeats
    with pytest.raises(ConfigError, match="one share > 0 each"):
        MixedDataset([[1]], [0])


@pytest.mark.slow
def test_mixing_refuses_datasets_of_other_classes(seaice_prepared, change_prepared, tmp_path):
    with pytest.raises(ConfigError, match="differ from the first dataset's"):
        train(tiny_config(seaice_prepared, tmp_path, epochs=1), PreparedData.load(seaice_prepared),
              extra=[PreparedData.load(change_prepared)])
    with pytest.raises(ConfigError, match="one share > 0 per dataset"):
        train(tiny_config(seaice_prepared, tmp_path, epochs=1, mix="1:0"), PreparedData.load(seaice_prepared),
              extra=[PreparedData.load(seaice_prepared)])


def test_unlabelled_images_are_found_or_named(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "b.tif").write_bytes(b"x")
    (tmp_path / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "images" / "notes.txt").write_text("x")
    assert [p.name for p in unlabelled_images(tmp_path)] == ["a.png", "b.tif"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        unlabelled_images(tmp_path / "empty")
    with pytest.raises(ConfigError, match="name the teacher"):
        pseudo_label(PseudoLabelConfig(source=str(tmp_path)))


@pytest.mark.slow
def test_pseudo_label_writes_a_prepared_dataset_that_trains(seaice_prepared, mlflow_store, tmp_path):
    teacher = train_and_register(tiny_config(seaice_prepared, tmp_path / "t", epochs=2, model_name="teacher"))
    source = seaice_prepared.parent / "source"
    out = tmp_path / "pseudo"
    loose = pseudo_label(PseudoLabelConfig(teacher=f"models:/teacher/{teacher['model_version']}",
                                           source=str(source), out=str(tmp_path / "loose"), threshold=0.5))
    summary = pseudo_label(PseudoLabelConfig(teacher=f"models:/teacher/{teacher['model_version']}",
                                             source=str(source), out=str(out), threshold=0.7))
    data = PreparedData.load(out)
    provenance = data.spec.provenance
    assert provenance["kind"] == "pseudo_label" and provenance["threshold"] == 0.7
    assert provenance["members"] == [f"teacher v{teacher['model_version']}"]
    assert summary["scenes"] == len(unlabelled_images(source)) == len(data.scenes)
    assert set(provenance["kept_share"]) == {"background", "ice"}
    assert data.spec.classes == ["background", "ice"] and data.spec.mask_encoding == "index"

    kept = np.zeros(2, dtype=np.int64)
    for mask in sorted((tmp_path / "pseudo-labels" / "masks").glob("*.tif")):
        with rasterio.open(mask) as strict, rasterio.open(tmp_path / "loose-labels" / "masks" / mask.name) as lax:
            a, b = strict.read(1), lax.read(1)
        assert set(np.unique(a)) <= {0, 1, IGNORED}
        sure = a != IGNORED
        np.testing.assert_array_equal(a[sure], b[sure])  # a higher threshold keeps a subset, same classes
        kept += np.bincount(a[sure].ravel(), minlength=2)
    assert kept.tolist() == [provenance["kept_pixels"]["background"], provenance["kept_pixels"]["ice"]]
    assert sum(loose["kept_pixels"].values()) >= kept.sum()

    run = MlflowClient().get_run(summary["run_id"])
    assert run.data.params["threshold"] == "0.7" and "kept_share_background" in run.data.metrics

    result = train(tiny_config(out, tmp_path / "s", epochs=1), data)  # a prepared dataset like any other
    assert result.spec.dataset.name == "pseudo"
    # labelled + pseudo-labelled, mixed 1:2, validated on the labelled data's split
    mixed = train_and_register(tiny_config(f"{seaice_prepared},{out}", tmp_path / "m", epochs=1, mix="1:2",
                                           model_name="student"))
    assert mixed["model_version"] == "1"

    with pytest.raises(ConfigError, match="is not empty"):
        pseudo_label(PseudoLabelConfig(teacher="models:/teacher/1", source=str(source), out=str(out)))
    with pytest.raises(ConfigError, match="no such registered version"):
        pseudo_label(PseudoLabelConfig(teacher="models:/nobody/1", source=str(source), out=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists() and not Path(str(tmp_path / "x") + "-labels").exists()


def _write(path: Path, band: np.ndarray) -> Path:
    from rasterio.transform import from_origin

    bands = band if band.ndim == 3 else band[None]
    with rasterio.open(path, "w", driver="GTiff", height=bands.shape[1], width=bands.shape[2], count=len(bands),
                       dtype="uint8", crs="EPSG:32633", transform=from_origin(0, 0, 1, 1)) as dst:
        dst.write(bands.astype(np.uint8))
    return path


def test_the_unchanged_area_rule_never_touches_labelled_pixels(change_prepared, tmp_path):
    from types import SimpleNamespace

    from rsseg.data.layouts import Scene
    from rsseg.pseudo_labels import UnchangedAreaTeacher
    from rsseg.spec import output_groups_for

    dataset = PreparedData.load(change_prepared).spec  # SECOND-style: semantic classes 0 (unchanged)..3
    spec = ModelSpec(dataset=dataset, architecture="siamese_unet", encoder="e", in_channels=6,
                     outputs=output_groups_for(dataset))
    teacher = UnchangedAreaTeacher(SimpleNamespace(spec=spec), threshold=0.9)
    rng = np.random.default_rng(0)
    shape = (40, 30)
    a = rng.choice([0, 0, 0, 1, 2, 3, IGNORED], size=shape).astype(np.uint8)
    b = np.where(a == 0, rng.choice([0, 0, 0, 2], size=shape), rng.choice([1, 2, 3], size=shape)).astype(np.uint8)
    b[a == IGNORED] = IGNORED
    likeliest = rng.integers(1, 4, size=shape).astype(np.uint8)
    sure = np.where(rng.random(shape) < 0.6, likeliest, IGNORED).astype(np.uint8)
    scene = Scene("s", tmp_path / "im1.tif", _write(tmp_path / "a.tif", a), image_b=tmp_path / "im2.tif",
                  mask_b=_write(tmp_path / "b.tif", b))
    outputs = {name: tmp_path / f"{name}.tif" for name in ("label1", "label2", "change")}
    teacher.fill(scene, _write(tmp_path / "classes.tif", np.stack([sure, likeliest])), outputs, block=16)
    with rasterio.open(outputs["label1"]) as f1, rasterio.open(outputs["label2"]) as f2, \
            rasterio.open(outputs["change"]) as fc:
        a2, b2, change = f1.read(1), f2.read(1), fc.read(1)

    unchanged = (a == 0) & (b == 0)
    assert unchanged.any() and (~unchanged).any()
    np.testing.assert_array_equal(a2[~unchanged], a[~unchanged])  # labelled (and ignored) pixels untouched
    np.testing.assert_array_equal(b2[~unchanged], b[~unchanged])
    filled = unchanged & (sure != IGNORED)
    np.testing.assert_array_equal(a2[filled], sure[filled])  # the same class on both dates
    np.testing.assert_array_equal(b2[filled], sure[filled])
    assert (a2[unchanged & ~filled] == 0).all() and (b2[unchanged & ~filled] == 0).all()  # unsure: still unknown
    np.testing.assert_array_equal(change, np.where(a == IGNORED, IGNORED, (a != 0).astype(np.uint8)))
    assert teacher.kept.tolist() == np.bincount(sure[filled], minlength=4)[1:].tolist()
    assert teacher.predicted.tolist() == np.bincount(likeliest[unchanged], minlength=4)[1:].tolist()


def test_explicit_change_masks_keep_the_change_target_apart_from_filled_semantics(change_prepared):
    from rsseg.data.masks import change_targets

    dataset = PreparedData.load(change_prepared).spec
    a = np.array([[0, 2, 3, IGNORED]], dtype=np.uint8)  # pixel 0 and 1 filled/unchanged, 2 changed
    change = np.array([[0, 0, 1, IGNORED]], dtype=np.uint8)
    targets = change_targets(a[..., None], a[..., None], dataset, change[..., None])
    assert targets["change"].tolist() == [[0, 0, 1, IGNORED]]
    assert targets["semantic_a"].tolist() == [[IGNORED, 2, 3, IGNORED]]  # filled unchanged pixels train too
    assert change_targets(a[..., None], a[..., None], dataset)["change"].tolist() == [[0, 1, 1, IGNORED]]


@pytest.mark.slow
def test_second_pseudo_labels_fill_unchanged_areas_and_train(change_prepared, mlflow_store, tmp_path):
    from rsseg.evaluation import labelled_scenes, scene_targets

    teacher = train_and_register(tiny_config(change_prepared, tmp_path / "t", epochs=1, model_name="change-teacher"))
    source = change_prepared.parent / "source"
    out = tmp_path / "pseudo"
    summary = pseudo_label(PseudoLabelConfig(teacher=f"models:/change-teacher/{teacher['model_version']}",
                                             source=str(source), out=str(out), threshold=0.3))
    data, original = PreparedData.load(out), PreparedData.load(change_prepared)
    assert data.spec.semantic_classes == original.spec.semantic_classes
    assert summary["rule"].startswith("unchanged areas") and summary["scenes"] == len(original.scenes)
    assert sum(summary["kept_pixels"].values()) > 0  # something was filled at this threshold
    assert all(data.scenes["mask_change"].astype(bool))
    mine = {s.name: s for split in ("train", "val") for s in labelled_scenes(data, split)}
    for split in ("train", "val"):
        for scene in labelled_scenes(original, split):
            before, after = scene_targets(scene, original), scene_targets(mine[scene.name], data)
            np.testing.assert_array_equal(after["change"], before["change"])  # change never moves
            changed = before["change"] == 1
            for name in ("semantic_a", "semantic_b"):
                np.testing.assert_array_equal(after[name][changed], before[name][changed])
    result = train(tiny_config(out, tmp_path / "s", epochs=1), data)  # trains like any SECOND dataset
    assert result.history


def test_the_pseudo_label_benchmark_tables_name_every_student():
    from rsseg.bench.pseudo import SECOND_STUDENTS, STUDENTS, format_pseudo_table, format_second_table

    common = {"dataset": "d", "metric": "miou", "pseudo_kept_share": 0.5, "threshold": 0.9, "teacher": 0.6,
              "teacher_encoder": "e", "teacher_budget_s": 300}
    table = format_pseudo_table([{**common, "labelled_scenes": 3, "unlabelled_scenes": 6,
                                  **{s: 0.1 * i for i, s in enumerate(STUDENTS)}}])
    header, rule, row = table.splitlines()
    assert header.count("|") == rule.count("|") == row.count("|") == len(STUDENTS) + 4
    assert "3 / 6 (kept 50% at 0.9)" in row and row.endswith("| 0.400 |")
    second = format_second_table([{**common, "pairs": 7, **{s: 0.2 for s in SECOND_STUDENTS}}])
    assert second.splitlines()[2].count("|") == len(SECOND_STUDENTS) + 4
