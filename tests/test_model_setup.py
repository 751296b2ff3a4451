"""What `train` builds when the user names no architecture or encoder: the recipe follows the task."""

from __future__ import annotations

from rsseg.config import TrainConfig
from rsseg.model_setup import build_model
from rsseg.spec import DEFAULT_ENCODER, UNET_ENCODER, DatasetSpec, default_colors


def _dataset(task: str, classes: list[str]) -> DatasetSpec:
    return DatasetSpec(name="d", task=task, classes=classes, colors=default_colors(len(classes)), bands=[1, 2, 3])


def test_single_date_unet_trains_on_the_recipe_encoder() -> None:
    for task, classes in (("binary", ["a", "b"]), ("multiclass", ["a", "b", "c"])):
        spec = build_model(TrainConfig(), _dataset(task, classes), 64)[1]
        assert (spec.architecture, spec.encoder) == ("unet", UNET_ENCODER), task


def test_change_pairs_keep_the_seed_encoder_and_a_named_encoder_wins() -> None:
    spec = build_model(TrainConfig(), _dataset("change", ["unchanged", "changed"]), 64)[1]
    assert (spec.architecture, spec.encoder, spec.in_channels) == ("unet", DEFAULT_ENCODER, 6)
    named = build_model(TrainConfig(encoder=DEFAULT_ENCODER), _dataset("binary", ["a", "b"]), 64)[1]
    assert named.encoder == DEFAULT_ENCODER
