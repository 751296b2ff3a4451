"""Entry point `main`: the end-to-end job on embedded defaults (prepare, train briefly, register).

It ends by reading the new version back from the model registry, as any user of the registry would.
"""

from __future__ import annotations

from pathlib import Path

from pipelines._cli import parser_for, run
from pipelines.train import train_and_register
from rsseg.config import MainConfig, TrainConfig, from_args
from rsseg.data.defaults import default_dataset
from rsseg.data.prepare import prepare_dataset
from rsseg.tracking import describe_version


def main(argv: list[str] | None = None) -> int:
    config: MainConfig = from_args(MainConfig, parser_for(MainConfig, __doc__).parse_args(argv))
    if config.source:
        prepared = Path("data/prepared") / Path(config.source).resolve().name
        prepare_dataset(config.source, prepared)
    else:
        prepared = default_dataset()
    summary = train_and_register(TrainConfig(
        data=str(prepared), epochs=config.epochs, encoder=config.encoder, model_name=config.model_name,
        restart_epochs=config.epochs,
    ))
    assert summary is not None
    print(describe_version(summary["model_name"], summary["model_version"]))
    return 0


if __name__ == "__main__":
    run(main)
