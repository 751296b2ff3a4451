"""Entry point `bench_models`: the model zoo in one table. For each architecture with its default encoder:
parameters, GFLOPs per 512² tile, ONNX Runtime CPU tiles/s, and, trained for the same wall-clock budget
on roads, Dubai land cover and LEVIR-CD (change models on LEVIR-CD only), training tiles/s and the
validation headline metric through the served tiling, with the tiled-vs-whole-image pixel agreement.
Needs ../shared/data; run it alone (training speed halves when another process shares the CPU)."""

from __future__ import annotations

import argparse
import json

from pipelines._cli import run
from rsseg.bench.models import LOSSES, ZOO, cost_row, format_zoo_table, quality_cell


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    labels = sorted({e.label for e in ZOO})
    parser.add_argument("--only", action="append", default=[], metavar="ARCH", choices=labels,
                        help=f"run these rows only (repeat); one of {', '.join(labels)}")
    parser.add_argument("--dataset", action="append", default=[], choices=["roads", "dubai", "levir"],
                        help="train on these datasets only (repeat; default: each row's own)")
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per model and dataset; "
                        "0: costs only")
    parser.add_argument("--losses", action="store_true",
                        help="instead of the zoo: the seed UNet trained with each loss (ce+dice, lovasz, ...)")
    args = parser.parse_args(argv)
    entries = LOSSES if args.losses else [e for e in ZOO if not args.only or e.label in args.only]
    costs, cells = [], []
    for entry in entries:
        if args.losses and costs:
            costs.append({**costs[0], "architecture": entry.label})  # the loss changes no cost
            continue
        cost = cost_row(entry)
        print(json.dumps(cost), flush=True)
        costs.append(cost)
    if args.budget > 0:
        for entry in entries:
            for dataset in entry.datasets:
                if args.dataset and dataset not in args.dataset:
                    continue
                cell = quality_cell(entry, dataset, args.budget)
                print(json.dumps(cell), flush=True)
                cells.append(cell)
    print(format_zoo_table(costs, cells), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
