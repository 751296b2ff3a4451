"""`evaluate`: a model scored the way it is served, logged in `rsseg-evaluations`, tagged on its version;
ensembles of versions; the same figures through a real Triton server as in process."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from rsseg.config import EvaluateConfig, PromoteConfig
from rsseg.data.datasets import PreparedData
from rsseg.errors import ConfigError
from rsseg.evaluation import OnnxModel, labelled_scenes, scene_targets, served_predictor
from rsseg.export.onnx import export_onnx
from rsseg.promotion import promote
from rsseg.scoring import evaluate
from rsseg.spec import ensemble_spec
from rsseg.tracked_training import train_and_register
from rsseg.tracking import expand_model_uris, load_model_uri
from tests.conftest import tiny_config

NAME = "evaluated"


@pytest.fixture
def registered(seaice_prepared, mlflow_store, tmp_path) -> str:
    """Two versions of a tiny sea-ice model (different seeds)."""
    for seed in (0, 1):
        train_and_register(tiny_config(seaice_prepared, tmp_path / f"v{seed}", epochs=1, seed=seed, model_name=NAME))
    return NAME


def _hand_scored(data: PreparedData, uri: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The served maps of every validation scene (the client's tiling, ONNX Runtime) and, by hand, the
    2x2 confusion matrix over the valid pixels of all of them."""
    model, spec = load_model_uri(uri)
    with tempfile.TemporaryDirectory() as tmp:
        predict = served_predictor(OnnxModel(export_onnx(model, spec, Path(tmp) / "m.onnx"), spec), data)
        matrix = np.zeros((2, 2), dtype=np.int64)
        maps = {}
        for scene in labelled_scenes(data, "val"):
            predicted = predict(scene)["classes"].astype(np.int64)
            target = scene_targets(scene, data)["classes"].astype(np.int64)
            valid = target != data.spec.ignore_index
            for t, p in zip(target[valid], predicted[valid], strict=True):
                matrix[t, p] += 1
            maps[scene.name] = predicted
    return matrix, maps


@pytest.mark.slow
def test_evaluate_equals_a_hand_computed_confusion_matrix_and_tags_the_version(registered, seaice_prepared):
    data = PreparedData.load(seaice_prepared)
    summary = evaluate(EvaluateConfig(model=f"models:/{registered}/1"))  # data: the one it was trained on
    assert summary["data"] == str(seaice_prepared) and summary["where"] == "onnxruntime in process"

    matrix, _ = _hand_scored(data, f"models:/{registered}/1")
    tp, fn, fp, tn = matrix[1, 1], matrix[1, 0], matrix[0, 1], matrix[0, 0]
    iou_target = tp / (tp + fp + fn) if tp + fp + fn else math.nan
    iou_background = tn / (tn + fn + fp) if tn + fn + fp else math.nan
    metrics = summary["metrics"]
    assert metrics["iou_target"] == pytest.approx(iou_target, nan_ok=True)
    assert metrics["iou_background"] == pytest.approx(iou_background, nan_ok=True)
    assert metrics["oa"] == pytest.approx((tp + tn) / matrix.sum())
    assert summary["headline"] == metrics["iou_target"]

    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "rsseg-evaluations"
    assert run.data.metrics["oa"] == pytest.approx(metrics["oa"])
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])} | {
        a.path for a in client.list_artifacts(summary["run_id"], "figures")}
    assert {"per_scene.csv", "evaluation.json", "figures/confusion_matrix.png"} <= artifacts
    with tempfile.TemporaryDirectory() as tmp:
        table = pd.read_csv(client.download_artifacts(summary["run_id"], "per_scene.csv", tmp))
    assert len(table) == len(labelled_scenes(data, "val"))
    assert list(table["iou_target"].fillna(np.inf)) == sorted(table["iou_target"].fillna(np.inf))  # worst first

    tags = client.get_model_version(registered, "1").tags
    assert float(tags["eval_iou_target"]) == pytest.approx(metrics["iou_target"], rel=1e-5, nan_ok=True)
    assert tags["eval_run_id"] == summary["run_id"] and tags["eval_split"] == "val"
    assert "eval_iou_target" not in client.get_model_version(registered, "2").tags

    # a folder of labelled scenes (not prepared): prepared on the fly, every scene scored
    folder = evaluate(EvaluateConfig(model=f"models:/{registered}/1", data=str(seaice_prepared.parent / "source"),
                                     tag=False))
    assert folder["split"] == "all" and folder["scenes"] == len(data.scenes)
    assert folder["data"] == str(seaice_prepared.parent / "source")


