"""Entry point `bench_serving`: tiles/s of the seed UNet through the Triton ensemble (gRPC) and through
ONNX Runtime in one process, on the same tiles, and their ratio."""

from __future__ import annotations

import argparse
import json

from pipelines._cli import run
from rsseg.bench.serving import serving_benchmark
from rsseg.spec import DEFAULT_ENCODER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tile", type=int, default=512, help="tile size in pixels")
    parser.add_argument("--tiles", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-in-flight", type=int, default=2, help="requests in flight at once")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"],
                        help="also measure the model at this precision (int8: promote's default recipe), same run")
    parser.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime", "openvino"],
                        help="also measure the fp32 and reduced files computed by this runtime, same run")
    parser.add_argument("--instances", type=int, default=1, help="model instances per served step")
    parser.add_argument("--intra-op-threads", type=int, default=0,
                        help="the served segmenter's runtime's intra-op threads (0: its default)")
    args = parser.parse_args(argv)
    print(json.dumps(serving_benchmark(tile=args.tile, tiles=args.tiles, batch=args.batch,
                                       max_in_flight=args.max_in_flight, encoder=args.encoder,
                                       precision=args.precision, runtime=args.runtime, instances=args.instances,
                                       intra_op_threads=args.intra_op_threads)), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
