"""Entry point `bench_ensembles`: one model vs a snapshot ensemble trained in the same wall-clock budget, on
roads and Dubai land cover, scored by `evaluate`'s code through the served tiling; and the ensemble's ONNX
Runtime tiles/s against one model's. Needs ../shared/data; run it alone."""

from __future__ import annotations

import argparse
import json

from pipelines._cli import run
from rsseg.bench.ensembles import ensemble_row, format_ensemble_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", action="append", default=[], choices=["roads", "dubai"],
                        help="run these datasets only (repeat; default both)")
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds per run")
    parser.add_argument("--cycles", type=int, default=3, help="cosine cycles = snapshots = ensemble members")
    args = parser.parse_args(argv)
    rows = []
    for name in args.dataset or ["roads", "dubai"]:
        row = ensemble_row(name, args.budget, args.cycles)
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(format_ensemble_table(rows), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
