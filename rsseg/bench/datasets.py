"""The real datasets of the benchmarks (../shared/data): how each is prepared and trained, and the
trivial baselines a model must beat on it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rsseg.config import TrainConfig
from rsseg.data.datasets import PreparedData
from rsseg.data.defaults import PREPARED_ROOT
from rsseg.data.prepare import prepare_dataset
from rsseg.errors import DataError
from rsseg.training import TrainResult

log = logging.getLogger(__name__)

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


@dataclass(frozen=True)
class Recipe:
    """How one real dataset is prepared and trained for the benchmark."""

    folder: str
    prepare: dict[str, Any]
    train: dict[str, Any] = field(default_factory=dict)


# Validation shares: enough held-out scenes for a stable figure (roads 21 of 70 images, Dubai 16 of 54,
# LEVIR-CD 3 of 7 pairs); both recipes of the quality benchmark train on the rest.
RECIPES = {
    # 400x400 aerial images, anti-aliased grey masks: road = value >= 128.
    "roads": Recipe("roads", {"layout": "pairs", "mask_threshold": 128, "tile_size": 256, "overlap": 112,
                              "classes": ["background", "road"], "val_fraction": 0.3}),
    # Colour-coded land cover, 509..1100 px JPEGs; black slivers and "unlabeled" are ignored.
    "dubai": Recipe("dubai_landcover", {"layout": "palette", "palette": "dubai", "tile_size": 256, "overlap": 32,
                                        "val_fraction": 0.3}),
    # LEVIR-CD 256x256 triplets: binary change.
    "levir": Recipe("levir_cd", {"layout": "change", "tile_size": 256, "overlap": 0, "val_fraction": 0.4}),
}


def prepare_benchmark(name: str, data_root: Path = SHARED_DATA, out_root: Path = PREPARED_ROOT) -> PreparedData:
    recipe = RECIPES[name]
    source = data_root / recipe.folder
    if not source.is_dir():
        raise DataError(f"{source}: benchmark data not found; the benchmarks need ../shared/data beside the project")
    out = out_root / f"bench-{name}"
    prepare_dataset(source, out, name=f"bench-{name}", progress=False, overwrite=True, **recipe.prepare)
    return PreparedData.load(out)


def benchmark_config(name: str, data: Path, budget: float, **overrides: Any) -> TrainConfig:
    """The default recipe with a wall-clock budget (epochs only bound the run; the budget stops it)."""
    values = {"data": str(data), "epochs": 100_000, "restart_epochs": 200, "time_budget": budget, "register": False,
              **RECIPES[name].train, **overrides}
    return TrainConfig(**values)


@contextmanager
def throwaway_store(folder: Path) -> Iterator[None]:
    """MLflow tracking in a SQLite store inside `folder` for the duration (the benchmarks' evaluations and
    pseudo-labellings log runs; they must not land in the user's store), then the previous URI again."""
    import mlflow

    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def baselines(result: TrainResult) -> dict[str, float]:
    """Headline metric of constant predictions on the same validation pixels.

    Binary and change: predicting the positive class everywhere gives IoU = its share p and F1 = 2p/(1+p);
    predicting none gives 0. Multiclass: the majority class everywhere gives IoU = its share for that
    class and 0 for the others (mIoU over the classes present).
    """
    counts = np.asarray(result.confusion, dtype=np.float64).sum(axis=1)  # reference pixels per class
    total = counts.sum()
    if total == 0:
        return {}
    task = result.spec.dataset.task
    if task in ("binary", "change"):
        share = counts[1] / total
        f1 = "f1" in result.spec.dataset.headline_metric
        return {"all_positive": float(2 * share / (1 + share) if f1 else share), "all_negative": 0.0}
    present = counts > 0
    return {"majority_class": float(counts.max() / total / present.sum())}
