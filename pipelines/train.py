"""Entry point `train`: train a model on a prepared dataset, log the run, register the best epoch."""

from __future__ import annotations

import json

from pipelines._cli import parser_for, run
from rsseg.config import TrainConfig, from_args
from rsseg.tracked_training import train_and_register


def main(argv: list[str] | None = None) -> int:
    args = parser_for(TrainConfig, __doc__).parse_args(argv)
    config: TrainConfig = from_args(TrainConfig, args)
    summary = train_and_register(config)
    if summary:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    run(main)
