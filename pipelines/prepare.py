"""Entry point `prepare`: a dataset folder in one of the seeds' layouts -> manifest, splits, stats, spec."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines._cli import parser_for, run
from rsseg.config import PrepareConfig, from_args, split_list
from rsseg.data.defaults import PREPARED_ROOT, default_dataset
from rsseg.data.prepare import prepare_dataset


def main(argv: list[str] | None = None) -> int:
    args = parser_for(PrepareConfig, __doc__).parse_args(argv)
    config: PrepareConfig = from_args(PrepareConfig, args)
    if not config.source:
        out = default_dataset()
    else:
        out = Path(config.out or PREPARED_ROOT / (config.name or Path(config.source).resolve().name))
        prepare_dataset(
            config.source, out, layout=config.layout, task=config.task or None, name=config.name or None,
            tile_size=config.tile_size, overlap=config.overlap, folds=config.folds,
            val_fraction=config.val_fraction, seed=config.seed, classes=split_list(config.classes) or None,
            palette=config.palette or None, unknown_colors=config.unknown_colors,
            mask_threshold=None if config.mask_threshold < 0 else config.mask_threshold,
            bands=split_list(config.bands, int) or None, ignore_index=config.ignore_index,
            nodata=None if config.nodata < 0 else config.nodata, overwrite=config.overwrite,
        )
    stats = json.loads((out / "stats.json").read_text())
    print(f"prepared {out}: scenes {json.dumps(stats['scenes'])}, tiles {json.dumps(stats['tiles'])}")
    return 0


if __name__ == "__main__":
    run(main)
