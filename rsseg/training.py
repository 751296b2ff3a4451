"""The training loop: datasets, model, loss, optimiser, validation, checkpoints, DDP.

No MLflow here: progress and results leave through `EpochCallback`, so the loop runs the same under
`mlflow run`, in tests and under `torchrun`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm import tqdm

from rsseg.config import TrainConfig, split_list
from rsseg.data.datasets import PreparedData, TileDataset
from rsseg.data.transforms import augmentation_to_dict, build_augmentation
from rsseg.errors import ConfigError
from rsseg.inference import class_maps
from rsseg.losses import build_loss
from rsseg.metrics import ChangeMetrics, ConfusionMatrix, binary_metrics
from rsseg.models import create_model
from rsseg.spec import DatasetSpec, ModelSpec, output_groups_for

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]

# Tile sizes a served model may be asked for: the land-cover seed's adaptive menu (512..1024, step 64).
ADAPTIVE_TILE_SIZES = list(range(512, 1025, 64))


@dataclass
class Overlay:
    image: np.ndarray  # HxWx3 uint8 (first three bands, de-normalised)
    target: np.ndarray  # HxW class indices
    prediction: np.ndarray  # HxW class indices


@dataclass
class TrainResult:
    model: torch.nn.Module  # best epoch's weights, in eval mode, on the CPU
    spec: ModelSpec
    best_epoch: int
    best_metrics: dict[str, float]
    confusion: np.ndarray  # best epoch's confusion matrix of the main output group
    class_names: list[str]
    overlays: list[Overlay]
    augmentation: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    stopped_by_budget: bool = False


class Evaluator:
    """Accumulates validation metrics for a task; keys are metric names without the 'val_' prefix."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        ds = spec.dataset
        if ds.task == "change":
            semantic = len(ds.semantic_classes) if ds.has_semantic else None
            self.change = ChangeMetrics(semantic, ignore_index=ds.ignore_index)
            self.confusion = ConfusionMatrix(2, ignore_index=ds.ignore_index)
        else:
            self.confusion = ConfusionMatrix(ds.num_classes, ignore_index=ds.ignore_index)

    @property
    def main_group(self) -> str:
        return "change" if self.spec.dataset.task == "change" else "classes"

    @property
    def class_names(self) -> list[str]:
        return ["unchanged", "changed"] if self.spec.dataset.task == "change" else self.spec.dataset.classes

    def update(self, logits: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        maps = class_maps(logits, self.spec.outputs)
        self.confusion.update(maps[self.main_group], targets[self.main_group])
        if self.spec.dataset.task == "change":
            kwargs = {}
            if "semantic_a" in maps:
                changed = targets["change"] == 1
                for date in ("a", "b"):
                    # Full semantic labels (0 = unchanged) for SeK: the dataset ignores unchanged pixels.
                    full = torch.where(changed, targets[f"semantic_{date}"], torch.zeros_like(changed, dtype=torch.long))
                    kwargs[f"sem_pred_{date}"] = maps[f"semantic_{date}"]
                    kwargs[f"sem_target_{date}"] = full
            self.change.update(maps["change"], targets["change"], **kwargs)
        return maps

    def compute(self) -> dict[str, float]:
        if self.spec.dataset.task == "change":
            return self.change.compute()
        if self.spec.dataset.task == "binary":
            return binary_metrics(self.confusion, self.spec.dataset.classes)
        return self.confusion.compute(self.spec.dataset.classes)


def train(config: TrainConfig, data: PreparedData, on_epoch_end: EpochCallback | None = None) -> TrainResult:
    """Train per `config` on a prepared dataset; returns the best epoch's model and its figures."""
    distributed = _init_distributed()
    rank = dist.get_rank() if distributed else 0
    device = _device(config.device, distributed)
    _seed_everything(config.seed + rank)

    dataset_spec = _dataset_spec_for_training(data, config.normalization)
    augmentation = build_augmentation(config.augment)
    train_tiles, val_tiles = data.split_tiles(config.fold)
    train_set = TileDataset(replace(data, spec=dataset_spec), train_tiles, augmentation)
    val_set: Any = TileDataset(replace(data, spec=dataset_spec), val_tiles, None)
    if config.max_val_tiles and len(val_set) > config.max_val_tiles:
        val_set = Subset(val_set, _spread(len(val_set), config.max_val_tiles))

    model, spec = build_model(config, dataset_spec, tile_size=int(data.tiles["size"].iloc[0]))
    model.to(device)
    train_model: torch.nn.Module = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    loss_fn = build_loss(
        spec.outputs,
        ce_weight=config.ce_weight,
        dice_weight=config.dice_weight,
        label_smoothing=config.label_smoothing,
        class_weights=split_list(config.class_weights, float) or None,
        ignore_index=dataset_spec.ignore_index,
    )
    optimizer = _optimizer(config, model)
    scheduler = _scheduler(config, optimizer)

    start_epoch, best_value, best_epoch = 1, -math.inf, 0
    best_state: dict[str, torch.Tensor] | None = None
    best: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if config.resume:
        state = _load_checkpoint(config.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_value, best_epoch = state["epoch"] + 1, state["best_value"], state["best_epoch"]
        best_state, best, history = state["best_state"], _best_from_checkpoint(state["best"]), state["history"]
        _set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d (best %s %.4f at epoch %d)", config.resume, start_epoch,
                 spec.dataset.headline_metric, best_value, best_epoch)

    headline = spec.dataset.headline_metric
    started = time.monotonic()
    stopped_by_budget = False
    for epoch in range(start_epoch, config.epochs + 1):
        sampler = _train_sampler(train_set, config, epoch, distributed)
        # Albumentations keeps its own RNG: seed it per epoch (and rank) so runs and resumed runs repeat.
        # With worker processes each worker holds a copy; albumentations offsets them by worker id.
        augmentation.set_random_seed(config.seed * 100_003 + epoch * 101 + rank)
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                            drop_last=len(sampler) > config.batch_size, persistent_workers=False)
        train_loss, tiles_per_s, stopped_by_budget = _train_one_epoch(
            train_model, loader, loss_fn, optimizer, scheduler, device, config, epoch, rank, started
        )
        if distributed:
            dist.barrier()
        if rank == 0:
            evaluator = Evaluator(spec)
            val_loss, overlays = _validate(model, val_set, loss_fn, evaluator, device, config)
            metrics = {f"val_{k}": v for k, v in evaluator.compute().items()}
            metrics.update(train_loss=train_loss, train_tiles_per_s=tiles_per_s, val_loss=val_loss,
                           lr=optimizer.param_groups[0]["lr"])
            history.append({"epoch": epoch, **metrics})
            value = metrics.get(f"val_{headline}", math.nan)
            log.info("epoch %d: train loss %.4f, val loss %.4f, val %s %.4f (%.1f tiles/s)",
                     epoch, train_loss, val_loss, headline, value, tiles_per_s)
            if best_state is None or (not math.isnan(value) and value > best_value):
                best_value, best_epoch = value, epoch
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
                best = {"metrics": metrics, "confusion": evaluator.confusion.matrix.copy(), "overlays": overlays}
            if on_epoch_end is not None:
                on_epoch_end(epoch, metrics)
            if checkpoint_dir is not None:
                _save_checkpoint(checkpoint_dir / "last.pt", {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch, "best_value": best_value,
                    "best_epoch": best_epoch, "best_state": best_state, "best": _best_to_checkpoint(best),
                    "history": history,
                    "rng": _rng_state(), "config": config.__dict__,
                })
        if stopped_by_budget:
            log.info("time budget of %.0f s reached after epoch %d", config.time_budget, epoch)
            break

    if distributed:
        dist.barrier()
    assert best_state is not None or rank != 0
    if best_state is not None:
        model.load_state_dict(best_state)
    model.cpu().eval()
    evaluator = Evaluator(spec)
    return TrainResult(
        model=model, spec=spec, best_epoch=best_epoch, best_metrics=best.get("metrics", {}),
        confusion=best.get("confusion", np.zeros((1, 1))), class_names=evaluator.class_names,
        overlays=best.get("overlays", []), augmentation=augmentation_to_dict(augmentation), history=history,
        stopped_by_budget=stopped_by_budget,
    )


