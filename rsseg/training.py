"""The training loop: datasets, model, loss, optimiser, validation, checkpoints, DDP.

No MLflow here: progress and results leave through `EpochCallback`, so the loop runs the same under
`mlflow run`, in tests and under `torchrun`.
"""

from __future__ import annotations

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

from rsseg.config import TrainConfig, parse_options, split_list
from rsseg.data.datasets import PreparedData, RandomWindowDataset, TileDataset
from rsseg.data.transforms import augmentation_to_dict, build_augmentation
from rsseg.errors import ConfigError, ExportError, first_line
from rsseg.evaluation import Evaluator
from rsseg.losses import build_loss, deep_supervision_loss
from rsseg.models import create_model, default_encoder
from rsseg.models.encoders import resolve_encoder_weights
from rsseg.optim import (
    WeightAverage,
    build_optimizer,
    build_scheduler,
    cosine_factor,
    resolve_precision,
    set_lr,
)
from rsseg.plots import Overlay
from rsseg.spec import DatasetSpec, ModelSpec, OutputGroup, accepted_tile_sizes, output_groups_for

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, float]], None]


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


def train(config: TrainConfig, data: PreparedData, on_epoch_end: EpochCallback | None = None,
          start: tuple[torch.nn.Module, ModelSpec] | None = None) -> TrainResult:
    """Train per `config` on a prepared dataset; returns the best validated weights and their figures
    (the weight average's when `ema_decay` is set). `start`: a trained model and its spec to fine-tune
    (`init_from`) instead of a new model."""
    distributed = _init_distributed()
    rank = dist.get_rank() if distributed else 0
    device = _device(config.device, distributed)
    precision = resolve_precision(config.precision, device)
    _seed_everything(config.seed + rank)

    dataset_spec = _dataset_spec_for_training(data, config.normalization)
    augmentation = build_augmentation(config.augment, dataset_spec)
    train_tiles, val_tiles = data.split_tiles(config.fold)
    tile_size = data.tile_size
    training_data = replace(data, spec=dataset_spec)
    if config.sampling == "random":
        train_set: TileDataset = RandomWindowDataset(training_data, train_tiles, config.crop_size or tile_size,
                                                     augmentation, seed=config.seed)
    else:
        train_set = TileDataset(training_data, train_tiles, augmentation)
    val_set: Any = TileDataset(training_data, val_tiles, None)
    if config.max_val_tiles and len(val_set) > config.max_val_tiles:
        val_set = Subset(val_set, _spread(len(val_set), config.max_val_tiles))

    model, spec = build_model(config, dataset_spec, tile_size=tile_size, start=start)
    if config.check_export and rank == 0 and start is None:
        _check_exportable(model, spec)
    model.emit_aux = True  # auxiliary heads (deep supervision) add their losses during training only
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    train_model: torch.nn.Module = model
    if distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    average = WeightAverage(model, config.ema_decay) if config.ema_decay > 0 else None

    loss_fn = build_loss(
        spec.outputs,
        ce_weight=config.ce_weight,
        dice_weight=config.dice_weight,
        label_smoothing=config.label_smoothing,
        class_weights=split_list(config.class_weights, float) or None,
        ignore_index=dataset_spec.ignore_index,
        loss=config.loss,
        focal_gamma=config.focal_gamma,
        edge_smoothing=config.edge_smoothing,
    )
    optimizer = build_optimizer(config, model)
    scheduler = build_scheduler(config, optimizer)
    run = _Progress(config, steps_per_epoch=_steps_per_epoch(len(train_set), config, distributed))

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
        if average is not None and state.get("average") is not None:
            average.model.load_state_dict(state["average"])
            average.updates = int(state.get("average_updates", 0))
        run.restore(state.get("progress", {}))
        start_epoch, best_value, best_epoch = state["epoch"] + 1, state["best_value"], state["best_epoch"]
        best_state, best, history = state["best_state"], _best_from_checkpoint(state["best"]), state["history"]
        _set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d (best %s %.4f at epoch %d)", config.resume, start_epoch,
                 spec.dataset.headline_metric, best_value, best_epoch)

    headline = spec.dataset.headline_metric
    log.info("training %s/%s on %s: %s windows of %d, %d per epoch, %s, %s%s, lr %g (%s)", spec.architecture,
             spec.encoder, data.root, config.sampling, config.crop_size or tile_size, len(train_set), precision,
             "channels-last" if config.channels_last else "contiguous",
             f", weight average {config.ema_decay}" if average else "", config.lr, config.scheduler)
    stopped_by_budget = False
    for epoch in range(start_epoch, config.epochs + 1):
        sampler = _train_sampler(train_set, config, epoch, distributed)
        if isinstance(train_set, RandomWindowDataset):
            train_set.set_epoch(epoch)
        # Albumentations keeps its own RNG: seed it per epoch (and rank) so runs and resumed runs repeat.
        # With worker processes each worker holds a copy; albumentations offsets them by worker id.
        augmentation.set_random_seed(config.seed * 100_003 + epoch * 101 + rank)
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                            drop_last=len(sampler) > config.batch_size, persistent_workers=False)
        train_loss, tiles_per_s, stopped_by_budget = _train_one_epoch(
            train_model, loader, loss_fn, optimizer, scheduler, device, config, epoch, rank, run, precision, average
        )
        if distributed:
            dist.barrier()
        last = stopped_by_budget or epoch == config.epochs
        if rank == 0 and (last or run.validation_due()):
            evaluated = average.model if average is not None else model
            evaluator = Evaluator(spec)
            val_loss, overlays = _validate(evaluated, val_set, loss_fn, evaluator, device, config, precision)
            run.validated()
            metrics = {f"val_{k}": v for k, v in evaluator.compute().items()}
            metrics.update(train_loss=train_loss, train_tiles_per_s=tiles_per_s, val_loss=val_loss,
                           lr=optimizer.param_groups[0]["lr"], elapsed_s=run.elapsed())
            history.append({"epoch": epoch, **metrics})
            value = metrics.get(f"val_{headline}", math.nan)
            log.info("epoch %d: train loss %.4f, val loss %.4f, val %s %.4f (%.1f tiles/s, %.0f s)",
                     epoch, train_loss, val_loss, headline, value, tiles_per_s, run.elapsed())
            if best_state is None or (not math.isnan(value) and value > best_value):
                best_value, best_epoch = value, epoch
                best_state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
                best = {"metrics": metrics, "confusion": evaluator.confusion.matrix.copy(), "overlays": overlays}
        if rank == 0 and checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir / "last.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "best_value": best_value,
                "best_epoch": best_epoch, "best_state": best_state, "best": _best_to_checkpoint(best),
                "history": history, "progress": run.state(),
                "average": average.model.state_dict() if average is not None else None,
                "average_updates": average.updates if average is not None else 0,
                "rng": _rng_state(), "config": config.__dict__,
            })
        if rank == 0 and on_epoch_end is not None and history and history[-1]["epoch"] == epoch:
            on_epoch_end(epoch, history[-1])
        if stopped_by_budget:
            log.info("time budget of %.0f s reached after epoch %d", config.time_budget, epoch)
            break

    if distributed:
        dist.barrier()
    assert best_state is not None or rank != 0
    if best_state is not None:
        model.load_state_dict(best_state)
    model.emit_aux = False
    model.to(memory_format=torch.contiguous_format).cpu().eval()
    evaluator = Evaluator(spec)
    return TrainResult(
        model=model, spec=spec, best_epoch=best_epoch, best_metrics=best.get("metrics", {}),
        confusion=best.get("confusion", np.zeros((1, 1))), class_names=evaluator.class_names,
        overlays=best.get("overlays", []), augmentation=augmentation_to_dict(augmentation), history=history,
        stopped_by_budget=stopped_by_budget,
    )


