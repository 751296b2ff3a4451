"""`audit`: every tile of a dataset scored against its labels through the served tiling, worst first, and an
exclusion list that `train -P exclude=` honours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from mlflow import MlflowClient
from rasterio.transform import from_origin

from rsseg.audit import audit, audit_loaded, mark_exclusions
from rsseg.config import AuditConfig
from rsseg.data.datasets import PreparedData, RandomWindowDataset
from rsseg.data.exclusions import ExcludedAreas, drop_excluded, read_exclusions
from rsseg.data.prepare import prepare_dataset
from rsseg.errors import ConfigError, OutputError
from rsseg.spec import ModelSpec, OutputGroup
from rsseg.training import train
from tests.conftest import tiny_config

SIZE, TILE = 128, 64
CORRUPTED = ("scene_1", 64, 0)  # scene, row, col of the tile whose labels are inverted


class Brightness(torch.nn.Module):
    """A model that is right wherever the labels are: target = bright pixels (normalised input > 0)."""

    in_channels, out_channels, stride = 3, 2, 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=1, keepdim=True)
        return torch.cat([-m, m], dim=1) * 10


def _bright_dataset(root: Path, scenes: int = 3) -> Path:
    """Scenes of bright squares on a dark ground, masks = the squares; one tile's mask inverted."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(scenes):
        mask = np.zeros((SIZE, SIZE), dtype=np.uint8)
        for _ in range(6):
            r, c = rng.integers(0, SIZE - 24, 2)
            mask[r:r + 24, c:c + 24] = 1
        image = np.where(mask[None], 200, 50).astype(np.uint8).repeat(3, axis=0)
        image = np.clip(image + rng.integers(-10, 10, image.shape), 0, 255).astype(np.uint8)
        name = f"scene_{i}"
        if name == CORRUPTED[0]:
            _, r, c = CORRUPTED
            mask[r:r + TILE, c:c + TILE] = 1 - mask[r:r + TILE, c:c + TILE]
        profile = {"driver": "GTiff", "height": SIZE, "width": SIZE, "crs": "EPSG:32633",
                   "transform": from_origin(500000, 5000000, 10, 10)}
        with rasterio.open(root / "images" / f"{name}.tif", "w", count=3, dtype="uint8", **profile) as dst:
            dst.write(image)
        with rasterio.open(root / "masks" / f"{name}.tif", "w", count=1, dtype="uint8", **profile) as dst:
            dst.write(mask[None] * 255)
    prepare_dataset(root, root / "prepared", tile_size=TILE, overlap=0, val_fraction=0.34, progress=False)
    return root / "prepared"


@pytest.fixture
def bright(tmp_path: Path) -> tuple[PreparedData, list]:
    data = PreparedData.load(_bright_dataset(tmp_path / "bright"))
    spec = ModelSpec(dataset=data.spec, architecture="brightness", encoder="none", in_channels=3,
                     outputs=[OutputGroup("classes", 2)], tile_size=TILE)
    return data, [(Brightness(), spec)]


def test_the_worst_tile_is_the_one_with_corrupted_labels(bright, mlflow_store, tmp_path):
    data, members = bright
    out = tmp_path / "audit"
    summary = audit_loaded(members, AuditConfig(model="brightness", data=str(data.root), split="all", out=str(out),
                                                exclude_below=0.5))
    tiles = pd.read_csv(out / "tiles.csv", dtype={"scene": str})
    assert len(tiles) == len(data.tiles) == summary["tiles"]
    worst = tiles.iloc[0]
    assert (worst["scene"], worst["row"], worst["col"]) == CORRUPTED
    assert worst["iou_target"] < 0.1  # the model says the opposite of the inverted labels
    others = tiles.iloc[1:]["iou_target"].dropna()
    assert len(others) and (others > 0.9).all()  # everywhere else it agrees with the labels
    scenes = pd.read_csv(out / "scenes.csv", dtype={"scene": str})
    assert scenes.iloc[0]["scene"] == CORRUPTED[0]
    excluded = pd.read_csv(out / "exclude.csv", dtype={"scene": str})
    assert excluded.values.tolist() == [[*CORRUPTED, TILE]]
    assert (out / "worst_tiles.png").stat().st_size > 0
    run = MlflowClient().get_run(summary["run_id"])
    assert run.data.metrics["excluded_tiles"] == 1 and run.data.tags["kind"] == "audit"
    assert {a.path for a in MlflowClient().list_artifacts(summary["run_id"])} >= {"tiles.csv", "exclude.csv"}

    with pytest.raises(OutputError, match="--overwrite|overwrite"):  # an earlier audit is not replaced silently
        audit_loaded(members, AuditConfig(model="brightness", data=str(data.root), out=str(out)))
    again = audit_loaded(members, AuditConfig(model="brightness", data=str(data.root), split="all", out=str(out),
                                              exclude_share=0.25, overwrite=True))
    scored = int(np.isfinite(tiles["iou_target"]).sum())
    assert again["excluded_tiles"] == int(np.ceil(0.25 * scored))