def build_model(config: TrainConfig, dataset: DatasetSpec, tile_size: int) -> tuple[torch.nn.Module, ModelSpec]:
    """The model and its spec for a dataset. Architecture defaults follow the task."""
    architecture = config.architecture or ("siamese_unet" if dataset.task == "change" else "unet")
    in_channels = dataset.num_bands * (2 if dataset.task == "change" else 1)
    outputs = output_groups_for(dataset)
    arch_kwargs: dict[str, Any] = {}
    if "unet" in architecture:
        arch_kwargs["encoder_depth"] = config.encoder_depth
    model = create_model(architecture, config.encoder, in_channels, outputs,
                         pretrained_path=config.encoder_weights or None, **arch_kwargs)
    stride = int(model.stride)
    if tile_size % stride:
        raise ConfigError(
            f"tile size {tile_size} of the prepared data is not a multiple of {stride}, the stride of "
            f"{architecture}/{config.encoder}; prepare with --tile-size {tile_size // stride * stride}"
        )
    sizes = sorted({tile_size, *(s for s in ADAPTIVE_TILE_SIZES if s % stride == 0)})
    spec = ModelSpec(dataset=dataset, architecture=architecture, encoder=config.encoder, in_channels=in_channels,
                     outputs=outputs, tile_size=tile_size, tile_sizes=sizes, stride=stride)
    return model, spec