class _Progress:
    """Where a run is: steps taken, seconds spent (across resumes), and when to validate next.

    Under a time budget, progress is elapsed / budget and `validations` are spread evenly over it (an
    epoch of a large dataset can take minutes: validating after each would eat the budget); without
    one, progress is steps / (epochs x steps per epoch) and every epoch is validated.
    """

    def __init__(self, config: TrainConfig, steps_per_epoch: int) -> None:
        self.config = config
        self.total_steps = max(1, config.epochs * steps_per_epoch)
        self.steps = 0
        self._spent = 0.0  # seconds of earlier sessions (resume)
        self._started = time.monotonic()
        self._validations = 0

    def elapsed(self) -> float:
        return self._spent + time.monotonic() - self._started

    def fraction(self) -> float:
        if self.config.time_budget:
            return self.elapsed() / self.config.time_budget
        return self.steps / self.total_steps

    def over_budget(self) -> bool:
        return bool(self.config.time_budget) and self.elapsed() > self.config.time_budget

    def validation_due(self) -> bool:
        if not self.config.time_budget:
            return True
        every = 1.0 / max(self.config.validations, 1)
        return self.fraction() >= (self._validations + 1) * every

    def validated(self) -> None:
        self._validations += 1

    def state(self) -> dict[str, float]:
        return {"steps": self.steps, "elapsed": self.elapsed(), "validations": self._validations}

    def restore(self, state: dict[str, float]) -> None:
        self.steps = int(state.get("steps", 0))
        self._spent = float(state.get("elapsed", 0.0))
        self._validations = int(state.get("validations", 0))
        self._started = time.monotonic()


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
        return _fine_tuned(config, start, in_channels, outputs, tile_size, dataset)
    arch_kwargs: dict[str, Any] = {}
    if "unet" in architecture:
        arch_kwargs["encoder_depth"] = config.encoder_depth
    arch_kwargs.update(parse_options(config.model_options))
    encoder = config.encoder or default_encoder(architecture)
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
                     outputs=outputs, tile_size=tile_size, tile_sizes=sizes, stride=stride)
    return model, spec


