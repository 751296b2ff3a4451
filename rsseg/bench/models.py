"""The model zoo side by side: for each architecture with its default encoder, what it costs (parameters,
GFLOPs per 512² tile, ONNX Runtime CPU tiles/s) and what it learns in the same wall-clock budget on the
benchmark datasets (rsseg.bench.datasets.RECIPES; change models on LEVIR-CD only), scored through the
served tiling, with the pixel agreement between tiled and whole-image predictions (exact only for models
with a bounded receptive field)."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from rsseg.bench.datasets import benchmark_config, prepare_benchmark
from rsseg.bench.quality import quality_row
from rsseg.evaluation import OnnxModel
from rsseg.export.onnx import export_onnx
from rsseg.models import create_model, default_encoder, model_tasks
from rsseg.models.unet import SEED_DECODER_OPTIONS
from rsseg.spec import DatasetSpec, ModelSpec, OutputGroup, default_colors

log = logging.getLogger(__name__)

COST_TILE = 512
COST_BATCH = 4


@dataclass(frozen=True)
class Entry:
    """One row of the zoo table: an architecture (with options) and the datasets it is trained on."""

    architecture: str
    datasets: tuple[str, ...]
    options: str = ""  # model_options, e.g. "aux_heads=true"
    loss: str = ""  # "" keeps the recipe's loss (TrainConfig.loss)

    @property
    def label(self) -> str:
        extras = ", ".join(x for x in (self.options, f"loss={self.loss}" if self.loss else "") if x)
        return f"{self.architecture} ({extras})" if extras else self.architecture


SINGLE_IMAGE = ("roads", "dubai")
# The default UNet first (the row the others are read against), the seed's own decoder beside it, then the
# land-cover seed's zoo, then change.
ZOO = (
    Entry("unet", (*SINGLE_IMAGE, "levir")),
    Entry("unet", SINGLE_IMAGE, SEED_DECODER_OPTIONS),
    Entry("unet", SINGLE_IMAGE, "aux_heads=true"),
    Entry("unetplusplus", SINGLE_IMAGE),
    Entry("deeplabv3plus", SINGLE_IMAGE),
    Entry("pspnet", SINGLE_IMAGE),
    Entry("danet", SINGLE_IMAGE),
    Entry("hrnet_ocr", SINGLE_IMAGE),
    Entry("siamese_unet", ("levir",)),
    Entry("siamese_pspnet", ("levir",)),
)
# The default UNet with each loss beside the default ce+dice_present (the land-cover seed's alternatives).
LOSSES = tuple(Entry("unet", SINGLE_IMAGE, loss=loss)
               for loss in ("ce+dice_present", "ce+dice", "lovasz", "ce+lovasz:0.5", "focal+dice", "edge_ce+dice"))


def cost_row(entry: Entry, tile: int = COST_TILE, batch: int = COST_BATCH, seconds: float = 10.0) -> dict[str, Any]:
    """Parameters, GFLOPs of one tile (2 x multiply-adds, torch's flop counter) and ONNX Runtime CPU tiles/s
    (batches of `batch` tiles for at least `seconds`) of the architecture with its default encoder."""
    from rsseg.config import parse_options

    change = "change" in model_tasks(entry.architecture) or entry.datasets == ("levir",)
    encoder = default_encoder(entry.architecture)
    in_channels, outputs = (6, [OutputGroup("change", 2)]) if change else (3, [OutputGroup("classes", 6)])
    torch.manual_seed(0)
    model = create_model(entry.architecture, encoder, in_channels, outputs, **parse_options(entry.options)).eval()
    params = sum(p.numel() for p in model.parameters() if not _in_aux_head(model, p))
    x = torch.randn(1, in_channels, tile, tile)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    bounded = bounded_receptive_field(model, x)
    spec = _cost_spec(model, entry.architecture, encoder, change, outputs, tile)
    with tempfile.TemporaryDirectory(prefix="rsseg-zoo-") as tmp:
        session = OnnxModel(export_onnx(model, spec, Path(tmp) / "model.onnx"), spec)
        tiles = np.random.default_rng(0).integers(0, 256, (batch, tile, tile, in_channels), dtype=np.uint8)
        session.logits(tiles)  # warm-up: first-run allocations
        runs, started = 0, time.monotonic()
        while runs < 3 or time.monotonic() - started < seconds:
            session.logits(tiles)
            runs += 1
        tiles_per_s = runs * batch / (time.monotonic() - started)
    return {"architecture": entry.label, "encoder": encoder, "params_m": round(params / 1e6, 2),
            "gflops_per_tile": round(counter.get_total_flops() / 1e9, 1), "ort_cpu_tiles_per_s": round(tiles_per_s, 2),
            "bounded_receptive_field": bounded}


@torch.no_grad()
def bounded_receptive_field(model: torch.nn.Module, x: torch.Tensor, corner: int = 16) -> bool:
    """False when the output in one corner of `x` moves with the input in the opposite corner: global
    pooling, attention, object context, squeeze-and-excitation. Such a model's tiles cannot stitch into
    exactly the whole-image prediction at any margin (they can only agree on most pixels)."""
    before = model(x)[..., -corner:, -corner:]
    poked = x.clone()
    poked[..., :corner, :corner] += 10.0
    after = model(poked)[..., -corner:, -corner:]
    return bool((after - before).abs().max() <= 1e-6 * before.abs().max().clamp_min(1.0))


def quality_cell(entry: Entry, dataset: str, budget: float) -> dict[str, Any]:
    """Train the entry for `budget` seconds on one benchmark dataset: its served headline metric, the
    whole-image one, training tiles/s and the tiled-vs-whole pixel agreement (rsseg.bench.quality)."""
    logging.getLogger("rsseg.client").setLevel(logging.WARNING)
    data = prepare_benchmark(dataset)
    overrides: dict[str, Any] = {"architecture": entry.architecture, "model_options": entry.options}
    if entry.loss:
        overrides["loss"] = entry.loss
    config = benchmark_config(dataset, data.root, budget, **overrides)
    return {**quality_row(dataset, data, config, peer=False, overrides=overrides), "architecture": entry.label}


def format_zoo_table(costs: list[dict[str, Any]], cells: list[dict[str, Any]]) -> str:
    """One markdown table: a row per entry, its costs, and its figure on each dataset."""
    datasets = [d for d in ("roads", "dubai", "levir") if any(c["dataset"] == d for c in cells)]
    header = ("| architecture | encoder | params (M) | GFLOPs / 512² | ORT CPU tiles/s | train tiles/s | "
              + " | ".join(f"{d} (served)" for d in datasets) + " | bounded receptive field | tiled = whole image |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for cost in costs:
        mine = [c for c in cells if c["architecture"] == cost["architecture"]]
        speed = next((c["ours_tiles_per_s"] for c in mine if c.get("ours_tiles_per_s")), None)
        figures = []
        for d in datasets:
            cell = next((c for c in mine if c["dataset"] == d), None)
            figures.append(f"{cell['ours_served']:.3f}" if cell else "-")
        agreement = [c["served_whole_agreement"] for c in mine]
        stitch = f"{min(agreement):.2%} of pixels" if agreement else "-"
        lines.append(f"| {cost['architecture']} | {cost['encoder']} | {cost['params_m']:.2f} | "
                     f"{cost['gflops_per_tile']:.1f} | {cost['ort_cpu_tiles_per_s']:.2f} | "
                     f"{speed if speed is not None else '-'} | " + " | ".join(figures)
                     + f" | {'yes' if cost['bounded_receptive_field'] else 'no'} | {stitch} |")
    return "\n".join(lines)


def _in_aux_head(model: torch.nn.Module, parameter: torch.nn.Parameter) -> bool:
    # Auxiliary heads train but are not exported: they are not part of the served model's size.
    aux = getattr(model, "aux_heads", None)
    return isinstance(aux, torch.nn.Module) and any(parameter is p for p in aux.parameters())


def _cost_spec(model: torch.nn.Module, architecture: str, encoder: str, change: bool, outputs: list[OutputGroup],
               tile: int) -> ModelSpec:
    classes = ["unchanged", "changed"] if change else [f"class{i}" for i in range(outputs[0].channels)]
    bands = [1, 2, 3]
    dataset = DatasetSpec(name="zoo", task="change" if change else "multiclass", classes=classes,
                          colors=default_colors(len(classes)), bands=bands)
    return ModelSpec(dataset=dataset, architecture=architecture, encoder=encoder, in_channels=model.in_channels,
                     outputs=outputs, tile_size=tile, tile_sizes=[tile], stride=model.stride)
