"""Training loop: learns, validates with the task's metrics, checkpoints and resumes exactly."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from rsseg.config import (MIN_VALIDATIONS, SECONDS_PER_VALIDATION, TrainConfig, validations_under_budget,
                          with_task_defaults)
from rsseg.data.datasets import PreparedData, TileDataset
from rsseg.data.transforms import SwapDates, build_augmentation, normalize
from rsseg.errors import ConfigError
from rsseg.training import train
from tests.conftest import tiny_config


def test_dataset_samples_are_normalised_tiles_with_targets(seaice_prepared):
    data = PreparedData.load(seaice_prepared)
    train_tiles, val_tiles = data.split_tiles(-1)
    assert set(train_tiles["scene"]).isdisjoint(set(val_tiles["scene"]))
    sample = TileDataset(data, train_tiles)[0]
    assert sample["image"].shape == (3, 64, 64) and sample["image"].dtype == torch.float32
    assert set(sample["targets"]) == {"classes"}
    assert set(np.unique(sample["targets"]["classes"].numpy())) <= {0, 1}
    # Normalisation is the spec's (127.5 / 31.875): 255 -> 4.0, 0 -> -4.0.
    assert sample["image"].max() <= 4.0 + 1e-6 and sample["image"].min() >= -4.0 - 1e-6


def test_augmentation_keeps_image_and_masks_aligned(change_prepared):
    data = PreparedData.load(change_prepared)
    plain = TileDataset(data, data.tiles)[0]
    flipped = TileDataset(data, data.tiles, build_augmentation("hflip"))
    torch.manual_seed(0)
    np.random.seed(0)
    seen_flip = False
    for _ in range(20):
        sample = flipped[0]
        if torch.equal(sample["image"], plain["image"].flip(-1)):
            seen_flip = True
            for name, target in plain["targets"].items():
                assert torch.equal(sample["targets"][name], target.flip(-1))
    assert seen_flip


def test_normalize_rejects_wrong_band_count(seaice_prepared):
    spec = PreparedData.load(seaice_prepared).spec
    with pytest.raises(ConfigError, match="bands"):
        normalize(np.zeros((8, 8, 4), np.uint8), spec)


def test_binary_training_learns_and_reports_task_metrics(seaice_prepared, tmp_path):
    data = PreparedData.load(seaice_prepared)
    epochs = []
    result = train(tiny_config(seaice_prepared, tmp_path, epochs=3, lr=3e-3), data,
                   on_epoch_end=lambda e, m: epochs.append((e, m)))
    assert [e for e, _ in epochs] == [1, 2, 3]
    metrics = epochs[-1][1]
    for key in ("val_iou_target", "val_f1_target", "val_miou", "val_oa", "val_fwiou", "val_kappa",
                "val_precision_target", "val_recall_target", "train_loss", "val_loss"):
        assert key in metrics, key
    losses = [m["train_loss"] for _, m in epochs]
    assert losses[-1] < losses[0]
    assert result.best_epoch in (1, 2, 3)
    assert result.best_metrics["val_iou_target"] == max(m["val_iou_target"] for _, m in epochs
                                                        if not math.isnan(m["val_iou_target"]))
    assert result.confusion.shape == (2, 2) and result.confusion.sum() > 0
    assert result.spec.in_channels == 3 and result.spec.tile_size == 64
    assert result.spec.outputs[0].channels == 2
    assert len(result.overlays) == 2
    assert (tmp_path / "ckpt" / "last.pt").is_file()


def test_resume_continues_where_the_run_stopped(seaice_prepared, tmp_path):
    data = PreparedData.load(seaice_prepared)
    straight = train(tiny_config(seaice_prepared, tmp_path / "a", epochs=2), data)

    class Interrupted(Exception):
        pass

    def stop_after_first_epoch(epoch, metrics):  # as a killed run: the epoch's checkpoint is on disk
        raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_config(seaice_prepared, tmp_path / "b", epochs=2), data, on_epoch_end=stop_after_first_epoch)
    resumed = train(tiny_config(seaice_prepared, tmp_path / "c", epochs=2,
                                resume=str(tmp_path / "b" / "ckpt" / "last.pt")), data)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    # Same data order, same augmentations, same RNG, same weights: the resumed run ends where the
    # straight run ended.
    assert resumed.history[-1]["train_loss"] == pytest.approx(straight.history[-1]["train_loss"], rel=1e-4)
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_training_is_reproducible_across_runs(seaice_prepared, tmp_path):
    data = PreparedData.load(seaice_prepared)
    one = train(tiny_config(seaice_prepared, tmp_path / "a", epochs=1), data)
    two = train(tiny_config(seaice_prepared, tmp_path / "b", epochs=1), data)
    assert one.history[-1]["train_loss"] == two.history[-1]["train_loss"]


def test_change_training_with_semantic_heads(change_prepared, tmp_path):
    data = PreparedData.load(change_prepared)
    assert data.spec.task == "change" and data.spec.has_semantic
    result = train(tiny_config(change_prepared, tmp_path, epochs=1), data)
    assert result.spec.architecture == "siamese_unet"
    assert result.spec.in_channels == 6
    assert [g.name for g in result.spec.outputs] == ["change", "semantic_a", "semantic_b"]
    for key in ("val_change_iou", "val_change_f1", "val_sek", "val_score"):
        assert key in result.best_metrics


def test_binary_change_pairs_train_one_unet_on_both_dates_stacked(binary_change_prepared, tmp_path):
    """Early fusion by default for binary change (it beat the siamese UNet at equal budget); swapping the
    dates is an augmentation for exactly these pairs."""
    data = PreparedData.load(binary_change_prepared)
    assert data.spec.task == "change" and not data.spec.has_semantic
    result = train(tiny_config(binary_change_prepared, tmp_path, epochs=1, augment="hflip,swap_dates"), data)
    assert result.spec.architecture == "unet" and result.spec.in_channels == 6
    assert [g.name for g in result.spec.outputs] == ["change"]
    assert "val_change_f1" in result.best_metrics
    assert "SwapDates" in json.dumps(result.augmentation)


def test_swapping_dates_is_refused_where_the_dates_carry_their_own_labels(change_prepared, seaice_prepared, tmp_path):
    for prepared, kind in ((change_prepared, "semantic change"), (seaice_prepared, "binary")):
        with pytest.raises(ConfigError, match=f"swap_dates needs binary change pairs; this dataset is {kind}"):
            train(tiny_config(prepared, tmp_path, epochs=1, augment="swap_dates"), PreparedData.load(prepared))


def test_swap_dates_exchanges_the_channel_halves():
    pair = np.arange(2 * 2 * 6, dtype=np.uint8).reshape(2, 2, 6)
    swapped = SwapDates(p=1.0)(image=pair)["image"]
    np.testing.assert_array_equal(swapped, np.concatenate([pair[..., 3:], pair[..., :3]], axis=-1))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_band_jitter_keeps_dtype_range_and_replays_with_the_seed(dtype):
    top = np.iinfo(dtype).max
    tile = np.random.default_rng(0).integers(0, top, (16, 16, 6), dtype=dtype, endpoint=True)
    jitter = build_augmentation("jitter")
    jitter.set_random_seed(5)
    outputs = [jitter(image=tile)["image"] for _ in range(8)]
    assert all(o.dtype == dtype and o.shape == tile.shape for o in outputs)
    assert any(not np.array_equal(o, tile) for o in outputs)  # p = 0.5: some tiles change
    jitter.set_random_seed(5)
    np.testing.assert_array_equal(jitter(image=tile)["image"], outputs[0])


@pytest.mark.parametrize("name", ["scale", "rotate"])
def test_geometric_augmentation_keeps_mask_classes(name):
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 4), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 40:] = 2  # off-centre: a zoom about the centre moves the edge
    transform = build_augmentation(name)
    transform.set_random_seed(0)
    outputs = [transform(image=image, mask=mask) for _ in range(6)]
    for out in outputs:
        assert out["image"].shape == image.shape and set(np.unique(out["mask"])) <= {0, 2}  # nearest, no blends
    assert any(not np.array_equal(out["mask"], mask) for out in outputs)  # p = 0.5: some tiles move


def test_time_budget_stops_training(seaice_prepared, tmp_path):
    data = PreparedData.load(seaice_prepared)
    result = train(tiny_config(seaice_prepared, tmp_path, epochs=50, time_budget=0.01), data)
    assert result.stopped_by_budget and len(result.history) == 1


def test_tile_size_must_fit_the_model_stride(seaice_prepared, tmp_path):
    data = PreparedData.load(seaice_prepared)
    data.spec.tile_size = 40
    with pytest.raises(ConfigError, match="multiple of"):
        train(tiny_config(seaice_prepared, tmp_path), data)


class _RunsCode:
    """Pickles as a call of os.mkdir: what a crafted checkpoint would run on a plain torch.load."""

    def __init__(self, path) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_resume_refuses_a_checkpoint_that_would_run_code(seaice_prepared, tmp_path):
    data = PreparedData.load(seaice_prepared)
    touched = tmp_path / "code-ran"
    crafted = tmp_path / "last.pt"
    torch.save({"model": {}, "epoch": 1, "payload": _RunsCode(touched)}, crafted)
    with pytest.raises(ConfigError) as err:
        train(tiny_config(seaice_prepared, tmp_path, resume=str(crafted)), data)
    assert not touched.exists()  # refused before anything in the file ran
    msg = str(err.value)
    assert "\n" not in msg and str(crafted) in msg and "not loaded (it could run code)" in msg, msg
    for bad, says in ((b"garbage", "not a readable checkpoint"), (None, "not an rsseg training checkpoint")):
        if bad is None:
            torch.save({"model": {}}, crafted)
        else:
            crafted.write_bytes(bad)
        with pytest.raises(ConfigError, match=says):
            train(tiny_config(seaice_prepared, tmp_path, resume=str(crafted)), data)


def test_checkpoints_load_with_weights_only(seaice_prepared, tmp_path):
    data = PreparedData.load(seaice_prepared)
    train(tiny_config(seaice_prepared, tmp_path, epochs=1), data)
    state = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)  # raises on any pickled object
    assert set(state["optimizer"]) == {"state", "param_groups"} and state["best"]["overlays"]


def test_random_windows_cover_the_scenes_reproducibly(seaice_prepared):
    from rsseg.data.datasets import RandomWindowDataset

    data = PreparedData.load(seaice_prepared)
    train_tiles, _ = data.split_tiles(-1)
    dataset = RandomWindowDataset(data, train_tiles, 48, seed=3)
    assert len(dataset) == max(len(train_tiles), dataset.MIN_EPOCH)  # an epoch keeps its size
    sizes = data.scenes.set_index("scene")
    dataset.set_epoch(1)
    first = [dataset.window(i) for i in range(len(dataset))]
    for scene, w in first:
        assert 0 <= w.row <= sizes.loc[scene, "height"] - 48 and 0 <= w.col <= sizes.loc[scene, "width"] - 48
    assert len({(w.row, w.col) for _, w in first}) > len(first) // 2  # not a grid: positions vary
    assert [dataset.window(i) for i in range(len(dataset))] == first  # reproducible (resume repeats it)
    dataset.set_epoch(2)
    assert [dataset.window(i) for i in range(len(dataset))] != first  # new windows every epoch
    sample = dataset[0]
    assert sample["image"].shape == (3, 48, 48) and sample["targets"]["classes"].shape == (48, 48)
    with pytest.raises(ConfigError, match="crop size 500 is larger than scene"):
        RandomWindowDataset(data, train_tiles, 500)


def test_default_learning_rate_follows_the_task():
    """lr=0 takes the measured default of the data's task; a learning rate given is kept."""
    assert TrainConfig().lr == 0
    assert with_task_defaults(TrainConfig(), "binary").lr == 2e-3
    assert with_task_defaults(TrainConfig(), "multiclass").lr == 2e-3
    assert with_task_defaults(TrainConfig(), "change").lr == 1e-3
    assert with_task_defaults(TrainConfig(lr=5e-4), "binary").lr == 5e-4
    with pytest.raises(ConfigError, match="lr must be positive"):
        TrainConfig(lr=-1e-3)


