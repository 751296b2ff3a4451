"""Promotion's precision step: the exported fp32 file(s) made int8 or fp16 (rsseg.export.quantize), and the
gate that decides whether they may be served. The gate is the served metric: the fp32 and the reduced
model are both scored on the version's validation split through the served tiling (the `evaluate` code
path, in process, by the runtime that will serve them), and the reduced one is refused when it loses more than `max_metric_drop`.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from rsseg.config import PromoteConfig
from rsseg.data.datasets import PreparedData
from rsseg.errors import PromotionRefused
from rsseg.evaluation import OnnxModel
from rsseg.export.quantize import PrecisionRecipe, file_sizes, reduce_files
from rsseg.scoring import check_data, data_root, served_metrics, training_fold
from rsseg.spec import ModelSpec

log = logging.getLogger(__name__)


def reduce_precision(config: PromoteConfig, spec: ModelSpec, fp32: list[Path], work: Path,
                     member_specs: list[ModelSpec] | None = None) -> tuple[list[Path], dict[str, Any]]:
    """The files to serve at `config.precision` and the record of how they were made and scored; raises
    PromotionRefused when the served metric drops more than `config.max_metric_drop`."""
    recipe = PrecisionRecipe.from_config(config)
    recipe.check_runtime(config.runtime)
    if recipe.precision == "fp32":
        return fp32, {**recipe.record(), "runtime": config.runtime}
    members = member_specs or [spec]
    data = PreparedData.load(data_root("", members))
    check_data(data, spec)
    if recipe.precision == "fp16" and config.instance_kind == "cpu":
        log.warning("precision=fp16 serves on CPU instances: ONNX Runtime's CPU provider runs fp16 slower than fp32; "
                    "fp16 is meant for instance_kind=gpu")
    work.mkdir(parents=True, exist_ok=True)
    fold = training_fold(members[0])
    reduced = reduce_files(recipe, fp32, work, spec.dataset, data, fold)
    record: dict[str, Any] = {**recipe.record(), "runtime": config.runtime, "data": str(data.root)}
    if recipe.precision == "int8":
        record.update(calibration_tiles=min(recipe.calibration_tiles, len(data.split_tiles(fold)[0])),
                      calibration_fold=fold)
    headline = spec.dataset.headline_metric
    before = served_metrics(OnnxModel(fp32, spec, runtime=config.runtime), data).get(headline, math.nan)
    after = served_metrics(OnnxModel(reduced, spec, runtime=config.runtime), data).get(headline, math.nan)
    drop = before - after
    record.update(metric=headline, fp32_metric=round(before, 5), metric_value=round(after, 5),
                  metric_drop=round(drop, 5), max_metric_drop=config.max_metric_drop,
                  fp32_bytes=sum(file_sizes(*fp32)), bytes=sum(file_sizes(*reduced)))
    record["size_ratio"] = round(record["fp32_bytes"] / max(1, record["bytes"]), 2)
    log.info("%s: served %s %.4f vs fp32 %.4f (drop %.4f, allowed %.4f); %.1f MB vs %.1f MB", recipe.precision,
             headline, after, before, drop, config.max_metric_drop, record["bytes"] / 1e6, record["fp32_bytes"] / 1e6)
    if not math.isfinite(drop) or drop > config.max_metric_drop:
        raise PromotionRefused(f"{recipe.precision} model scores {headline} {after:.4f} on the served validation "
                               f"split of {data.root}, {drop:.4f} below fp32's {before:.4f} (max_metric_drop "
                               f"{config.max_metric_drop}); nothing was changed. Calibrate on more tiles, another "
                               "calibration_method or fewer quantize_ops, or serve fp32")
    return reduced, record
