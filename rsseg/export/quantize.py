"""Smaller served models: int8 (ONNX Runtime static quantization) for CPUs, fp16 for GPUs.

Both take an exported fp32 file (rsseg.export.onnx: normalised float32 NCHW in, logits out) and write one
that keeps that interface (the served preprocessing and postprocessing do not change) and the model spec
in its metadata.

- int8: the graph is optimised first (ONNX Runtime's quantization pre-processing: shape inference and
  graph fusions such as Conv+BatchNorm), then quantized statically in QDQ form, weights per channel
  (int8), activations uint8, their ranges calibrated on real tiles (`calibration_tiles`: the version's
  training split through its manifest, normalised as in training) with `method` (minmax, entropy or
  percentile). `op_types` limits what is quantized: by default only convolutions and matrix products,
  which hold the compute, while element-wise paths (squeeze-excitation gates, sigmoid, hard-swish, the
  decoder's additions) stay in fp32 where int8 rounding costs most accuracy for little speed.
- fp16: onnxruntime.transformers.float16 with inputs and outputs kept in fp32 (the served tensors do not
  change); for GPU instances. ONNX Runtime's CPU provider runs it too (slowly), which the tests use.

Whether a quantized model may be served is decided by its served metric (rsseg.promotion), not here.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from rsseg.data.datasets import PreparedData
from rsseg.data.transforms import normalize
from rsseg.errors import ConfigError, ExportError, first_line
from rsseg.export.onnx import INPUT_NAME
from rsseg.spec import DatasetSpec

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_OP_TYPES = ("Conv", "MatMul", "Gemm")


@dataclass(frozen=True)
class PrecisionRecipe:
    """How to make the served file(s): precision, and for int8 the calibration."""

    precision: str = "fp32"
    calibration_tiles: int = 64
    calibration_method: str = "minmax"
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    @classmethod
    def from_config(cls, config: Any) -> PrecisionRecipe:
        """From a config with precision, calibration_tiles, calibration_method and quantize_ops."""
        ops = tuple(op.strip() for op in config.quantize_ops.split(",") if op.strip())
        return cls(config.precision, config.calibration_tiles, config.calibration_method, ops)

    def record(self) -> dict[str, Any]:
        if self.precision != "int8":
            return {"precision": self.precision}
        return {"precision": "int8", "calibration_method": self.calibration_method,
                "quantized_ops": ",".join(self.op_types) or "all"}


def reduce_files(recipe: PrecisionRecipe, files: Sequence[Path], folder: Path, dataset: DatasetSpec,
                 data: PreparedData | None, fold: int = -1) -> list[Path]:
    """`files` at `recipe.precision` in `folder` (fp32: `files` themselves); int8 calibrates on `data`'s
    training split (`fold`)."""
    if recipe.precision == "fp32":
        return list(files)
    if recipe.precision == "fp16":
        return [convert_fp16(path, folder / f"fp16-{path.name}") for path in files]
    if data is None:
        raise ConfigError("int8 needs the model's training data to calibrate on; it is not here")
    tiles = calibration_tiles(data, fold, recipe.calibration_tiles)
    return [quantize_int8(path, folder / f"int8-{path.name}", tiles, dataset, method=recipe.calibration_method,
                          op_types=recipe.op_types) for path in files]


def calibration_tiles(data: PreparedData, fold: int, count: int, seed: int = 0) -> np.ndarray:
    """`count` training tiles of `data` (raw pixels, HWC, model band order), drawn at random without
    replacement (all of them when there are fewer)."""
    train, _ = data.split_tiles(fold)
    chosen = np.random.default_rng(seed).choice(len(train), size=min(count, len(train)), replace=False)
    return np.stack([data.raw_window(train.iloc[int(i)]) for i in sorted(chosen)])


def quantize_int8(fp32: str | Path, out: str | Path, tiles: np.ndarray, dataset: DatasetSpec, *,
                  method: str = "minmax", op_types: Sequence[str] = DEFAULT_OP_TYPES, batch: int = 4,
                  quant_format: str = "qdq") -> Path:
    """`fp32` quantized to int8 at `out`, calibrated on `tiles` (raw HWC, normalised here as in training).
    `quant_format`: qdq (Quantize/DequantizeLinear pairs ONNX Runtime fuses into int8 kernels) or qoperator
    (QLinearConv and friends)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if quant_format not in ("qdq", "qoperator"):
        raise ConfigError(f"quantization format {quant_format!r}: choose qdq or qoperator")
    if method not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method {method!r}: choose one of {', '.join(CALIBRATION_METHODS)}")
    if len(tiles) == 0:
        raise ConfigError("int8 quantization needs calibration tiles; the training split gave none")
    inputs = np.stack([normalize(t, dataset) for t in tiles]).astype(np.float32)

    class Tiles(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([inputs[i:i + batch] for i in range(0, len(inputs), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self.batches, None)
            return None if chunk is None else {INPUT_NAME: chunk}

    out = Path(out)
    formats = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    with tempfile.TemporaryDirectory(prefix="rsseg-quantize-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(Path(tmp) / "int8.onnx"), Tiles(), quant_format=formats[quant_format],
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], op_types_to_quantize=list(op_types) or None,
                            extra_options={"CalibTensorRangeSymmetric": False})
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's quantizer raises many kinds; name the file
            raise ExportError(f"{fp32}: int8 quantization failed ({first_line(exc)})") from exc
        return _with_metadata(Path(tmp) / "int8.onnx", fp32, out, {"rsseg.precision": "int8",
                                                                    "rsseg.calibration_method": method,
                                                                    "rsseg.calibration_tiles": str(len(tiles)),
                                                                    "rsseg.quant_format": quant_format})


def convert_fp16(fp32: str | Path, out: str | Path) -> Path:
    """`fp32` with weights and compute in fp16, inputs and outputs still fp32, at `out`."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{fp32}: fp16 conversion failed ({first_line(exc)})") from exc
    with tempfile.TemporaryDirectory(prefix="rsseg-fp16-") as tmp:
        onnx.save(model, str(Path(tmp) / "fp16.onnx"))
        return _with_metadata(Path(tmp) / "fp16.onnx", fp32, out, {"rsseg.precision": "fp16"})


def file_sizes(*paths: str | Path) -> list[int]:
    return [Path(p).stat().st_size for p in paths]


def _with_metadata(made: Path, source: str | Path, out: Path, extra: dict[str, Any]) -> Path:
    """`made` with `source`'s metadata (the model spec) plus `extra`, written to `out` (temp name, rename)."""
    model = onnx.load(str(made))
    values = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    values.update({k: str(v) for k, v in extra.items()})
    del model.metadata_props[:]
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    onnx.save(model, str(tmp))
    tmp.rename(out)
    log.info("%s: %s (%.1f MB, fp32 %.1f MB)", out, extra.get("rsseg.precision"), out.stat().st_size / 1e6,
             Path(source).stat().st_size / 1e6)
    return out
