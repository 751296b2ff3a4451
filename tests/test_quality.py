"""Scoring like the server (whole scenes through the client's tiling) and the quality benchmark's row,
on generated data: the benchmark itself runs on ../shared/data (`python -m pipelines.bench_quality`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.bench_quality import parse_overrides
from rsseg.bench.quality import format_table, quality_row, trivial_baseline
from rsseg.config import parse_options
from rsseg.data.datasets import PreparedData
from rsseg.errors import ConfigError
from rsseg.evaluation import (
    Evaluator,
    OnnxModel,
    labelled_scenes,
    scene_targets,
    score_scenes,
    served_predictor,
    whole_image_predictor,
)
from rsseg.export.onnx import export_onnx
from rsseg.metrics import ConfusionMatrix, binary_metrics
from rsseg.training import train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained(seaice_prepared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    data = PreparedData.load(seaice_prepared)
    result = train(tiny_config(seaice_prepared, tmp, epochs=1), data)
    onnx = export_onnx(result.model, result.spec, tmp / "model.onnx")
    return data, result, OnnxModel(onnx, result.spec)


def test_served_scores_are_the_task_metrics_of_the_stitched_maps(trained):
    data, result, model = trained
    scenes = labelled_scenes(data, "val")
    assert scenes and all(s.name in set(data.scenes["scene"]) for s in scenes)
    predict = served_predictor(model, data, tile=64, margin=16)  # several windows per 96 x 96 scene
    metrics, rows = score_scenes(data, result.spec, scenes, predict)
    confusion = ConfusionMatrix(2)
    for scene in scenes:
        maps = predict(scene)
        assert maps["classes"].shape == (scene.height, scene.width)
        confusion.update(maps["classes"], scene_targets(scene, data)["classes"])
    assert metrics["iou_target"] == pytest.approx(binary_metrics(confusion)["iou_target"])
    assert [r["scene"] for r in rows] == [s.name for s in scenes]


def test_a_scene_that_fits_one_window_is_served_as_the_whole_image(trained):
    data, result, model = trained
    scenes = labelled_scenes(data, "val")
    served = served_predictor(model, data)  # default tile choice: 96 fits one window
    whole = whole_image_predictor(model, data)
    for scene in scenes:
        np.testing.assert_array_equal(served(scene)["classes"], whole(scene)["classes"])


def test_evaluator_from_maps_equals_from_logits(trained):
    _, result, _ = trained
    logits = torch.randn(2, 2, 16, 16)
    target = torch.randint(0, 2, (2, 16, 16))
    a, b = Evaluator(result.spec), Evaluator(result.spec)
    a.update(logits, {"classes": target})
    b.update_maps({"classes": logits.argmax(1).numpy()}, {"classes": target.numpy()})
    assert a.compute() == b.compute()


def test_benchmark_overrides_keep_list_values_whole():
    assert parse_overrides(["lr=0.002", "augment=hflip,rot90,swap_dates", "model_options=kernel_size=3;attention=none",
                            "model_options=decoder_block=inverted_residual", "channels_last=false"]) == {
        "lr": 0.002, "augment": "hflip,rot90,swap_dates", "model_options": "decoder_block=inverted_residual",
        "channels_last": False}
    assert parse_overrides(["model_options=kernel_size=3;attention=none"]) == {
        "model_options": "kernel_size=3,attention=none"}


def test_model_options_keep_bracketed_lists_whole():
    assert parse_options("decoder_channels=(64,32,16,8),attention=none,kernel_size=3") == {
        "decoder_channels": "(64,32,16,8)", "attention": "none", "kernel_size": 3}
    with pytest.raises(ConfigError, match="key=value"):
        parse_options("decoder_channels=(64,32),16")


@pytest.mark.slow
def test_quality_row_trains_both_recipes_and_scores_them_alike(seaice_prepared, tmp_path):
    """Ours (tiny encoder) and the smp peer script, 4 s each: every figure of the table is there."""
    data = PreparedData.load(seaice_prepared)
    config = tiny_config(seaice_prepared, tmp_path, epochs=10_000, time_budget=4.0, register=False)
    row = quality_row("generated", data, config, tta="flips")
    for key in ("ours_served", "ours_whole_image", "ours_served_tta", "peer", "baseline", "ours_minus_peer"):
        assert 0.0 <= abs(row[key]) <= 1.0, (key, row[key])
    assert row["peer_train_s"] >= 4.0 and row["peer_steps"] >= 1
    assert row["baseline"] == pytest.approx(trivial_baseline(data, _spec(data, config, tmp_path), labelled_scenes(data)), abs=1e-4)
    assert row["ours_minus_peer"] == pytest.approx(row["ours_served"] - row["peer"], abs=1e-3)
    table = format_table([row])
    assert "| generated | 4 s | iou_target |" in table


def _spec(data, config, tmp_path):
    from rsseg.model_setup import build_model

    return build_model(config, data.spec, 64)[1]