def _check_exportable(model: torch.nn.Module, spec: ModelSpec) -> None:
    from rsseg.export import check_exportable

    try:
        check_exportable(model, spec)
    except ExportError as exc:
        raise ConfigError(
            f"{spec.architecture}/{spec.encoder} cannot be exported to ONNX, so it could never be promoted or "
            f"served ({first_line(exc)}); choose another encoder or architecture, or train anyway with "
            "check_export=false"
        ) from None


def _fine_tuned(config: TrainConfig, start: tuple[torch.nn.Module, ModelSpec], in_channels: int,
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
                     tile_sizes=accepted_tile_sizes(tile_size, model.stride), stride=model.stride)
    return model.train(), spec


def _dataset_spec_for_training(data: PreparedData, normalization: str) -> DatasetSpec:
    if normalization == "spec":
        return data.spec
    bands = json.loads((data.root / "stats.json").read_text())["bands"]
    position = {band: i for i, band in enumerate(bands["index"])}
    picked = [position[b] for b in data.spec.bands]
    return replace(data.spec, mean=[float(bands["mean"][i]) for i in picked],
                   std=[max(float(bands["std"][i]), 1e-6) for i in picked])


def _train_one_epoch(model, loader, loss_fn, optimizer, scheduler, device, config, epoch, rank, run: _Progress,
                     precision: str, average: WeightAverage | None):
    model.train()
    base = model.module if hasattr(model, "module") else model
    aux_weights = base.aux_weights if base.emit_aux else []
    total_loss, total_tiles, steps = 0.0, 0, len(loader)
    stopped = False
    epoch_start = time.monotonic()
    bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", unit="batch", disable=rank != 0,
               mininterval=2.0, dynamic_ncols=True)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    for step, batch in enumerate(bar):
        if config.scheduler == "cosine":
            set_lr(optimizer, config.lr * cosine_factor(run.fraction(), config.warmup))
        images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        targets = {k: v.to(device, non_blocking=True) for k, v in batch["targets"].items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model(images)
        loss, _logits, _parts = deep_supervision_loss(loss_fn, output, targets, aux_weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        run.steps += 1
        if average is not None:
            average.update(model.module if hasattr(model, "module") else model)
        if config.scheduler == "cosine_restarts":
            scheduler.step(epoch - 1 + (step + 1) / steps)
        total_loss += float(loss.detach()) * images.shape[0]
        total_tiles += images.shape[0]
        elapsed = time.monotonic() - epoch_start
        bar.set_postfix(loss=f"{total_loss / total_tiles:.4f}", tiles_s=f"{total_tiles / elapsed:.2f}")
        if run.over_budget():
            stopped = True
            break
    bar.close()
    elapsed = time.monotonic() - epoch_start
    return total_loss / max(total_tiles, 1), total_tiles / max(elapsed, 1e-9), stopped


@torch.no_grad()
def _validate(model, val_set, loss_fn, evaluator: Evaluator, device, config: TrainConfig, precision: str):
    model.eval()
    loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False, num_workers=config.workers)
    total_loss, total = 0.0, 0
    overlays: list[Overlay] = []
    spec = evaluator.spec.dataset
    for batch in tqdm(loader, desc="validate", unit="batch", mininterval=2.0, leave=False, dynamic_ncols=True):
        images = batch["image"].to(device)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        targets = {k: v.to(device) for k, v in batch["targets"].items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
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


def _steps_per_epoch(samples: int, config: TrainConfig, distributed: bool) -> int:
    per_process = math.ceil(samples / dist.get_world_size()) if distributed else samples
    if config.max_train_tiles:
        per_process = min(per_process, config.max_train_tiles)
    return max(1, per_process // config.batch_size if per_process > config.batch_size else 1)


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
        raise ConfigError(f"resume: {path} is not a readable checkpoint ({first_line(exc)}); "
                          "give the last.pt of an earlier run") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(f"resume: {path} is not an rsseg training checkpoint (no {', '.join(missing)}); give "
                          "the last.pt of an earlier run")
    return state
