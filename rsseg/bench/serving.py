"""Serving throughput: tiles/s of the seed UNet through the Triton ensemble and through ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rsseg.config import TrainConfig
from rsseg.spec import DEFAULT_ENCODER


def serving_benchmark(*, tile_size: int = 512, tiles: int = 16, batch: int = 4, concurrency: int = 2,
                      encoder: str = DEFAULT_ENCODER) -> dict[str, Any]:
    """Tiles/s of the seed UNet through the Triton ensemble (gRPC) and through ONNX Runtime in one
    process, on the same raw tiles, doing the same work (normalise, model, argmax).

    The model is random-init (speed does not depend on the weights) and is served from a temporary
    repository written by the promotion code, so no registry is needed.
    """
    import tempfile
    import time

    import tritonclient.grpc as grpcclient

    from rsseg import contract
    from rsseg.client.oneshot import connect, served_spec
    from rsseg.data.transforms import normalize
    from rsseg.export.onnx import export_onnx, onnx_session
    from rsseg.promotion import sample_tile
    from rsseg.serving.repository import ServingOptions, stage_promotion
    from rsseg.serving.server import TritonServer
    from rsseg.spec import DatasetSpec, default_colors
    from rsseg.training import build_model

    dataset = DatasetSpec(name="benchmark", task="binary", classes=["background", "target"],
                          colors=default_colors(2), bands=[1, 2, 3])
    model, spec = build_model(TrainConfig(encoder=encoder), dataset, tile_size)
    raw = np.stack([sample_tile(spec, tile_size, seed=i) for i in range(tiles)])
    batches = [raw[i : i + batch] for i in range(0, tiles, batch)]
    result: dict[str, Any] = {"tile_size": tile_size, "tiles": tiles, "batch": batch, "concurrency": concurrency,
                              "encoder": encoder}
    with tempfile.TemporaryDirectory(prefix="rsseg-bench-") as tmp:
        onnx_path = export_onnx(model, spec, Path(tmp) / "model.onnx")
        session = onnx_session(onnx_path)
        name = session.get_inputs()[0].name

        def ort_batch(tiles_hwc: np.ndarray) -> np.ndarray:
            x = np.stack([normalize(t, spec.dataset) for t in tiles_hwc])
            return session.run(None, {name: x})[0].argmax(axis=1).astype(np.uint8)

        ort_batch(batches[0])  # warm-up
        start = time.perf_counter()
        for b in batches:
            ort_batch(b)
        result["onnxruntime_tiles_per_s"] = tiles / (time.perf_counter() - start)

        repo = Path(tmp) / "repo"
        stage_promotion(Path(tmp) / "none", repo, "bench", spec, onnx_path,
                        ServingOptions(max_batch_size=batch * concurrency), {"benchmark": True})
        with TritonServer(repo) as server:
            server.wait_model_ready("bench")
            with connect(server.grpc_url) as probe:
                limit = served_spec(probe, "bench")["triton"]["max_message_bytes"]
            with connect(server.grpc_url, limit) as client:
                def request(b: np.ndarray) -> grpcclient.InferInput:
                    tensor = grpcclient.InferInput(contract.TILES, list(b.shape), contract.wire_type(str(b.dtype)))
                    tensor.set_data_from_numpy(b)
                    return tensor

                # A segmentation client asks for the class map only.
                client.infer("bench", [request(batches[0])], outputs=[grpcclient.InferRequestedOutput(contract.CLASS_MAP)])
                start = time.perf_counter()
                _infer_with_concurrency(client, "bench", [request(b) for b in batches], concurrency)
                result["triton_tiles_per_s"] = tiles / (time.perf_counter() - start)
    result["ratio_triton_to_onnxruntime"] = result["triton_tiles_per_s"] / result["onnxruntime_tiles_per_s"]
    megapixels = tile_size * tile_size / 1e6
    result["triton_megapixels_per_s"] = result["triton_tiles_per_s"] * megapixels
    result["onnxruntime_megapixels_per_s"] = result["onnxruntime_tiles_per_s"] * megapixels
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def _infer_with_concurrency(client: Any, model: str, requests: list[Any], concurrency: int) -> None:
    """Keep `concurrency` requests in flight until all are answered; raise the first error."""
    import queue

    import tritonclient.grpc as grpcclient

    from rsseg import contract

    done: queue.Queue = queue.Queue()
    pending = list(requests)
    in_flight = 0
    while pending or in_flight:
        while pending and in_flight < concurrency:
            client.async_infer(model, [pending.pop(0)], callback=lambda result, error: done.put(error),
                               outputs=[grpcclient.InferRequestedOutput(contract.CLASS_MAP)])
            in_flight += 1
        error = done.get(timeout=600)
        in_flight -= 1
        if error is not None:
            raise error
