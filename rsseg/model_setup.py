"""The model a training run starts from and its spec: a new registered architecture sized for the prepared
dataset, or a registered version to fine-tune (`init_from`), checked to fit the data and, before any training,
to export to ONNX (a model that can never be served is refused at `train`)."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import torch

from rsseg.config import TrainConfig, parse_options
from rsseg.data.datasets import PreparedData
from rsseg.errors import ConfigError, ExportError, first_line
from rsseg.models import create_model, default_encoder
from rsseg.models.encoders import resolve_encoder_weights
from rsseg.spec import (
    UNET_ENCODER,
    DatasetSpec,
    ModelSpec,
    OutputGroup,
    accepted_tile_sizes,
    interchange_mismatch,
    output_groups_for,
)

log = logging.getLogger(__name__)


def build_model(config: TrainConfig, dataset: DatasetSpec, tile_size: int,
                start: tuple[torch.nn.Module, ModelSpec] | None = None) -> tuple[torch.nn.Module, ModelSpec]:
    """The model and its spec for a dataset (or `start`'s model, checked to fit the dataset).
    Architecture defaults follow the task."""
    # Binary change pairs go into one UNet as both dates' bands stacked (early fusion): at equal budget it
    # beat the siamese UNet on LEVIR-CD (README, Benchmarks); semantic change needs the siamese heads.
    architecture = config.architecture or ("siamese_unet" if dataset.has_semantic else "unet")
    in_channels = dataset.num_bands * (2 if dataset.task == "change" else 1)
    outputs = output_groups_for(dataset)
    if start is not None:
        return fine_tuned(config, start, in_channels, outputs, tile_size, dataset)
    arch_kwargs: dict[str, Any] = {}
    if "unet" in architecture:
        arch_kwargs["encoder_depth"] = config.encoder_depth
    arch_kwargs.update(parse_options(config.model_options))
    encoder = config.encoder or _recipe_encoder(architecture, dataset)
    try:
        model = create_model(architecture, encoder, in_channels, outputs,
                             pretrained_path=resolve_encoder_weights(config.encoder_weights, encoder), **arch_kwargs)
    except TypeError as exc:  # an option the architecture does not take
        raise ConfigError(f"model_options {config.model_options!r}: {architecture} does not take it ({exc})") from None
    stride = int(model.stride)
    if tile_size % stride:
        raise ConfigError(
            f"tile size {tile_size} of the prepared data is not a multiple of {stride}, the stride of "
            f"{architecture}/{encoder}; prepare with --tile-size {tile_size // stride * stride}"
        )
    sizes = accepted_tile_sizes(tile_size, stride)
    spec = ModelSpec(dataset=dataset, architecture=architecture, encoder=encoder, in_channels=in_channels,
                     outputs=outputs, tile_size=tile_size, tile_sizes=sizes, stride=stride, options=arch_kwargs)
    return model, spec


def check_trainable_export(model: torch.nn.Module, spec: ModelSpec) -> None:
    from rsseg.export import check_exportable

    try:
        check_exportable(model, spec)
    except ExportError as exc:
        raise ConfigError(
            f"{spec.architecture}/{spec.encoder} cannot be exported to ONNX, so it could never be promoted or "
            f"served ({first_line(exc)}); choose another encoder or architecture, or train anyway with "
            "check_export=false"
        ) from None


def fine_tuned(config: TrainConfig, start: tuple[torch.nn.Module, ModelSpec], in_channels: int,
               outputs: list[OutputGroup], tile_size: int, dataset: DatasetSpec) -> tuple[torch.nn.Module, ModelSpec]:
    model, before = start
    if model.in_channels != in_channels or list(model.outputs) != list(outputs):
        raise ConfigError(
            f"init_from {config.init_from}: that model takes {model.in_channels} channels and gives "
            f"{[(g.name, g.channels) for g in model.outputs]}, but this dataset needs {in_channels} and "
            f"{[(g.name, g.channels) for g in outputs]}; fine-tune on data with the same bands and classes"
        )
    if tile_size % model.stride:
        raise ConfigError(f"init_from {config.init_from}: tile size {tile_size} is not a multiple of the model's "
                          f"stride {model.stride}; prepare with --tile-size {tile_size // model.stride * model.stride}")
    log.info("fine-tuning %s (%s/%s)", config.init_from, before.architecture, before.encoder)
    spec = ModelSpec(dataset=dataset, architecture=before.architecture, encoder=before.encoder,
                     in_channels=in_channels, outputs=outputs, tile_size=tile_size,
                     tile_sizes=accepted_tile_sizes(tile_size, model.stride), stride=model.stride,
                     options=dict(before.options))
    return model.train(), spec


def dataset_spec_for_training(data: PreparedData, normalization: str) -> DatasetSpec:
    if normalization == "spec":
        return data.spec
    bands = json.loads((data.root / "stats.json").read_text())["bands"]
    position = {band: i for i, band in enumerate(bands["index"])}
    picked = [position[b] for b in data.spec.bands]
    return replace(data.spec, mean=[float(bands["mean"][i]) for i in picked],
                   std=[max(float(bands["std"][i]), 1e-6) for i in picked])


def checked_teacher(teacher: tuple[torch.nn.Module, ModelSpec], spec: ModelSpec) -> torch.nn.Module:
    """The teacher to distil from, frozen and in eval mode, if it reads the same pixels the same way and gives
    the same heads as the student (rsseg.spec.interchange_mismatch)."""
    model, theirs = teacher
    mismatch = interchange_mismatch(theirs, spec)
    if mismatch:
        raise ConfigError(f"teacher and student differ in {mismatch}; distil from a teacher trained on the same "
                          "classes, bands and normalisation, with the same heads")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _recipe_encoder(architecture: str, dataset: DatasetSpec) -> str:
    """The encoder when none is named: UNET_ENCODER for a single-date UNet, the architecture's otherwise."""
    if architecture == "unet" and dataset.task != "change":
        return UNET_ENCODER
    return default_encoder(architecture)
