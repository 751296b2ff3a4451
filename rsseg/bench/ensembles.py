"""One model or an ensemble for the same training time? On a benchmark dataset: the default recipe trained for
the whole budget, and a snapshot-ensemble run (snapshots=true: the cosine schedule restarts `cycles` times
in the same budget, the weights at each cycle's end kept) scored as its last snapshot alone and as the
logit average of all its snapshots. Every figure comes from `evaluate`'s own code (rsseg.scoring:
whole validation scenes through the client's tiling, ONNX Runtime in process), logged in a throwaway
MLflow store. Beside them: the in-process ONNX Runtime tiles/s of the ensemble against one member."""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from rsseg.bench.datasets import benchmark_config, prepare_benchmark, throwaway_store
from rsseg.config import EvaluateConfig
from rsseg.evaluation import OnnxModel
from rsseg.export.onnx import export_onnx
from rsseg.scoring import evaluate_loaded
from rsseg.spec import ensemble_spec
from rsseg.training import train

log = logging.getLogger(__name__)


def ensemble_row(name: str, budget: float, cycles: int = 3) -> dict[str, Any]:
    """Single model vs snapshot ensemble on one benchmark dataset, the same training budget each."""

    logging.getLogger("rsseg.client").setLevel(logging.WARNING)
    data = prepare_benchmark(name)
    config = benchmark_config(name, data.root, budget)
    single = train(config, data)
    snapshots = train(replace(config, snapshots=True, cycles=cycles), data)
    members = [(shot["model"], snapshots.spec) for shot in snapshots.snapshots]
    with tempfile.TemporaryDirectory(prefix="rsseg-bench-ensembles-") as tmp:
        with throwaway_store(Path(tmp)):
            score = {label: _headline(evaluate_loaded(models, EvaluateConfig(model=label, data=str(data.root),
                                                                              tag=False)))
                     for label, models in (("single", [(single.model, single.spec)]),
                                           ("last snapshot", members[-1:]),
                                           (f"{len(members)}-snapshot ensemble", members))}
        rates = _tiles_per_s(members, Path(tmp))
    return {"dataset": name, "budget_s": budget, "metric": single.spec.dataset.headline_metric, "cycles": cycles,
            "single": score["single"], "last_snapshot": score["last snapshot"],
            "snapshot_ensemble": score[f"{len(members)}-snapshot ensemble"],
            "snapshot_val": [round(s["metrics"].get(f"val_{single.spec.dataset.headline_metric}", float("nan")), 4)
                             for s in snapshots.snapshots], **rates}


def _headline(summary: dict[str, Any]) -> float:
    return round(float(summary["headline"]), 4)


def _tiles_per_s(members: list[tuple[Any, Any]], tmp: Path, tile: int = 512, batch: int = 4,
                 seconds: float = 10.0) -> dict[str, float]:
    """ONNX Runtime in process (the served segmenter's work) on batches of 512² tiles: one member, and the
    logit average of all of them."""
    spec = ensemble_spec([s for _, s in members])
    paths = [export_onnx(m, s, tmp / f"member{i}.onnx") for i, (m, s) in enumerate(members)]
    tiles = np.random.default_rng(0).integers(0, 256, (batch, tile, tile, spec.in_channels), dtype=np.uint8)
    out = {}
    for label, files in (("one_model_tiles_per_s", paths[:1]), ("ensemble_tiles_per_s", paths)):
        model = OnnxModel(files, spec)
        model.logits(tiles)  # warm-up
        runs, started = 0, time.monotonic()
        while runs < 2 or time.monotonic() - started < seconds:
            model.logits(tiles)
            runs += 1
        out[label] = round(runs * batch / (time.monotonic() - started), 2)
    return out


def format_ensemble_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| dataset (metric) | budget | single model | last snapshot | snapshot ensemble | snapshots' own "
             "validation | ORT tiles/s: one / ensemble |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} ({r['metric']}) | {r['budget_s']:.0f} s | {r['single']:.3f} | "
                     f"{r['last_snapshot']:.3f} | {r['snapshot_ensemble']:.3f} ({r['cycles']} members) | "
                     f"{', '.join(f'{v:.3f}' for v in r['snapshot_val'])} | {r['one_model_tiles_per_s']} / "
                     f"{r['ensemble_tiles_per_s']} |")
    return "\n".join(lines)