@pytest.mark.slow
def test_an_ensemble_of_a_model_with_itself_is_that_model(registered):
    single = evaluate(EvaluateConfig(model=f"models:/{registered}/1", tag=False))
    twice = evaluate(EvaluateConfig(model=f"models:/{registered}/1,1"))
    assert twice["members"] == [f"{registered} v1", f"{registered} v1"]
    assert twice["metrics"] == single["metrics"]
    both = evaluate(EvaluateConfig(model=f"models:/{registered}/1,2"))  # two different models: averaged
    assert both["members"] == [f"{registered} v1", f"{registered} v2"] and "tagged" not in both
    assert "eval_miou" not in MlflowClient().get_model_version(registered, "2").tags  # ensembles tag no member


def test_model_lists_expand_to_one_uri_per_member():
    assert expand_model_uris("models:/a/3,5, 7") == ["models:/a/3", "models:/a/5", "models:/a/7"]
    assert expand_model_uris("models:/a@champion,models:/b/2,runs:/abc") == [
        "models:/a@champion", "models:/b/2", "runs:/abc"]


def test_ensemble_members_must_agree_on_what_goes_in_and_out(seaice_prepared):
    from rsseg.spec import ModelSpec

    spec = ModelSpec.from_dict(json.loads(json.dumps({
        "dataset": PreparedData.load(seaice_prepared).spec.to_dict(), "architecture": "unet", "encoder": "e",
        "in_channels": 3, "outputs": [{"name": "classes", "channels": 2}], "tile_size": 64, "tile_sizes": [64, 96, 128],
        "stride": 32, "model_name": "m", "model_version": "1"})))
    other = ModelSpec.from_dict({**spec.to_dict(), "stride": 16, "tile_sizes": [64, 80, 96], "model_version": "2",
                                 "architecture": "deeplabv3plus"})
    combined = ensemble_spec([spec, other])
    assert combined.stride == 32 and combined.tile_sizes == [64, 96] and combined.architecture == "unet+deeplabv3plus"
    assert [m["model_version"] for m in combined.members] == ["1", "2"]
    moved = ModelSpec.from_dict({**spec.to_dict(), "model_version": "3"})
    moved.dataset.mean = [m + 1 for m in moved.dataset.mean]
    with pytest.raises(ConfigError, match=r"m v1 and m v3 differ in normalisation mean"):
        ensemble_spec([spec, moved])


def test_evaluate_names_what_is_missing(mlflow_store):
    with pytest.raises(ConfigError, match="name a model"):
        evaluate(EvaluateConfig())
    with pytest.raises(ConfigError, match="no such registered version"):
        evaluate(EvaluateConfig(model="models:/nobody/1"))


@pytest.mark.slow
@pytest.mark.triton
def test_evaluate_through_triton_equals_evaluate_in_process(registered, tmp_path):
    from rsseg.serving.server import TritonServer

    repo = tmp_path / "repo"
    promote(PromoteConfig(model_name=registered, version="1", repo=str(repo)))
    local = evaluate(EvaluateConfig(model=f"models:/{registered}/1", tag=False))
    with TritonServer(repo) as server:
        server.wait_model_ready(registered)
        served = evaluate(EvaluateConfig(model=f"models:/{registered}/1", url=server.grpc_url, tag=False))
        unnamed = evaluate(EvaluateConfig(url=server.grpc_url, data=local["data"], tag=False))
        with pytest.raises(ConfigError, match="leave model empty"):
            evaluate(EvaluateConfig(model=f"models:/{registered}/2", url=server.grpc_url))
    assert served["where"].startswith("triton") and served["metrics"] == local["metrics"]
    assert unnamed["metrics"] == local["metrics"]
