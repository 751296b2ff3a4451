"""Reduced-precision serving: int8 (ONNX Runtime static quantization) and fp16 files keep the served interface
and the spec, agree with fp32 on a trained model (in ONNX Runtime and in OpenVINO), and promotion serves them
only when the served metric holds (a broken calibration is refused, nothing changed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from mlflow import MlflowClient

from rsseg.config import PromoteConfig
from rsseg.data.datasets import PreparedData
from rsseg.errors import ConfigError, PromotionRefused
from rsseg.evaluation import OnnxModel
from rsseg.export.onnx import export_onnx, read_spec
from rsseg.export.quantize import calibration_tiles, convert_fp16, quantize_int8
from rsseg.training import train
from tests.conftest import tiny_config

# Class maps of the quantized tiny model (3 epochs: many near-tie pixels) agree with fp32 on at least this
# share of pixels (measured 0.99+ with the seed's SCSE decoder, 0.966 with today's default decoder).
INT8_AGREEMENT = 0.96
FP16_AGREEMENT = 0.995
RUNTIME_AGREEMENT = 0.999  # the same fp32 file in OpenVINO (fp32 inference pinned) and in ONNX Runtime


@pytest.fixture(scope="module")
def trained(seaice_prepared, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("precision")
    result = train(tiny_config(seaice_prepared, tmp, epochs=3, lr=3e-3), PreparedData.load(seaice_prepared))
    fp32 = export_onnx(result.model, result.spec, tmp / "model.onnx")
    return result.spec, fp32, PreparedData.load(seaice_prepared)


def _agreement(a: OnnxModel, b: OnnxModel, tiles: np.ndarray) -> float:
    return float((a.class_maps(tiles) == b.class_maps(tiles)).mean())


@pytest.mark.slow
def test_int8_and_fp16_agree_with_fp32_and_keep_the_spec(trained, tmp_path):
    spec, fp32, data = trained
    tiles = calibration_tiles(data, -1, 16)
    assert len(tiles) == min(16, len(data.split_tiles(-1)[0]))
    held_out = np.stack([data.raw_tile(i) for i in np.flatnonzero(data.tiles["split"] == "val")])
    int8 = quantize_int8(fp32, tmp_path / "int8.onnx", tiles, spec.dataset)
    fp16 = convert_fp16(fp32, tmp_path / "fp16.onnx")
    reference = OnnxModel(fp32, spec)
    assert _agreement(reference, OnnxModel(int8, spec), held_out) >= INT8_AGREEMENT
    assert _agreement(reference, OnnxModel(fp16, spec), held_out) >= FP16_AGREEMENT
    assert _agreement(reference, OnnxModel(fp32, spec, runtime="openvino"), held_out) >= RUNTIME_AGREEMENT
    assert _agreement(reference, OnnxModel(int8, spec, runtime="openvino"), held_out) >= INT8_AGREEMENT
    for path, precision in ((int8, "int8"), (fp16, "fp16")):
        assert read_spec(path) == read_spec(fp32)  # the served spec rides along
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert meta["rsseg.precision"] == precision
        graph = onnx.load(str(path)).graph
        assert [i.type.tensor_type.elem_type for i in graph.input] == [onnx.TensorProto.FLOAT]  # fp32 in and out
        assert [o.type.tensor_type.elem_type for o in graph.output] == [onnx.TensorProto.FLOAT]
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert int8.stat().st_size < fp32.stat().st_size
    with pytest.raises(ConfigError, match="calibration method"):
        quantize_int8(fp32, tmp_path / "x.onnx", tiles, spec.dataset, method="guess")


@pytest.mark.slow
def test_compacting_a_quantized_file_changes_its_size_not_its_answers(trained, tmp_path, monkeypatch):
    import onnxruntime as ort

    from rsseg.export import quantize as quantize_module

    spec, fp32, data = trained
    tiles = calibration_tiles(data, -1, 8)
    compacted = quantize_int8(fp32, tmp_path / "compact.onnx", tiles, spec.dataset)
    monkeypatch.setattr(quantize_module, "compact", lambda model: {})
    plain = quantize_int8(fp32, tmp_path / "plain.onnx", tiles, spec.dataset)
    assert compacted.stat().st_size < 0.95 * plain.stat().st_size
    graph = onnx.load(str(compacted)).graph
    assert max(len(o) for n in graph.node for o in n.output if o not in {v.name for v in graph.output}) <= 4
    x = np.random.default_rng(0).standard_normal((2, spec.in_channels, 64, 64)).astype(np.float32)
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
               for p in (plain, compacted)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert read_spec(compacted) == read_spec(fp32)


def test_openvino_refuses_qoperator_files():
    from rsseg.export.quantize import PrecisionRecipe

    PrecisionRecipe("int8", quant_format="qdq").check_runtime("openvino")
    PrecisionRecipe("int8", quant_format="qoperator").check_runtime("onnxruntime")
    with pytest.raises(ConfigError, match="QDQ form only"):
        PrecisionRecipe("int8", quant_format="qoperator").check_runtime("openvino")


@pytest.mark.slow
@pytest.mark.triton
def test_promotion_serves_int8_only_when_the_served_metric_holds(seaice_prepared, mlflow_store, tmp_path,
                                                                  monkeypatch):
    from rsseg.export import quantize as quantize_module
    from rsseg.promotion import promote
    from rsseg.serving.repository import read_history, served_onnx, step_names
    from rsseg.tracked_training import train_and_register

    name = "precision-seaice"
    trained = train_and_register(tiny_config(seaice_prepared, tmp_path / "t", epochs=3, lr=3e-3, model_name=name))
    repo = tmp_path / "triton_repo"
    # A broken calibration (constant tiles: every activation range collapses) must be refused, nothing changed.
    real = quantize_module.calibration_tiles
    monkeypatch.setattr(quantize_module, "calibration_tiles",
                        lambda data, fold, count: np.zeros_like(real(data, fold, count)))
    with pytest.raises(PromotionRefused, match="max_metric_drop"):
        promote(PromoteConfig(model_name=name, repo=str(repo), precision="int8", runtime="openvino"))
    assert not (repo / name).exists()
    assert MlflowClient().get_registered_model(name).aliases == {}
    monkeypatch.setattr(quantize_module, "calibration_tiles", real)

    # Served by OpenVINO: the gate scores with it, and the served check compares a real server with it.
    summary = promote(PromoteConfig(model_name=name, repo=str(repo), precision="int8", max_metric_drop=0.02,
                                    runtime="openvino"))
    precision = summary["precision"]
    assert precision["precision"] == "int8" and precision["calibration_tiles"] > 0
    assert precision["runtime"] == "openvino" and precision["quant_format"] == "qdq"
    assert precision["metric_drop"] <= 0.02 and precision["bytes"] < precision["fp32_bytes"]
    assert summary["served_check"]["pixels_agree"] == 1.0  # a real server answered as OpenVINO on the int8 file
    segmenter = repo / step_names(name)["segmenter"] / str(summary["served_check"]["triton_version"])
    (served,) = served_onnx(segmenter)
    assert {p.key: p.value for p in onnx.load(str(served)).metadata_props}["rsseg.precision"] == "int8"
    assert read_history(repo, name)["versions"]["1"]["precision"]["precision"] == "int8"
    assert read_history(repo, name)["versions"]["1"]["options"]["runtime"] == "openvino"
    tags = MlflowClient().get_model_version(name, trained["model_version"]).tags
    assert tags["served_precision"] == "int8" and float(tags["served_metric_drop"]) == precision["metric_drop"]
    run = MlflowClient().get_run(_promotion_run(name))
    assert run.data.params["precision"] == "int8" and "precision_metric_drop" in run.data.metrics

    # evaluate -P precision=int8 scores the same int8 file the same way, and does not tag the version
    from rsseg.config import EvaluateConfig
    from rsseg.scoring import evaluate

    scored = evaluate(EvaluateConfig(model=f"models:/{name}/{trained['model_version']}", precision="int8",
                                     runtime="openvino"))
    assert scored["where"] == "openvino in process, int8" and "tagged" not in scored
    assert abs(scored["headline"] - precision["metric_value"]) < 1e-4


def _promotion_run(name: str) -> str:
    client = MlflowClient()
    experiment = client.get_experiment_by_name("rsseg-promotions")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id


def test_unknown_precision_is_refused(tmp_path):
    from rsseg.precision import reduce_precision

    with pytest.raises(ConfigError, match="precision 'int4'"):
        reduce_precision(PromoteConfig(precision="int4"), None, [Path("x.onnx")], tmp_path)  # type: ignore[arg-type]


def test_folding_same_padding_into_the_convolution_is_exact(tmp_path):
    import onnxruntime as ort
    import torch

    from rsseg.export.quantize import fold_pads

    class SamePadded(torch.nn.Module):  # a TF "same" stride-2 conv, as the tf_* encoders export it
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(torch.nn.functional.pad(x, (0, 1, 0, 1)))

    torch.onnx.export(SamePadded().eval(), torch.zeros(1, 3, 32, 32), str(tmp_path / "m.onnx"), opset_version=17,
                      input_names=["input"], dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}}, dynamo=False)
    options = ort.SessionOptions()  # constant folding turns the pad amounts into an initializer
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "basic.onnx")
    ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(tmp_path / "basic.onnx"))
    assert fold_pads(model) == 1
    onnx.save(model, str(tmp_path / "folded.onnx"))
    assert "Pad" not in {n.op_type for n in onnx.load(str(tmp_path / "folded.onnx")).graph.node}
    x = np.random.default_rng(0).normal(size=(2, 3, 64, 48)).astype(np.float32)
    before, after = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
                     for f in ("m.onnx", "folded.onnx"))
    np.testing.assert_allclose(after, before, atol=1e-6)
