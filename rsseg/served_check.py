"""Does a Triton server answer like ONNX Runtime? Promotion and rollback start a real server on the staged
repository and compare its class maps for a test tile with ONNX Runtime's on the same ONNX file(s); `main`
asks the served model once and prints its answer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rsseg import faults
from rsseg.errors import ExportError, first_line
from rsseg.evaluation import OnnxModel
from rsseg.spec import ModelSpec


def served_check(repo: Path, name: str, spec: ModelSpec, onnx_path: Path | list[Path], *, runtime: str = "onnxruntime",
                 on_spawn: Callable[[int], None] | None = None, log_path: Path | None = None) -> dict[str, Any]:
    """Start Triton on `repo`, send one tile through the ensemble, compare with the same file(s) computed in
    process by the runtime the segmenter uses: the check proves the serving plumbing, pixel for pixel."""
    from tritonclient.utils import InferenceServerException

    from rsseg.client.oneshot import infer_tiles
    from rsseg.serving.server import TritonServer

    tile = sample_tile(spec)
    with TritonServer(repo, on_spawn=on_spawn, log_path=log_path) as server:
        faults.point("server-started")
        server.wait_model_ready(name)
        # tta=none whatever the served default: the same views on both sides (TTA is rsseg.averaging's, tested)
        try:
            served = infer_tiles(server.grpc_url, name, tile[None], tta="none")[0]
        except InferenceServerException as exc:  # a model that loads but cannot answer (e.g. a crashed stub)
            raise ExportError(f"the staged {name} failed a test request ({first_line(exc)}); the repository was not "
                              "changed") from None
    expected = onnx_class_maps(onnx_path, spec, tile[None], runtime)[0]
    agree = float((served == expected).mean())
    if agree < 1.0:
        raise ExportError(f"Triton's class map for a test tile differs from {runtime}'s in process on "
                          f"{(1 - agree) * 100:.3f} % of pixels; the repository was not changed")
    histogram = np.bincount(served[0].ravel(), minlength=spec.outputs[0].channels).tolist()
    return {"tile_shape": list(tile.shape), "pixels_agree": agree, "class_histogram": histogram}


def ask_server_once(repo: Path, model: str, tile: np.ndarray) -> str:
    """Start tritonserver on `repo` (loopback), segment one raw tile, stop; the answer as text."""
    from rsseg.client.oneshot import connect, infer_tiles, served_spec
    from rsseg.serving.server import TritonServer

    with TritonServer(repo) as server:
        server.wait_model_ready(model)
        with connect(server.grpc_url) as client:
            served = served_spec(client, model)
        maps = infer_tiles(server.grpc_url, model, tile[None])[0]
    lines = [f"tritonserver {server.grpc_url} served {model} v{served['model_version']} "
             f"(Triton version {served['triton']['version']}) for one {tile.shape[0]}x{tile.shape[1]} tile:"]
    names = served["dataset"]["classes"] if served["dataset"]["task"] != "change" else ["unchanged", "changed"]
    counts = np.bincount(maps[0].ravel(), minlength=len(names))
    total = int(counts.sum())
    lines += [f"  {name:<12} {int(n):>8} px  {100 * n / total:5.1f} %" for name, n in zip(names, counts, strict=False)]
    return "\n".join(lines)


def sample_tile(spec: ModelSpec, size: int | None = None, seed: int = 0) -> np.ndarray:
    """A deterministic raw tile in the spec's dtype and bands (smooth noise around the band means)."""
    rng = np.random.default_rng(seed)
    size = size or min(spec.tile_sizes)
    top = 255 if spec.dataset.dtype == "uint8" else 65535
    mean = np.asarray([*spec.dataset.mean] * (spec.in_channels // spec.dataset.num_bands))
    std = np.asarray([*spec.dataset.std] * (spec.in_channels // spec.dataset.num_bands))
    tile = mean + std * rng.standard_normal((size, size, spec.in_channels))
    return np.clip(tile, 0, top).astype(spec.dataset.dtype)


def onnx_class_maps(onnx_path: Path | list[Path], spec: ModelSpec, tiles: np.ndarray,
                    runtime: str = "onnxruntime") -> np.ndarray:
    """[N, H, W, C] raw tiles -> [N, G, H, W] uint8 class maps through `runtime` in process (the reference);
    several files: their logit average, as the served segmenter computes it."""
    return OnnxModel(onnx_path, spec, runtime=runtime).class_maps(tiles)