def _dataset_spec_for_training(data: PreparedData, normalization: str) -> DatasetSpec:
    if normalization == "spec":
        return data.spec
    bands = json.loads((data.root / "stats.json").read_text())["bands"]
    position = {band: i for i, band in enumerate(bands["index"])}
    picked = [position[b] for b in data.spec.bands]
    return replace(data.spec, mean=[float(bands["mean"][i]) for i in picked],
                   std=[max(float(bands["std"][i]), 1e-6) for i in picked])


def _train_one_epoch(model, loader, loss_fn, optimizer, scheduler, device, config, epoch, rank, started):
    model.train()
    total_loss, total_tiles, steps = 0.0, 0, len(loader)
    stopped = False
    epoch_start = time.monotonic()
    bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", unit="batch", disable=rank != 0,
               mininterval=2.0, dynamic_ncols=True)
    for step, batch in enumerate(bar):
        images = batch["image"].to(device, non_blocking=True)
        targets = {k: v.to(device, non_blocking=True) for k, v in batch["targets"].items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            logits = model(images)
        loss, _parts = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if config.scheduler == "cosine_restarts":
            scheduler.step(epoch - 1 + (step + 1) / steps)
        total_loss += float(loss.detach()) * images.shape[0]
        total_tiles += images.shape[0]
        elapsed = time.monotonic() - epoch_start
        bar.set_postfix(loss=f"{total_loss / total_tiles:.4f}", tiles_s=f"{total_tiles / elapsed:.2f}")
        if config.time_budget and time.monotonic() - started > config.time_budget:
            stopped = True
            break
    bar.close()
    elapsed = time.monotonic() - epoch_start
    return total_loss / max(total_tiles, 1), total_tiles / max(elapsed, 1e-9), stopped


@torch.no_grad()
def _validate(model, val_set, loss_fn, evaluator: Evaluator, device, config: TrainConfig):
    model.eval()
    loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False, num_workers=config.workers)
    total_loss, total = 0.0, 0
    overlays: list[Overlay] = []
    spec = evaluator.spec.dataset
    for batch in tqdm(loader, desc="validate", unit="batch", mininterval=2.0, leave=False, dynamic_ncols=True):
        images = batch["image"].to(device)
        targets = {k: v.to(device) for k, v in batch["targets"].items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            logits = model(images)
        logits = logits.float()
        loss, _ = loss_fn(logits, targets)
        total_loss += float(loss) * images.shape[0]
        total += images.shape[0]
        maps = evaluator.update(logits, targets)
        main = evaluator.main_group
        for i in range(images.shape[0]):
            if len(overlays) >= config.overlays:
                break
            overlays.append(Overlay(_display_image(images[i].cpu(), spec), targets[main][i].cpu().numpy(),
                                    maps[main][i].cpu().numpy()))
    return total_loss / max(total, 1), overlays


def _display_image(image: torch.Tensor, spec: DatasetSpec) -> np.ndarray:
    """Normalised CHW tensor -> HxWx3 uint8 for overlays (first three bands, stretched per band)."""
    bands = image[: min(3, spec.num_bands)].numpy()
    lo = np.percentile(bands, 2, axis=(1, 2), keepdims=True)
    hi = np.percentile(bands, 98, axis=(1, 2), keepdims=True)
    scaled = np.clip((bands - lo) / np.maximum(hi - lo, 1e-6), 0, 1)
    if scaled.shape[0] < 3:
        scaled = np.repeat(scaled[:1], 3, axis=0)
    return (scaled.transpose(1, 2, 0) * 255).astype(np.uint8)


def _train_sampler(train_set, config: TrainConfig, epoch: int, distributed: bool):
    if distributed:
        sampler = DistributedSampler(train_set, shuffle=True, seed=config.seed)
        sampler.set_epoch(epoch)
        return sampler
    generator = torch.Generator().manual_seed(config.seed * 1000 + epoch)
    order = torch.randperm(len(train_set), generator=generator).tolist()
    if config.max_train_tiles:
        order = order[: config.max_train_tiles]
    return order


def _spread(n: int, k: int) -> list[int]:
    """k indexes spread evenly over range(n), so a capped validation still sees every scene."""
    return sorted({int(i) for i in np.linspace(0, n - 1, k)})


def _optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    if config.scheduler == "cosine_restarts":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            optimizer, T_0=max(config.restart_epochs, 1), T_mult=max(config.restart_mult, 1), eta_min=config.lr * 0.01
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _device(name: str, distributed: bool) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda: no CUDA device is available; use --device cpu")
        index = int(os.environ.get("LOCAL_RANK", 0)) if distributed else 0
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device(name)


def _init_distributed() -> bool:
    """True under torchrun with several processes (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return True


def is_main_process() -> bool:
    """Rank 0 under torchrun (before or after the process group starts), or a plain process."""
    if dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Checkpoints hold only what torch.load(weights_only=True) accepts (tensors, numbers, strings, lists,
# tuples, dicts), so loading one never runs code: numpy state travels as lists and tensors.
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_value", "best_epoch", "best_state", "best",
                    "history", "rng")


def _rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"python": random.getstate(), "numpy": (name, key.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def _best_to_checkpoint(best: dict[str, Any]) -> dict[str, Any]:
    if not best:
        return {}
    return {"metrics": best["metrics"], "confusion": torch.from_numpy(np.asarray(best["confusion"])),
            "overlays": [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in vars(o).items()}
                         for o in best["overlays"]]}


def _best_from_checkpoint(saved: dict[str, Any]) -> dict[str, Any]:
    if not saved:
        return {}
    return {"metrics": saved["metrics"], "confusion": saved["confusion"].numpy(),
            "overlays": [Overlay(**{k: v.numpy() for k, v in o.items()}) for o in saved["overlays"]]}


def _unpickling_reason(exc: Exception) -> str:
    """The one line of torch's weights-only refusal that says what was refused (its other lines are advice)."""
    lines = [line.strip() for line in str(exc).splitlines()[1:]]
    useful = [line for line in lines if line and not line.startswith(("Please file an issue", "Check the documentation"))]
    return (useful[0] if useful else str(exc).splitlines()[0])[:200]


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a run killed mid-save keeps the previous checkpoint


def _load_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint's contents, unpickled with weights_only=True: a file that would run code or build any
    other object is refused in one line, before anything in it is executed."""
    if not Path(path).is_file():
        raise ConfigError(f"resume: checkpoint {path} not found; give the last.pt of an earlier run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(exc)
        if "GLOBAL" in reason:  # a class or function to import and call
            raise ConfigError(f"resume: {path} holds objects other than tensors and plain values ({reason}); it was "
                              "not loaded (it could run code): resume only from last.pt files this version of "
                              "rsseg wrote") from None
        raise ConfigError(f"resume: {path} is not a readable checkpoint ({reason}); give the last.pt of an "
                          "earlier run") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ConfigError(f"resume: {path} is not a readable checkpoint ({str(exc).splitlines()[0][:200]}); "
                          "give the last.pt of an earlier run") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(f"resume: {path} is not an rsseg training checkpoint (no {', '.join(missing)}); give "
                          "the last.pt of an earlier run")
    return state
