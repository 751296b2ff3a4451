"""The training loop: datasets, loss, optimiser, weight average, best-epoch selection. The model comes
from rsseg.model_setup, validation from rsseg.validation, the run's clock from rsseg.run_progress, the
process's device, seeds and samples from rsseg.processes; checkpoints are read and written by
rsseg.checkpoints.

No MLflow here: progress and results leave through `EpochCallback`, so the loop runs the same under
`mlflow run`, in tests and under `torchrun`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from rsseg.checkpoints import (
    best_from_checkpoint,
    best_to_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_on_cpu,
)
from rsseg.config import TrainConfig, split_list, with_task_defaults
from rsseg.data.datasets import MixedDataset, PreparedData, RandomWindowDataset, TileDataset, mixed_training_set
from rsseg.data.exclusions import KEY as EXCLUSION_KEY
from rsseg.data.exclusions import ExcludedAreas, drop_excluded, read_exclusions
from rsseg.data.transforms import augmentation_to_dict, build_augmentation
from rsseg.errors import ConfigError
from rsseg.evaluation import Evaluator
from rsseg.losses import build_loss, deep_supervision_loss, distillation_loss
from rsseg.model_setup import build_model, check_trainable_export, checked_teacher, dataset_spec_for_training
from rsseg.optim import (
    WeightAverage,
    build_optimizer,
    build_scheduler,
    cosine_factor,
    cycle_index,
    resolve_precision,
    set_lr,
    snapshot_factor,
)
from rsseg.plots import Overlay
from rsseg.processes import init_distributed, seed_everything, select_device, steps_per_epoch, train_sampler
from rsseg.run_progress import RunProgress
from rsseg.spec import ModelSpec
from rsseg.validation import spread, validate, validated_snapshots

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
    # snapshots=true: per cosine cycle, {"cycle": i, "model": the weights at its end, "metrics": validation}
    snapshots: list[dict[str, Any]] = field(default_factory=list)


def train(config: TrainConfig, data: PreparedData, on_epoch_end: EpochCallback | None = None,
          start: tuple[torch.nn.Module, ModelSpec] | None = None, extra: Sequence[PreparedData] = (),
          teacher: tuple[torch.nn.Module, ModelSpec] | None = None) -> TrainResult:
    """Train per `config` on a prepared dataset; returns the best validated weights and their figures
    (the weight average's when `ema_decay` is set). `start`: a trained model and its spec to fine-tune
    (`init_from`) instead of a new model. `extra`: more datasets (e.g. pseudo labels) whose scenes all join
    the training set, mixed by `config.mix`; validation stays on `data`'s split. `teacher`: a model (and
    its spec) to distil from (`config.alpha`, `config.temperature`), run on the student's inputs."""
    config = with_task_defaults(config, data.spec.task)
    distributed = init_distributed()
    rank = dist.get_rank() if distributed else 0
    device = select_device(config.device, distributed)
    precision = resolve_precision(config.precision, device)
    seed_everything(config.seed + rank)

    dataset_spec = dataset_spec_for_training(data, config.normalization)
    augmentation = build_augmentation(config.augment, dataset_spec)
    train_tiles, val_tiles = data.split_tiles(config.fold)
    excluded = _exclusions(config, data, train_tiles)
    train_tiles = drop_excluded(train_tiles, excluded)
    tile_size = data.tile_size
    training_data = replace(data, spec=dataset_spec)
    if config.sampling == "random":
        train_set: TileDataset = RandomWindowDataset(training_data, train_tiles, config.crop_size or tile_size,
                                                     augmentation, seed=config.seed,
                                                     excluded=ExcludedAreas(excluded))
    else:
        train_set = TileDataset(training_data, train_tiles, augmentation)
    if extra:
        train_set = mixed_training_set(train_set, extra, dataset_spec, config, augmentation, tile_size)
    val_set: Any = TileDataset(training_data, val_tiles, None)
    if config.max_val_tiles and len(val_set) > config.max_val_tiles:
        val_set = Subset(val_set, spread(len(val_set), config.max_val_tiles))

    model, spec = build_model(config, dataset_spec, tile_size=tile_size, start=start)
    if config.check_export and rank == 0 and start is None:
        check_trainable_export(model, spec)
    teacher_model = checked_teacher(teacher, spec).to(device) if teacher is not None else None
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
    run = RunProgress(config, steps_per_epoch=steps_per_epoch(len(train_set), config, distributed))

    start_epoch, best_value, best_epoch = 1, -math.inf, 0
    best_state: dict[str, torch.Tensor] | None = None
    best: dict[str, Any] = {}
    history: list[dict[str, float]] = []
    checkpoint_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else None
    if config.resume:
        state = load_checkpoint(config.resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if average is not None and state.get("average") is not None:
            average.model.load_state_dict(state["average"])
            average.updates = int(state.get("average_updates", 0))
        run.restore(state.get("progress", {}))
        run.snapshots = list(state.get("snapshots") or [])
        start_epoch, best_value, best_epoch = state["epoch"] + 1, state["best_value"], state["best_epoch"]
        best_state, best, history = state["best_state"], best_from_checkpoint(state["best"]), state["history"]
        set_rng_state(state["rng"])
        log.info("resumed from %s at epoch %d (best %s %.4f at epoch %d)", config.resume, start_epoch,
                 spec.dataset.headline_metric, best_value, best_epoch)

    headline = spec.dataset.headline_metric
    log.info("training %s/%s on %s: %s windows of %d, %d per epoch, %s, %s%s, lr %g (%s)", spec.architecture,
             spec.encoder, data.root, config.sampling, config.crop_size or tile_size, len(train_set), precision,
             "channels-last" if config.channels_last else "contiguous",
             f", weight average {config.ema_decay}" if average else "", config.lr, config.scheduler)
    stopped_by_budget = False
    for epoch in range(start_epoch, config.epochs + 1):
        sampler = train_sampler(train_set, config, epoch, distributed)
        if isinstance(train_set, (RandomWindowDataset, MixedDataset)):
            train_set.set_epoch(epoch)
        # Albumentations keeps its own RNG: seed it per epoch (and rank) so runs and resumed runs repeat.
        # With worker processes each worker holds a copy; albumentations offsets them by worker id.
        augmentation.set_random_seed(config.seed * 100_003 + epoch * 101 + rank)
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, num_workers=config.workers,
                            drop_last=len(sampler) > config.batch_size, persistent_workers=False)
        train_loss, tiles_per_s, stopped_by_budget = _train_one_epoch(
            train_model, loader, loss_fn, optimizer, scheduler, device, config, epoch, rank, run, precision, average,
            teacher_model,
        )
        if distributed:
            dist.barrier()
        last = stopped_by_budget or epoch == config.epochs
        if rank == 0 and (last or run.validation_due()):
            evaluated = average.model if average is not None else model
            evaluator = Evaluator(spec)
            val_loss, overlays = validate(evaluated, val_set, loss_fn, evaluator, device, config, precision)
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
                best_state = state_on_cpu(evaluated)
                best = {"metrics": metrics, "confusion": evaluator.confusion.matrix.copy(), "overlays": overlays}
        if rank == 0 and checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir / "last.pt", {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "best_value": best_value,
                "best_epoch": best_epoch, "best_state": best_state, "best": best_to_checkpoint(best),
                "history": history, "progress": run.state(),
                "average": average.model.state_dict() if average is not None else None,
                "average_updates": average.updates if average is not None else 0,
                "rng": rng_state(), "config": config.__dict__, "snapshots": run.snapshots,
            })
        if rank == 0 and on_epoch_end is not None and history and history[-1]["epoch"] == epoch:
            on_epoch_end(epoch, history[-1])
        if stopped_by_budget:
            log.info("time budget of %.0f s reached after epoch %d", config.time_budget, epoch)
            break

    if distributed:
        dist.barrier()
    snapshots = validated_snapshots(model, run, val_set, loss_fn, spec, device, config, precision) if rank == 0 else []
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
        stopped_by_budget=stopped_by_budget, snapshots=snapshots,
    )


