"""Smaller served models: int8 (ONNX Runtime static quantization) for CPUs, fp16 for GPUs.

Both take an exported fp32 file (rsseg.export.onnx: normalised float32 NCHW in, logits out) and write one
that keeps that interface (the served preprocessing and postprocessing do not change) and the model spec
in its metadata.

- int8: the graph is optimised first (ONNX Runtime's quantization pre-processing: shape inference,
  constant folding and fusions such as Conv+BatchNorm; then the TF-"same" padding of the tf_* encoders,
  explicit Pad nodes ONNX Runtime does not fuse, is folded into the convolutions' own pads, and ReduceMean
  over H and W becomes GlobalAveragePool: both exact), then quantized statically (QDQ pairs by default,
  which ONNX Runtime and OpenVINO both run; or QOperator: QLinearConv and friends, ONNX Runtime only),
  weights per channel (int8), activations uint8, their ranges
  calibrated on real tiles (`calibration_tiles`: the version's training split through its manifest,
  normalised as in training) with `method` (minmax, entropy or percentile). `op_types` limits what is
  quantized (default: everything ONNX Runtime can; quantizing only Conv/MatMul left the Q/DQ pairs around
  the fp32 element-wise ops and ran slower than fp32, README). Last, the file is compacted (short tensor
  names, no zero weight zero points: exact), which keeps it under 1/3.5 of the fp32 file in either form.
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
from onnx import numpy_helper

from rsseg.data.datasets import PreparedData
from rsseg.data.transforms import normalize
from rsseg.errors import ConfigError, ExportError, first_line
from rsseg.export.onnx import INPUT_NAME
from rsseg.spec import DatasetSpec

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "fp16")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_OP_TYPES: tuple[str, ...] = ()  # every operator ONNX Runtime can quantize (measured best: README)


@dataclass(frozen=True)
class PrecisionRecipe:
    """How to make the served file(s): precision, and for int8 the calibration."""

    precision: str = "fp32"
    calibration_tiles: int = 64
    calibration_method: str = "minmax"
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    quant_format: str = "qdq"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")

    def check_runtime(self, runtime: str) -> None:
        """ConfigError when `runtime` cannot run this recipe's files: OpenVINO reads QDQ int8, not QOperator."""
        if runtime == "openvino" and self.precision == "int8" and self.quant_format != "qdq":
            raise ConfigError(f"runtime=openvino reads int8 files in the QDQ form only; use quant_format=qdq "
                              f"(not {self.quant_format}) or runtime=onnxruntime")

    @classmethod
    def from_config(cls, config: Any) -> PrecisionRecipe:
        """From a config with precision, calibration_tiles, calibration_method and quantize_ops."""
        ops = tuple(op.strip() for op in config.quantize_ops.split(",") if op.strip())
        return cls(config.precision, config.calibration_tiles, config.calibration_method, ops, config.quant_format)

    def record(self) -> dict[str, Any]:
        if self.precision != "int8":
            return {"precision": self.precision}
        return {"precision": "int8", "calibration_method": self.calibration_method,
                "quantized_ops": ",".join(self.op_types) or "all", "quant_format": self.quant_format}


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
                          op_types=recipe.op_types, quant_format=recipe.quant_format) for path in files]


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
    `quant_format`: qdq (Quantize/DequantizeLinear pairs ONNX Runtime and OpenVINO fuse into int8 kernels) or
    qoperator (QLinearConv and friends, ONNX Runtime only). The result is compacted (`compact`: exact)."""
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
            graph = onnx.load(str(prepared))
            fold_pads(graph)
            global_pools(graph)
            onnx.save(graph, str(prepared))
            quantize_static(str(prepared), str(Path(tmp) / "int8.onnx"), Tiles(), quant_format=formats[quant_format],
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method], op_types_to_quantize=list(op_types) or None,
                            extra_options={"CalibTensorRangeSymmetric": False})
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's quantizer raises many kinds; name the file
            raise ExportError(f"{fp32}: int8 quantization failed ({first_line(exc)})") from exc
        quantized = onnx.load(str(Path(tmp) / "int8.onnx"))
        compact(quantized)
        return _with_metadata(quantized, fp32, out, {"rsseg.precision": "int8",
                                                                    "rsseg.calibration_method": method,
                                                                    "rsseg.calibration_tiles": str(len(tiles)),
                                                                    "rsseg.quant_format": quant_format})


def fold_pads(model: onnx.ModelProto) -> int:
    """Fold each constant zero Pad whose only consumer is a Conv into that Conv's `pads` (ONNX Conv pads
    may be asymmetric; PyTorch's conv cannot say so, hence the Pad), in place; returns how many were folded.
    Pads whose amounts are not initializers (run ONNX Runtime's constant folding first) are left alone."""
    graph = model.graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded = []
    for pad in (n for n in graph.node if n.op_type == "Pad"):
        mode = next((a.s for a in pad.attribute if a.name == "mode"), b"constant")
        amounts = initializers.get(pad.input[1]) if len(pad.input) > 1 else None
        value = initializers.get(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(1)
        users = consumers.get(pad.output[0], [])
        if (mode != b"constant" or amounts is None or value is None or np.any(value != 0) or len(pad.input) > 3
                or len(users) != 1 or users[0].op_type != "Conv" or pad.output[0] in outputs):
            continue
        begin, end = amounts.tolist()[:4], amounts.tolist()[4:]  # N, C, H, W
        conv = users[0]
        if begin[:2] != [0, 0] or end[:2] != [0, 0] or any(a.name == "auto_pad" and a.s not in (b"", b"NOTSET")
                                                            for a in conv.attribute):
            continue
        attribute = next((a for a in conv.attribute if a.name == "pads"), None)
        top, left, bottom, right = list(attribute.ints) if attribute is not None else [0, 0, 0, 0]
        if attribute is not None:
            conv.attribute.remove(attribute)
        conv.attribute.append(onnx.helper.make_attribute(
            "pads", [top + begin[2], left + begin[3], bottom + end[2], right + end[3]]))
        conv.input[0] = pad.input[0]
        folded.append(pad)
    for pad in folded:
        graph.node.remove(pad)
    return len(folded)


def global_pools(model: onnx.ModelProto) -> int:
    """Turn each ReduceMean over H and W (keepdims) of a 4-D tensor into GlobalAveragePool, the same
    operation, which ONNX Runtime runs on int8 (QLinearGlobalAveragePool) where ReduceMean would need the
    whole map dequantized (the SCSE blocks' channel squeeze), in place; returns how many were turned."""
    graph = model.graph
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    turned = 0
    for node in graph.node:
        if node.op_type != "ReduceMean":
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        axes = attributes.get("axes")
        if axes is None and len(node.input) > 1:
            axes = initializers.get(node.input[1])
        if axes is None or sorted(int(a) for a in np.asarray(axes).ravel()) not in ([2, 3], [-2, -1]) \
                or attributes.get("keepdims", 1) != 1 or attributes.get("noop_with_empty_axes", 0):
            continue
        node.op_type = "GlobalAveragePool"
        del node.input[1:]
        del node.attribute[:]
        turned += 1
    return turned


def compact(model: onnx.ModelProto) -> dict[str, int]:
    """Make a quantized file smaller without changing what it computes, in place: the quantizer's long
    intermediate names (one per tensor, several per Q/DQ pair) become short ones, the inferred shapes it
    stored (value_info) go, and DequantizeLinear loses the all-zero int8 zero points of per-channel weights
    (an absent zero point is zero). Graph inputs and outputs keep their names. Returns what changed."""
    graph = model.graph
    kept = {v.name for v in graph.input} | {v.name for v in graph.output}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in kept:
            return name
        return short.setdefault(name, format(len(short), "x"))

    initializers = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    zero_points = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and len(node.input) == 3 and uses.get(node.input[2]) == 1:
            point = initializers.get(node.input[2])
            if point is not None and point.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(point).any():
                graph.initializer.remove(initializers.pop(node.input[2]))
                del node.input[2]
                zero_points += 1
    for init in graph.initializer:
        init.name = rename(init.name)
    for node in graph.node:
        node.name, node.doc_string = "", ""
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
    del graph.value_info[:]
    return {"renamed": len(short), "zero_points_dropped": zero_points}


def convert_fp16(fp32: str | Path, out: str | Path) -> Path:
    """`fp32` with weights and compute in fp16, inputs and outputs still fp32, at `out`."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"{fp32}: fp16 conversion failed ({first_line(exc)})") from exc
    return _with_metadata(model, fp32, out, {"rsseg.precision": "fp16"})


def file_sizes(*paths: str | Path) -> list[int]:
    return [Path(p).stat().st_size for p in paths]


def _with_metadata(model: onnx.ModelProto, source: str | Path, out: Path, extra: dict[str, Any]) -> Path:
    """`model` with `source`'s metadata (the model spec) plus `extra`, written to `out` (temp name, rename)."""
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
