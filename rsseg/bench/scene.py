"""Scene throughput: a generated scene end to end through a real client process (the code of
`clients/segment.py`, run as `python -m rsseg.client.cli`) and Triton,
beside ONNX Runtime in process and a PyTorch eager loop."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.transform import from_origin
from rasterio.windows import Window as RioWindow

from rsseg.bench.setup import in_process_logits, random_model, served
from rsseg.data.transforms import normalize
from rsseg.export.onnx import export_onnx
from rsseg.export.quantize import convert_fp16, quantize_int8
from rsseg.served_check import sample_tile
from rsseg.spec import DEFAULT_ENCODER


def write_large_scene(path: Path, size: int, block: int = 1024, seed: int = 0) -> Path:
    """A size x size RGB uint8 GeoTIFF written block by block (bounded memory whatever the size):
    smooth bright floes on dark water, tiled and compressed like a delivered scene."""
    rng = np.random.default_rng(seed)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "crs": "EPSG:3413",
               "transform": from_origin(-2_000_000, 1_000_000, 50, 50), "tiled": True, "blockxsize": 512,
               "blockysize": 512, "compress": "deflate", "BIGTIFF": "IF_SAFER"}
    yy, xx = np.mgrid[0:block, 0:block].astype(np.float32) / block
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, block):
            for col in range(0, size, block):
                h, w = min(block, size - row), min(block, size - col)
                phase = rng.uniform(0, 2 * np.pi, 3)
                ice = (np.sin(6 * yy[:h, :w] + phase[0]) * np.cos(5 * xx[:h, :w] + phase[1]) > 0.2)
                base = np.where(ice, 210.0, 60.0) + rng.normal(0, 12, (h, w))
                pixels = np.stack([base, base + 8, base + 15]).clip(0, 255).astype(np.uint8)
                dst.write(pixels, window=RioWindow(col, row, w, h))
    return path


def scene_benchmark(*, size: int = 8192, tile: int = 512, margin: int = 32, batch: int = 4, max_in_flight: int = 2,
                    reference_tiles: int = 16, encoder: str = DEFAULT_ENCODER,
                    shared_memory: str = "none", precision: str = "fp32", runtime: str = "onnxruntime"
                    ) -> dict[str, Any]:
    """End to end through Triton (a real client process, its peak memory from its scene summary)
    against ONNX Runtime in process and a PyTorch eager loop, all on the seed UNet at `tile`. With
    `precision` int8 or fp16 the server serves the reduced file (int8: promote's default recipe, calibrated on
    the reference tiles) and the references include it in process (`<runtime>_<precision>`); with `runtime`
    openvino the served segmenter and that reference compute with OpenVINO. The fp32 ONNX Runtime figures stay
    the baseline of the ratios."""
    model, spec = random_model(tile, encoder, classes=("background", "ice"))
    result: dict[str, Any] = {"scene": f"{size}x{size}", "tile": tile, "margin": margin, "batch": batch,
                              "max_in_flight": max_in_flight, "encoder": encoder, "shared_memory": shared_memory,
                              "precision": precision, "runtime": runtime}
    tiles = np.stack([sample_tile(spec, tile, seed=i) for i in range(reference_tiles)])
    with tempfile.TemporaryDirectory(prefix="rsseg-scene-bench-") as tmp:
        tmp_path = Path(tmp)
        onnx_path = export_onnx(model, spec, tmp_path / "model.onnx")
        run_ort = in_process_logits(onnx_path, spec)
        served_path = onnx_path
        if precision == "int8":
            served_path = quantize_int8(onnx_path, tmp_path / "int8.onnx", tiles, spec.dataset)
        elif precision == "fp16":
            served_path = convert_fp16(onnx_path, tmp_path / "fp16.onnx")
        served_as = f"{runtime}_{precision}" if (precision, runtime) != ("fp32", "onnxruntime") else None
        run_reduced = in_process_logits(served_path, spec, runtime) if served_as else None

        def references() -> dict[str, float]:
            """Tiles/s of ONNX Runtime in process and of a PyTorch eager sliding-window loop (what users
            run today) on the same tiles, each after one warm-up batch."""
            rates = {}
            run_ort(tiles[:batch])
            start = time.perf_counter()
            for i in range(0, len(tiles), batch):
                run_ort(tiles[i : i + batch]).argmax(axis=1)
            rates["onnxruntime"] = len(tiles) / (time.perf_counter() - start)
            if run_reduced is not None:
                run_reduced(tiles[:batch])
                start = time.perf_counter()
                for i in range(0, len(tiles), batch):
                    run_reduced(tiles[i : i + batch]).argmax(axis=1)
                rates[served_as] = len(tiles) / (time.perf_counter() - start)
            with torch.inference_mode():
                model(torch.from_numpy(np.stack([normalize(t, spec.dataset) for t in tiles[:batch]])))
                start = time.perf_counter()
                for i in range(0, len(tiles), batch):
                    x = torch.from_numpy(np.stack([normalize(t, spec.dataset) for t in tiles[i : i + batch]]))
                    model(x).argmax(dim=1)
                rates["pytorch_eager"] = len(tiles) / (time.perf_counter() - start)
            return rates

        before = references()

        scene = write_large_scene(tmp_path / "scene.tif", size)
        with served(tmp_path, spec, served_path, batch * max_in_flight, runtime=runtime) as server:
            start = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "rsseg.client.cli", str(scene), "--out", str(tmp_path / "out"),
                                   "--url", server.grpc_url, "--tile", str(tile), "--margin", str(margin),
                                   "--batch", str(batch), "--max-in-flight", str(max_in_flight),
                                   "--shared-memory", shared_memory, "--no-progress"],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - start
            result["server_steps"] = triton_step_times(server.metrics_url)
        # Measured again after the scene: this machine is shared and its speed drifts over minutes;
        # the ratios use the mean of both, and both are printed.
        after = references()
        for name in before:
            result[f"{name}_tiles_per_s_before"] = before[name]
            result[f"{name}_tiles_per_s_after"] = after[name]
            result[f"{name}_tiles_per_s"] = (before[name] + after[name]) / 2
        if done.returncode != 0:
            raise RuntimeError(f"the scene client failed: {done.stderr[-2000:]}")
        summary = json.loads((tmp_path / "out" / "scene.json").read_text())
    megapixels = size * size / 1e6
    windows = summary["windows_predicted"]
    result.update({
        "windows": windows,
        "end_to_end_s": wall,
        "end_to_end_megapixels_per_s": megapixels / wall,
        "end_to_end_tiles_per_s": windows / wall,
        "client_peak_rss_mb": summary["peak_rss_mb"],
    })
    result["ratio_end_to_end_to_onnxruntime_tiles"] = result["end_to_end_tiles_per_s"] / result["onnxruntime_tiles_per_s"]
    result["ratio_end_to_end_to_pytorch_eager_tiles"] = (result["end_to_end_tiles_per_s"]
                                                         / result["pytorch_eager_tiles_per_s"])
    keep = (tile - 2 * margin) ** 2 / tile**2
    result["scene_pixels_per_tile_pixel"] = keep
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}


def triton_step_times(metrics_url: str) -> dict[str, dict[str, float]]:
    """Per served model, from Triton's Prometheus metrics: tiles, executions (batches), seconds queued
    and computing, and tiles per compute second; where the end-to-end time went inside the server."""
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = {"nv_inference_count": "tiles", "nv_inference_exec_count": "executions",
              "nv_inference_queue_duration_us": "queue_s", "nv_inference_compute_infer_duration_us": "compute_s"}
    steps: dict[str, dict[str, float]] = {}
    for metric, model, value in re.findall(r'^(nv_inference_\w+)\{model="([^"]+)"[^}]*\} (\S+)$', text, re.M):
        if metric in wanted:
            scale = 1e-6 if metric.endswith("_us") else 1.0
            steps.setdefault(model, {})[wanted[metric]] = float(value) * scale
    for step in steps.values():
        if step.get("compute_s"):
            step["tiles_per_compute_s"] = step.get("tiles", 0.0) / step["compute_s"]
    return {model: {k: round(v, 3) for k, v in step.items()} for model, step in sorted(steps.items())}
