"""Entry point `bench_quality`: our default recipe and a plain segmentation_models.pytorch script, trained
with the same wall-clock budget on the same scenes of ../shared/data, scored on the same held-out scenes
(ours through the served tiling); prints one table with both, their difference and the trivial baseline.
Needs the bench extra (pip install -e .[bench])."""

from __future__ import annotations

import argparse
import json
from typing import Any

from pipelines._cli import run
from rsseg.averaging import TTA_VIEWS
from rsseg.bench.datasets import RECIPES
from rsseg.bench.quality import format_table, quality_benchmark
from rsseg.config import parse_options


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE items -> train overrides. A list value (augment, model_options) keeps its commas;
    ';' is accepted in their place."""
    overrides: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        listed = value.replace(";", ",")
        overrides.update({key: listed} if "," in listed else parse_options(item))
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="all", choices=[*RECIPES, "all"])
    parser.add_argument("--budget", type=float, action="append",
                        help="training seconds per recipe and dataset; repeat for several (default 600)")
    parser.add_argument("--no-peer", action="store_true", help="train and score our recipe only")
    parser.add_argument("--tta", default="none", choices=list(TTA_VIEWS),
                        help="also score our trained model through the served tiling with this test-time "
                        "augmentation (JSON key ours_served_tta)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train parameter of our recipe (e.g. --set ema_decay=0), for ablations; "
                        "list values keep their commas (--set augment=hflip,rot90,swap_dates; "
                        "--set \"model_options=kernel_size=3;attention=none\")")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    rows = []
    for budget in args.budget or [600.0]:
        for name in RECIPES if args.dataset == "all" else [args.dataset]:
            row = quality_benchmark(name, budget, peer=not args.no_peer, tta=args.tta, **overrides)
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(format_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