def _train_one_epoch(model, loader, loss_fn, optimizer, scheduler, device, config, epoch, rank, run: RunProgress,
                     precision: str, average: WeightAverage | None, teacher: torch.nn.Module | None = None):
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
        if config.scheduler == "cosine" and config.snapshots:
            cycle = cycle_index(run.fraction(), config.cycles)
            if cycle > len(run.snapshots):  # the previous cycle just ended: keep its weights
                run.snapshots.append(state_on_cpu(base))
            set_lr(optimizer, config.lr * snapshot_factor(run.fraction(), config.warmup, config.cycles))
        elif config.scheduler == "cosine":
            set_lr(optimizer, config.lr * cosine_factor(run.fraction(), config.warmup))
        images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
        targets = {k: v.to(device, non_blocking=True) for k, v in batch["targets"].items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model(images)
        loss, logits, _parts = deep_supervision_loss(loss_fn, output, targets, aux_weights)
        if teacher is not None:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                soft = teacher(images)
            soft_loss = distillation_loss(logits, soft, base.outputs, config.temperature)
            loss = (1.0 - config.alpha) * loss + config.alpha * soft_loss
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


def _exclusions(config: TrainConfig, data: PreparedData, train_tiles: pd.DataFrame) -> pd.DataFrame:
    """The training tiles `config.exclude` lists (an audit's exclude.csv); validation tiles listed stay."""
    if not config.exclude:
        return pd.DataFrame(columns=EXCLUSION_KEY)
    listed = read_exclusions(config.exclude, data.tiles)
    excluded = listed.merge(train_tiles[EXCLUSION_KEY], on=EXCLUSION_KEY)
    if len(excluded) == len(train_tiles):
        raise ConfigError(f"exclude {config.exclude}: it lists every training tile of {data.root}; nothing is left "
                          "to train on")
    log.info("leaving out %d of %d training tiles listed in %s (%d listed tiles are not training tiles)",
             len(excluded), len(train_tiles), config.exclude, len(listed) - len(excluded))
    return excluded