def test_default_augmentation_follows_the_task():
    """augment=auto: flips and rotations; change pairs also zoom and radiometric jitter. A list given is kept,
    and the resolved list builds."""
    assert with_task_defaults(TrainConfig(), "binary").augment == "hflip,rot90"
    assert with_task_defaults(TrainConfig(), "multiclass").augment == "hflip,rot90"
    change = with_task_defaults(TrainConfig(), "change").augment
    assert change == "hflip,rot90,scale,jitter"
    assert len(build_augmentation(change).transforms) == 4
    assert with_task_defaults(TrainConfig(augment="vflip", lr=1e-3), "change").augment == "vflip"
    assert with_task_defaults(TrainConfig(augment="vflip", lr=1e-3), "change").lr == 1e-3


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    from rsseg.optim import FLOOR, cosine_factor

    assert cosine_factor(0.0, 0.1) == FLOOR and cosine_factor(0.05, 0.1) == pytest.approx(0.5)
    assert cosine_factor(0.1, 0.1) == pytest.approx(1.0) and cosine_factor(1.0, 0.1) == pytest.approx(FLOOR)
    after = [cosine_factor(p, 0.1) for p in np.linspace(0.1, 1.0, 50)]
    assert all(a >= b for a, b in zip(after, after[1:]))  # decays monotonically to the end
    assert cosine_factor(2.0, 0.1) == pytest.approx(FLOOR)  # past the budget: stays at the floor


