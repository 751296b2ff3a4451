"""Snapshot ensembles (one run, one version per cosine cycle) and ensemble promotion: the members' logits
averaged by one served segmenter, evaluated before it may replace the champion, registered as a version,
rolled back like any other; mismatched members are refused with nothing changed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from rsseg.client.oneshot import connect, infer_tiles, served_spec
from rsseg.config import PromoteConfig, TrainConfig
from rsseg.data.datasets import PreparedData
from rsseg.errors import ConfigError, PromotionRefused
from rsseg.optim import FLOOR, cycle_index, snapshot_factor
from rsseg.promotion import promote, rollback
from rsseg.served_check import onnx_class_maps, sample_tile
from rsseg.serving.repository import read_history, step_names
from rsseg.serving.server import TritonServer
from rsseg.spec import ModelSpec
from rsseg.tracked_training import train_and_register
from rsseg.tracking import ENSEMBLE_TAG, load_registered
from rsseg.training import train
from tests.conftest import tiny_config
from tests.test_promotion import tree_digest

NAME = "ensembled"


def test_snapshot_schedule_restarts_each_cycle():
    cycles = 3
    assert snapshot_factor(0.0, 0.0, cycles) == pytest.approx(1.0)
    for c in range(cycles):
        start, end = c / cycles, (c + 1) / cycles
        assert snapshot_factor(start + 1e-9, 0.0, cycles) == pytest.approx(1.0, abs=1e-6)  # warm restart
        assert snapshot_factor(end - 1e-9, 0.0, cycles) == pytest.approx(FLOOR, abs=1e-6)  # a snapshot's low point
        assert cycle_index(start + 1e-9, cycles) == c
    assert cycle_index(1.0, cycles) == cycles - 1
    assert snapshot_factor(0.01, 0.03, cycles) == pytest.approx(1 / 3)  # warm-up (3 % of the run): first cycle only
    assert snapshot_factor(1 / 3 + 0.01, 0.03, cycles) > 0.99
    with pytest.raises(ConfigError, match="scheduler=cosine"):
        TrainConfig(snapshots=True, scheduler="constant")


@pytest.mark.slow
def test_snapshots_are_the_weights_at_each_cycle_end(seaice_prepared, tmp_path):
    result = train(tiny_config(seaice_prepared, tmp_path, epochs=3, snapshots=True, cycles=3),
                   PreparedData.load(seaice_prepared))
    assert [s["cycle"] for s in result.snapshots] == [0, 1, 2]
    weights = [torch.cat([p.flatten() for p in s["model"].parameters()]) for s in result.snapshots]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    for shot in result.snapshots:
        assert not shot["model"].training and "val_iou_target" in shot["metrics"]


@pytest.fixture
def snapshot_versions(seaice_prepared, mlflow_store, tmp_path) -> list[str]:
    summary = train_and_register(tiny_config(seaice_prepared, tmp_path, epochs=3, snapshots=True, cycles=3,
                                             model_name=NAME))
    assert summary["model_version"] == "1"
    return summary["snapshot_versions"]


@pytest.mark.slow
@pytest.mark.triton
def test_ensemble_promote_serve_and_roll_back(snapshot_versions, seaice_prepared, tmp_path):
    client = MlflowClient()
    assert snapshot_versions == ["2", "3", "4"]
    assert client.get_model_version(NAME, "3").tags["snapshot"] == "2/3"
    repo = tmp_path / "repo"
    promote(PromoteConfig(model_name=NAME, version="1", repo=str(repo)))

    # ensemble_top=1 is no ensemble; both ways of naming members at once is refused: nothing changes
    before = tree_digest(repo)
    with pytest.raises(ConfigError, match="at least 2 versions"):
        promote(PromoteConfig(model_name=NAME, ensemble="2", repo=str(repo)))
    with pytest.raises(ConfigError, match="not both"):
        promote(PromoteConfig(model_name=NAME, ensemble="2,3", ensemble_top=2, repo=str(repo)))
    assert tree_digest(repo) == before

    try:
        summary = promote(PromoteConfig(model_name=NAME, ensemble=",".join(snapshot_versions), repo=str(repo)))
    except PromotionRefused as refused:  # a tiny model: the ensemble need not beat version 1 ...
        assert "does not beat champion" in str(refused) and tree_digest(repo) == before
        summary = promote(PromoteConfig(model_name=NAME, ensemble=",".join(snapshot_versions), repo=str(repo),
                                        margin=-1.0))  # ... so let it through to test serving and rollback
    ensemble = summary["version"]
    assert summary["members"] == snapshot_versions and summary["previous_champion"] == "1"
    registered = client.get_model_version(NAME, ensemble)
    assert registered.tags[ENSEMBLE_TAG] == "2,3,4" and "eval_iou_target" in registered.tags
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == ensemble

    segmenter = repo / step_names(NAME)["segmenter"] / str(read_history(repo, NAME)["served"])
    onnx = sorted(segmenter.glob("member*.onnx"))
    assert [p.name for p in onnx] == ["member0.onnx", "member1.onnx", "member2.onnx"]
    spec = ModelSpec.load(segmenter / "model_spec.json")
    tiles = np.stack([sample_tile(spec, seed=s) for s in range(3)])
    with TritonServer(repo) as server:
        server.wait_model_ready(NAME)
        served = infer_tiles(server.grpc_url, NAME, tiles)
        info = served_spec(connect(server.grpc_url), NAME)
    assert [m["model_version"] for m in info["members"]] == snapshot_versions
    np.testing.assert_array_equal(served, onnx_class_maps(onnx, spec, tiles))  # the average of the members
    model, _ = load_registered(NAME, ensemble)
    with torch.no_grad():  # and it is not just one member's answer
        logits = [m(torch.randn(1, 3, 64, 64)) for m in model.members]
    assert not torch.equal(logits[0], logits[1])

    back = rollback(PromoteConfig(model_name=NAME, repo=str(repo)))
    assert back["version"] == "1" and str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    with TritonServer(repo) as server:
        server.wait_model_ready(NAME)
        assert served_spec(connect(server.grpc_url), NAME)["members"] is None


@pytest.mark.slow
def test_a_mismatched_ensemble_is_refused_and_changes_nothing(seaice_prepared, mlflow_store, tmp_path):
    train_and_register(tiny_config(seaice_prepared, tmp_path / "a", epochs=1, model_name=NAME))
    train_and_register(tiny_config(seaice_prepared, tmp_path / "b", epochs=1, model_name=NAME,
                                   normalization="dataset"))
    repo = tmp_path / "repo"
    repo.mkdir()
    before = tree_digest(repo)
    with pytest.raises(ConfigError, match=r"v1 and .* v2 differ in normalisation mean"):
        promote(PromoteConfig(model_name=NAME, ensemble="1,2", repo=str(repo)))
    with pytest.raises(ConfigError, match="has no version 7"):
        promote(PromoteConfig(model_name=NAME, ensemble="1,7", repo=str(repo)))
    assert tree_digest(repo) == before
    assert len(MlflowClient().search_model_versions(f"name='{NAME}'")) == 2  # nothing registered


def test_bench_ensembles_table_layout():
    from rsseg.bench.ensembles import format_ensemble_table

    row = {"dataset": "dubai", "metric": "miou", "budget_s": 300.0, "cycles": 3, "single": 0.5, "last_snapshot": 0.48,
           "snapshot_ensemble": 0.52, "snapshot_val": [0.3, 0.45, 0.5], "one_model_tiles_per_s": 5.0,
           "ensemble_tiles_per_s": 1.7}
    lines = format_ensemble_table([row]).splitlines()
    assert len(lines) == 3 and lines[0].count("|") == lines[2].count("|")
    assert "| dubai (miou) | 300 s | 0.500 | 0.480 | 0.520 (3 members) | 0.300, 0.450, 0.500 | 5.0 / 1.7 |" in lines
