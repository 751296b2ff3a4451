"""Entry point `bench_serving`: tiles/s of the seed UNet through the Triton ensemble (gRPC) and through
ONNX Runtime in one process, on the same tiles, and their ratio."""

from __future__ import annotations

import argparse
import json

from pipelines._cli import run
from rsseg.bench.serving import serving_benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--encoder", default="tf_efficientnet_lite3")
    args = parser.parse_args(argv)
    print(json.dumps(serving_benchmark(tile_size=args.tile_size, tiles=args.tiles, batch=args.batch,
                                       concurrency=args.concurrency, encoder=args.encoder)), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
