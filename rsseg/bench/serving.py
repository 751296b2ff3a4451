"""Serving throughput: tiles/s of the seed UNet through the Triton ensemble and through ONNX Runtime."""

from __future__ import annotations

import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from rsseg import contract
from rsseg.bench.setup import BENCH_MODEL, in_process_logits, random_model, served
from rsseg.client.oneshot import connect, served_spec
from rsseg.export.onnx import export_onnx
from rsseg.export.quantize import convert_fp16, quantize_int8
from rsseg.served_check import sample_tile
from rsseg.spec import DEFAULT_ENCODER


def serving_benchmark(*, tile: int = 512, tiles: int = 16, batch: int = 4, max_in_flight: int = 2,
                      encoder: str = DEFAULT_ENCODER, precision: str = "fp32", runtime: str = "onnxruntime",
                      instances: int = 1, intra_op_threads: int = 0) -> dict[str, Any]:
    """Tiles/s of the seed UNet through the Triton ensemble (gRPC) and in one process, on the same raw tiles,
    doing the same work (normalise, model, argmax). fp32 in ONNX Runtime is always measured: the baseline.
    With `precision` int8 or fp16 the reduced file is measured too (keys prefixed `<precision>_`; int8
    calibrated on the benchmark tiles: speed does not depend on the ranges); with `runtime` openvino, the fp32
    and reduced files are measured again with OpenVINO computing them, in process and in the served segmenter
    (keys prefixed `openvino_fp32_`, `openvino_<precision>_`), all in the same run. `instances`: model
    instances per step in the served repository; `intra_op_threads`: the served segmenter's runtime threads
    (0: its default)."""
    model, spec = random_model(tile, encoder)
    raw = np.stack([sample_tile(spec, tile, seed=i) for i in range(tiles)])
    batches = [raw[i : i + batch] for i in range(0, tiles, batch)]
    result: dict[str, Any] = {"tile": tile, "tiles": tiles, "batch": batch, "max_in_flight": max_in_flight,
                              "encoder": encoder, "precision": precision, "runtime": runtime,
                              "instances": instances, "intra_op_threads": intra_op_threads}
    with tempfile.TemporaryDirectory(prefix="rsseg-bench-") as tmp:
        fp32 = export_onnx(model, spec, Path(tmp) / "model.onnx")
        reduced = fp32
        if precision == "int8":
            reduced = quantize_int8(fp32, Path(tmp) / "int8.onnx", raw, spec.dataset)
        elif precision == "fp16":
            reduced = convert_fp16(fp32, Path(tmp) / "fp16.onnx")
        measured = [("", fp32, "onnxruntime")]
        if precision != "fp32":
            measured.append((f"{precision}_", reduced, "onnxruntime"))
        if runtime != "onnxruntime":
            measured.append((f"{runtime}_fp32_", fp32, runtime))
            if precision != "fp32":
                measured.append((f"{runtime}_{precision}_", reduced, runtime))
        for prefix, onnx_path, computes in measured:
            result.update({prefix + k: v for k, v in _measure(Path(tmp) / f"{prefix}served", spec, onnx_path,
                                                               batches, tiles, batch, max_in_flight, instances,
                                                               intra_op_threads, computes).items()})
            result[prefix + "onnx_mb"] = onnx_path.stat().st_size / 1e6
        for prefix, _, computes in measured[1:]:  # against fp32 in ONNX Runtime, the same run
            result[f"{prefix}{computes}_tiles_per_s_vs_fp32"] = (result[f"{prefix}{computes}_tiles_per_s"]
                                                                 / result["onnxruntime_tiles_per_s"])
            result[f"{prefix}triton_tiles_per_s_vs_fp32"] = (result[f"{prefix}triton_tiles_per_s"]
                                                             / result["triton_tiles_per_s"])
            result[f"{prefix}triton_vs_fp32_onnxruntime"] = (result[f"{prefix}triton_tiles_per_s"]
                                                             / result["onnxruntime_tiles_per_s"])
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def _measure(tmp: Path, spec: Any, onnx_path: Path, batches: list[np.ndarray], tiles: int, batch: int,
             max_in_flight: int, instances: int = 1, intra_op_threads: int = 0,
             runtime: str = "onnxruntime") -> dict[str, float]:
    """One ONNX file computed by `runtime`: tiles/s in process and through a real server, and their ratio."""
    result: dict[str, float] = {}
    tmp.mkdir()
    logits = in_process_logits(onnx_path, spec, runtime)

    def in_process_batch(tiles_hwc: np.ndarray) -> np.ndarray:
        return logits(tiles_hwc).argmax(axis=1).astype(np.uint8)

    in_process_batch(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches:
        in_process_batch(b)
    result[f"{runtime}_tiles_per_s"] = tiles / (time.perf_counter() - start)

    with served(tmp, spec, onnx_path, batch * max_in_flight, instances, intra_op_threads, runtime) as server:
        with connect(server.grpc_url) as probe:
            limit = served_spec(probe, BENCH_MODEL)["triton"]["max_message_bytes"]
        with connect(server.grpc_url, limit) as client:
            def request(b: np.ndarray) -> grpcclient.InferInput:
                tensor = grpcclient.InferInput(contract.TILES, list(b.shape), contract.wire_type(str(b.dtype)))
                tensor.set_data_from_numpy(b)
                return tensor

            # A segmentation client asks for the class map only.
            client.infer(BENCH_MODEL, [request(batches[0])],
                         outputs=[grpcclient.InferRequestedOutput(contract.CLASS_MAP)])
            start = time.perf_counter()
            _infer_in_flight(client, BENCH_MODEL, [request(b) for b in batches], max_in_flight)
            result["triton_tiles_per_s"] = tiles / (time.perf_counter() - start)
    result[f"ratio_triton_to_{runtime}"] = result["triton_tiles_per_s"] / result[f"{runtime}_tiles_per_s"]
    megapixels = batches[0].shape[1] * batches[0].shape[2] / 1e6
    result["triton_megapixels_per_s"] = result["triton_tiles_per_s"] * megapixels
    result[f"{runtime}_megapixels_per_s"] = result[f"{runtime}_tiles_per_s"] * megapixels
    return result


def _infer_in_flight(client: Any, model: str, requests: list[Any], max_in_flight: int) -> None:
    """Keep `max_in_flight` requests in flight until all are answered; raise the first error."""
    done: queue.Queue = queue.Queue()
    pending = list(requests)
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < max_in_flight:
            client.async_infer(model, [pending.pop(0)], callback=lambda result, error: done.put(error),
                               outputs=[grpcclient.InferRequestedOutput(contract.CLASS_MAP)])
            in_flight += 1
        error = done.get(timeout=600)
        in_flight -= 1
        if error is not None:
            raise error
