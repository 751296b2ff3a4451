"""Entry point `main`: the end-to-end job on embedded defaults.

Prepare (the generated sea-ice data unless `source` is given), train briefly, register, promote the new
version into `triton_repo/`, then start the real tritonserver on loopback, send it one tile of the
data, print the answer's class histogram and stop the server.
"""

from __future__ import annotations

from pathlib import Path

from pipelines._cli import parser_for, run
from rsseg.config import MainConfig, PromoteConfig, TrainConfig, from_args
from rsseg.data.datasets import PreparedData
from rsseg.data.defaults import PREPARED_ROOT, default_dataset
from rsseg.data.prepare import prepare_dataset
from rsseg.errors import PromotionRefused, UserError
from rsseg.promotion import promote
from rsseg.served_check import ask_server_once
from rsseg.tracked_training import train_and_register
from rsseg.tracking import describe_version


def main(argv: list[str] | None = None) -> int:
    config: MainConfig = from_args(MainConfig, parser_for(MainConfig, __doc__).parse_args(argv))
    if config.source:
        prepared = PREPARED_ROOT / Path(config.source).resolve().name
        prepare_dataset(config.source, prepared, overwrite=True)  # this job's own manifest, from an earlier run
    else:
        prepared = default_dataset()
    summary = train_and_register(TrainConfig(
        data=str(prepared), epochs=config.epochs, encoder=config.encoder, model_name=config.model_name,
        restart_epochs=config.epochs,
    ))
    if summary is None:  # only rank 0 registers; main runs as one process
        raise UserError("main: training registered no version; run main as one process, not under torchrun")
    print(describe_version(summary["model_name"], summary["model_version"]))
    try:
        promoted = promote(PromoteConfig(model_name=summary["model_name"], version=summary["model_version"],
                                         repo=config.repo))
        print(f"promoted {promoted['model_name']} v{promoted['version']} into {config.repo} "
              f"(ONNX max |logit diff| {promoted['parity']['max_abs_diff']:.2e})")
    except PromotionRefused as refused:  # an earlier, better champion stays served
        print(f"not promoted: {refused}")
    data = PreparedData.load(prepared)
    tile = data.raw_tile(int(data.tiles.index[data.tiles["split"] == "val"][0]))  # a tile it did not train on
    print(ask_server_once(Path(config.repo), summary["model_name"], tile))
    return 0


if __name__ == "__main__":
    run(main)
