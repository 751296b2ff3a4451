"""Entry point `bench_scene`: segment one generated scene through Triton with clients/segment.py and
print end-to-end megapixels/s, the client's peak resident memory, ONNX Runtime's in-process tile
throughput and a plain PyTorch eager sliding-window loop on the same tiles, with the ratios."""

from __future__ import annotations

import argparse
import json

from pipelines._cli import run
from rsseg.bench.scene import scene_benchmark
from rsseg.spec import DEFAULT_ENCODER


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=8192, help="scene side in pixels (generated, windowed)")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--margin", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-in-flight", type=int, default=2)
    parser.add_argument("--reference-tiles", type=int, default=16,
                        help="tiles timed for the ONNX Runtime and PyTorch references")
    parser.add_argument("--encoder", default=DEFAULT_ENCODER)
    parser.add_argument("--shared-memory", choices=("none", "system"), default="none",
                        help="how the client hands tiles to the server on this host")
    parser.add_argument("--precision", choices=("fp32", "int8", "fp16"), default="fp32",
                        help="serve the model at this precision (int8: promote's default recipe); fp32 stays the "
                             "in-process reference")
    parser.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="what computes the served model (and its in-process reference)")
    args = parser.parse_args(argv)
    print(json.dumps(scene_benchmark(size=args.size, tile=args.tile, margin=args.margin, batch=args.batch,
                                     max_in_flight=args.max_in_flight, reference_tiles=args.reference_tiles,
                                     encoder=args.encoder, shared_memory=args.shared_memory,
                                     precision=args.precision, runtime=args.runtime)), flush=True)
    return 0


if __name__ == "__main__":
    run(main)
