"""Which int8 recipe and runtime keep a trained model's served metric and run faster? The seed UNet trained on a
benchmark dataset for a budget, exported (fp32), then quantized several ways; each file's size, its in-process
tiles/s on 512² batches in ONNX Runtime or OpenVINO (the served segmenter's work) and its served metric on the
validation scenes (through the served tiling, computed by the same runtime) are measured in one run, fp32 in
ONNX Runtime beside them. With `profile`, ONNX
Runtime's per-operator time of fp32 and of the default int8 recipe says where the time goes."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsseg.bench.datasets import benchmark_config, prepare_benchmark
from rsseg.evaluation import OnnxModel
from rsseg.export.onnx import export_onnx
from rsseg.export.quantize import DEFAULT_OP_TYPES, calibration_tiles, convert_fp16, quantize_int8
from rsseg.scoring import served_metrics
from rsseg.training import train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """One way to make the served file."""

    label: str
    precision: str = "int8"
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    method: str = "minmax"
    tiles: int = 64
    quant_format: str = "qdq"
    runtime: str = "onnxruntime"


RECIPES = (
    Recipe("fp32, ONNX Runtime", precision="fp32"),
    Recipe("fp32, OpenVINO", precision="fp32", runtime="openvino"),
    Recipe("int8 QDQ, minmax, 64 tiles (promote default), ONNX Runtime"),
    Recipe("int8 QDQ, minmax, 64 tiles (promote default), OpenVINO", runtime="openvino"),
    Recipe("int8 QOperator, minmax, 64 tiles, ONNX Runtime", quant_format="qoperator"),
    Recipe("int8 QDQ, percentile, 64 tiles, ONNX Runtime", method="percentile"),
    Recipe("int8 QDQ, percentile, 64 tiles, OpenVINO", method="percentile", runtime="openvino"),
    Recipe("fp16 (GPU format; ONNX Runtime CPU provider)", precision="fp16"),
)


def precision_table(name: str, budget: float, *, profile: bool = False, seconds: float = 10.0) -> dict[str, Any]:
    """Train on benchmark dataset `name` for `budget` s, then one row per RECIPES entry."""
    logging.getLogger("rsseg.client").setLevel(logging.WARNING)
    data = prepare_benchmark(name)
    result = train(benchmark_config(name, data.root, budget), data)
    spec = result.spec
    rows, made = [], {}
    with tempfile.TemporaryDirectory(prefix="rsseg-bench-precision-") as tmp:
        fp32 = export_onnx(result.model, spec, Path(tmp) / "fp32.onnx")
        speed_tiles = calibration_tiles(data, -1, 4, seed=1)  # real pixels, not calibration's
        speed_tiles = np.stack([_resized(t, 512) for t in speed_tiles])
        files: dict[tuple[Any, ...], Path] = {}  # a file made once serves both runtimes' rows
        for i, recipe in enumerate(RECIPES):
            key = (recipe.precision, recipe.op_types, recipe.method, recipe.tiles, recipe.quant_format)
            if key not in files:
                files[key] = _make(recipe, fp32, Path(tmp) / f"r{i}.onnx", data, spec)
            path = made[recipe.label] = files[key]
            model = OnnxModel(path, spec, runtime=recipe.runtime)
            metric = served_metrics(model, data).get(spec.dataset.headline_metric, float("nan"))
            rows.append({"recipe": recipe.label, "mb": round(path.stat().st_size / 1e6, 2),
                         "tiles_per_s": _tiles_per_s(model, speed_tiles, seconds),
                         "metric": round(float(metric), 4)})
            log.info("%s", json.dumps(rows[-1]))
        profiles = {}
        if profile:
            for recipe in (RECIPES[0], RECIPES[2]):
                profiles[recipe.label] = operator_profile(made[recipe.label], spec, speed_tiles)
    base = rows[0]
    for row in rows:
        row["size_ratio"] = round(base["mb"] / row["mb"], 2)
        row["speed_ratio"] = round(row["tiles_per_s"] / base["tiles_per_s"], 2)
        row["metric_drop"] = round(base["metric"] - row["metric"], 4)
    return {"dataset": name, "budget_s": budget, "metric": spec.dataset.headline_metric, "rows": rows,
            "profiles": profiles}


def _make(recipe: Recipe, fp32: Path, out: Path, data: Any, spec: Any) -> Path:
    if recipe.precision == "fp32":
        return fp32
    if recipe.precision == "fp16":
        return convert_fp16(fp32, out)
    tiles = calibration_tiles(data, -1, recipe.tiles)
    return quantize_int8(fp32, out, tiles, spec.dataset, method=recipe.method, op_types=recipe.op_types,
                         quant_format=recipe.quant_format)


def _resized(tile: np.ndarray, size: int) -> np.ndarray:
    """A tile reflected up to size x size (the benchmark tiles may be smaller than the served 512)."""
    h, w = tile.shape[:2]
    return np.pad(tile, ((0, max(0, size - h)), (0, max(0, size - w)), (0, 0)), mode="reflect")[:size, :size]


def _tiles_per_s(model: OnnxModel, tiles: np.ndarray, seconds: float) -> float:
    model.logits(tiles)  # warm-up
    runs, started = 0, time.perf_counter()
    while runs < 2 or time.perf_counter() - started < seconds:
        model.logits(tiles)
        runs += 1
    return round(runs * len(tiles) / (time.perf_counter() - started), 2)


def operator_profile(path: Path, spec: Any, tiles: np.ndarray, runs: int = 3, top: int = 8) -> dict[str, float]:
    """Share of ONNX Runtime's node time per operator type (the `top` largest) over `runs` batches."""
    import onnxruntime as ort

    from rsseg.data.transforms import normalize

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory(prefix="rsseg-profile-") as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        batch = np.stack([normalize(t, spec.dataset) for t in tiles])
        for _ in range(runs):
            session.run(None, {session.get_inputs()[0].name: batch})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event.get("args", {}).get("op_name", "?")] += float(event.get("dur", 0))
    total = sum(per_op.values()) or 1.0
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {op: round(dur / total, 3) for op, dur in ranked}


def format_precision_table(table: dict[str, Any]) -> str:
    lines = [f"| recipe ({table['dataset']}, {table['budget_s']:.0f} s) | MB | size ratio | tiles/s in process (512²) | "
             f"speed ratio | served {table['metric']} | drop |", "|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['recipe']} | {r['mb']} | {r['size_ratio']}× | {r['tiles_per_s']} | {r['speed_ratio']}× | "
                     f"{r['metric']:.4f} | {r['metric_drop']:+.4f} |")
    for label, shares in table["profiles"].items():
        lines.append(f"\nper-operator time, {label}: " + ", ".join(f"{op} {share:.0%}" for op, share in shares.items()))
    return "\n".join(lines)
