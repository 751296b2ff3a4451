"""Entry point `train`: train a model on a prepared dataset, log the run, register the best epoch."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines._cli import parser_for, run
from rsseg import tracking
from rsseg.config import TrainConfig, from_args
from rsseg.data.datasets import PreparedData
from rsseg.data.defaults import default_dataset
from rsseg.training import is_main_process, train


def main(argv: list[str] | None = None) -> int:
    args = parser_for(TrainConfig, __doc__).parse_args(argv)
    config: TrainConfig = from_args(TrainConfig, args)
    summary = train_and_register(config)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


def train_and_register(config: TrainConfig) -> dict | None:
    """Resolve the data, train inside an MLflow run (rank 0 only logs), register. Shared with `main`."""
    data = PreparedData.load(config.data) if config.data else PreparedData.load(default_dataset())
    if not is_main_process():
        train(config, data)
        return None
    with tracking.start_run(run_name=f"train-{data.spec.name}") as active:
        if not config.checkpoint_dir:
            config.checkpoint_dir = str(Path("runs") / active.info.run_id)
        tracking.log_config(config, "train")
        tracking.log_dataset(data.root)
        result = train(config, data, on_epoch_end=tracking.epoch_logger())
        return tracking.log_training_result(result, config.model_name or None, config.register)


if __name__ == "__main__":
    run(main)