def test_weight_average_follows_the_weights():
    from rsseg.optim import WeightAverage

    model = torch.nn.Linear(2, 1)
    average = WeightAverage(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    for _ in range(200):
        average.update(model)
    assert torch.allclose(average.model.weight, start + 1.0, atol=1e-6)  # converges to constant weights
    average = WeightAverage(torch.nn.Linear(2, 1), decay=0.9)
    source = torch.nn.Linear(2, 1)
    average.update(source)  # the first updates ramp up: (1 + 1) / (10 + 1) of the old value kept
    assert not torch.allclose(average.model.weight, source.weight)


def test_precision_auto_follows_the_device():
    from rsseg.optim import resolve_precision

    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"


def test_validations_follow_the_budget_unless_given():
    """validations=0: one per SECONDS_PER_VALIDATION of budget, never fewer than MIN_VALIDATIONS; a count
    given is kept; a negative one is refused."""
    def count(**values):
        return validations_under_budget(TrainConfig(**values))

    assert count(time_budget=600) == MIN_VALIDATIONS
    assert count(time_budget=1800) == round(1800 / SECONDS_PER_VALIDATION) > MIN_VALIDATIONS
    assert count(time_budget=60) == MIN_VALIDATIONS
    assert count(time_budget=1800, validations=2) == 2
    with pytest.raises(ConfigError, match="validations"):
        TrainConfig(validations=-1)


def test_budget_run_ends_its_schedule_with_the_budget(seaice_prepared, tmp_path):
    """Under a time budget the learning rate reaches the floor when the budget ends, validations are
    spread over it (not one per epoch), and the last one is at the end."""
    data = PreparedData.load(seaice_prepared)
    config = tiny_config(seaice_prepared, tmp_path, epochs=10_000, time_budget=8.0, validations=2, lr=1e-3,
                         warmup=0.1)
    result = train(config, data)
    assert result.stopped_by_budget
    epochs = result.history[-1]["epoch"]
    assert 1 <= len(result.history) <= 3 and len(result.history) < epochs  # validations, not epochs
    assert result.history[-1]["lr"] <= 0.1 * config.lr  # decayed to (near) the floor at the budget's end
    assert result.history[-1]["elapsed_s"] >= 8.0