def test_exclusions_by_share_skip_undefined_metrics():
    tiles = pd.DataFrame({"scene": ["a", "b", "c", "d"], "row": 0, "col": 0, "size": 64, "split": "train",
                          "iou_target": [0.1, 0.5, 0.9, np.nan]})
    assert mark_exclusions(tiles, "iou_target", 0.5, -1)["excluded"].tolist() == [True, True, False, False]
    assert mark_exclusions(tiles, "iou_target", 1.0, -1)["excluded"].tolist() == [True, True, True, False]
    assert mark_exclusions(tiles, "iou_target", 0.0, 0.6)["excluded"].tolist() == [True, True, False, False]


def test_exclusion_lists_must_name_tiles_of_the_dataset(tmp_path):
    tiles = pd.DataFrame({"scene": ["a", "a", "b"], "row": [0, 64, 0], "col": 0, "size": 64})
    listed = tmp_path / "exclude.csv"
    listed.write_text("scene,row,col,size\na,64,0,64\n")
    assert drop_excluded(tiles, read_exclusions(listed, tiles)).values.tolist() == [["a", 0, 0, 64], ["b", 0, 0, 64]]
    listed.write_text("scene,row,col,size\nz,0,0,64\n")
    with pytest.raises(ConfigError, match="not tiles of this dataset"):
        read_exclusions(listed, tiles)
    listed.write_text("scene,top\na,0\n")
    with pytest.raises(ConfigError, match="columns row, col, size missing"):
        read_exclusions(listed, tiles)


def test_random_windows_avoid_excluded_tiles(bright):
    data, _ = bright
    train_tiles, _ = data.split_tiles(-1)
    excluded = train_tiles[train_tiles["scene"] == train_tiles["scene"].iloc[0]].iloc[:2][["scene", "row", "col", "size"]]
    areas = ExcludedAreas(excluded)
    plain = RandomWindowDataset(data, train_tiles, 32)
    avoiding = RandomWindowDataset(data, train_tiles, 32, excluded=areas)

    def centred_in_excluded(dataset: RandomWindowDataset) -> int:
        return sum(areas.covers(scene, w.row + 16, w.col + 16)
                   for scene, w in (dataset.window(i) for i in range(len(dataset))))

    assert centred_in_excluded(plain) > 0  # the check means something
    assert centred_in_excluded(avoiding) == 0


@pytest.mark.slow
def test_audit_entry_point_and_train_exclude(seaice_prepared, mlflow_store, tmp_path):
    from rsseg.tracked_training import train_and_register

    trained = train_and_register(tiny_config(seaice_prepared, tmp_path / "t", epochs=1, model_name="audited"))
    out = tmp_path / "audit"
    summary = audit(AuditConfig(model=f"models:/audited/{trained['model_version']}", out=str(out),
                                exclude_share=0.3))
    assert summary["data"] == str(seaice_prepared)  # the model's own training data by default
    excluded = pd.read_csv(out / "exclude.csv", dtype={"scene": str})
    train_tiles, _ = PreparedData.load(seaice_prepared).split_tiles(-1)
    assert 0 < len(excluded) < len(train_tiles)
    result = train(tiny_config(seaice_prepared, tmp_path / "s", epochs=1, sampling="grid",
                               exclude=str(out / "exclude.csv")), PreparedData.load(seaice_prepared))
    assert result.history  # trained on what was left
    everything = tmp_path / "everything.csv"
    train_tiles[["scene", "row", "col", "size"]].to_csv(everything, index=False)
    with pytest.raises(ConfigError, match="nothing is left"):
        train(tiny_config(seaice_prepared, tmp_path / "e", epochs=1, exclude=str(everything)),
              PreparedData.load(seaice_prepared))
    with pytest.raises(ConfigError, match="name the model"):
        audit(AuditConfig())
