"""Entry point `bench_precision`: the seed UNet trained on roads or Dubai for a budget, exported, and served as
fp32, int8 by several recipes and fp16: file size, ONNX Runtime in-process tiles/s and the served metric on the
validation scenes, in one run. Needs ../shared/data; run it alone."""

from __future__ import annotations

import argparse
import json

from pipelines._cli import run
from rsseg.bench.precision import format_precision_table, precision_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="roads", choices=["roads", "dubai"])
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds")
    parser.add_argument("--profile", action="store_true", help="also ONNX Runtime's per-operator time shares")
    args = parser.parse_args(argv)
    table = precision_table(args.dataset, args.budget, profile=args.profile)
    print(json.dumps(table), flush=True)
    print(format_precision_table(table), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
