"""One training run as `train` and `main` make it: the data resolved, an MLflow run around training
(rank 0 only logs), the best epoch registered."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rsseg import tracking
from rsseg.config import TrainConfig, split_list, with_task_defaults
from rsseg.data.datasets import PreparedData
from rsseg.data.defaults import default_dataset
from rsseg.processes import is_main_process
from rsseg.training import train


def train_and_register(config: TrainConfig) -> dict[str, Any] | None:
    """Train inside an MLflow run and register; the run's summary (None on ranks other than 0)."""
    roots = split_list(config.data) or [str(default_dataset())]
    data, extra = PreparedData.load(roots[0]), [PreparedData.load(root) for root in roots[1:]]
    config = with_task_defaults(config, data.spec.task)  # the run logs the learning rate it trains with
    start = tracking.load_model_uri(config.init_from) if config.init_from else None
    teacher = _teacher(config.teacher) if config.teacher else None
    if not is_main_process():
        train(config, data, start=start, extra=extra, teacher=teacher)
        return None
    with tracking.start_run(run_name=f"train-{data.spec.name}") as active:
        if not config.checkpoint_dir:
            config.checkpoint_dir = str(Path("runs") / active.info.run_id)
        tracking.log_config(config, "train")
        tracking.log_dataset(data.root)
        result = train(config, data, on_epoch_end=tracking.epoch_logger(), start=start, extra=extra, teacher=teacher)
        lineage = {}
        if start is not None:
            parent = start[1]
            lineage = {"init_from": config.init_from, "parent_version": f"{parent.model_name}/{parent.model_version}",
                       "parent_run_id": parent.run_id or ""}
        if teacher is not None:
            lineage["distilled_from"] = config.teacher
        return tracking.log_training_result(result, config.model_name or None, config.register, lineage)


def _teacher(uris: str) -> tuple[Any, Any]:
    """The teacher's model and spec: one registered version or run, or several (their logit average)."""
    from rsseg.models.ensemble import LogitAverage
    from rsseg.spec import ensemble_spec

    members = [tracking.load_model_uri(uri, what="teacher") for uri in tracking.expand_model_uris(uris)]
    if len(members) == 1:
        return members[0]
    return LogitAverage([m for m, _ in members], [s for _, s in members]).eval(), ensemble_spec([s for _, s in members])
