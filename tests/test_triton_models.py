"""The repository's Python-backend models under a stand-in for triton_python_backend_utils, and the
generated configs: tensor names, dtypes and shapes line up across each ensemble."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import numpy as np
import pytest
import torch
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from rsseg import averaging, contract, heads, runtimes
from rsseg.data.transforms import normalize
from rsseg.errors import ConfigError
from rsseg.inference import class_maps as torch_class_maps
from rsseg.serving.repository import (
    MODELS_DIR,
    ServingOptions,
    model_configs,
    step_names,
)
from rsseg.spec import DatasetSpec, ModelSpec, OutputGroup


class _Tensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _Error:
    INVALID_ARG = "INVALID_ARG"
    INTERNAL = "INTERNAL"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error


class _Request:
    def __init__(self, inputs, parameters=None, requested=None):
        self.inputs = {k: _Tensor(k, v) for k, v in inputs.items()}
        self._parameters = json.dumps(parameters or {})
        self._requested = requested

    def parameters(self):
        return self._parameters

    def requested_output_names(self):
        return self._requested or []


@pytest.fixture(autouse=True)
def pb_utils(monkeypatch):
    stub = types.ModuleType("triton_python_backend_utils")
    _Tensor.from_dlpack = staticmethod(lambda name, array: _Tensor(name, np.from_dlpack(array)))
    stub.Tensor = _Tensor
    stub.TritonError = _Error
    stub.InferenceResponse = _Response
    stub.TritonModelException = RuntimeError
    # The real stub's tensors support DLPack; so do numpy arrays.
    stub.get_input_tensor_by_name = lambda request, name: (request.inputs[name].as_numpy()
                                                           if name in request.inputs else None)
    stub.Logger = types.SimpleNamespace(log_info=lambda msg: None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)
    # Promotion copies these beside model.py; here they are imported from the package.
    monkeypatch.setitem(sys.modules, "contract", contract)
    monkeypatch.setitem(sys.modules, "heads", heads)
    monkeypatch.setitem(sys.modules, "averaging", averaging)
    monkeypatch.setitem(sys.modules, "runtimes", runtimes)
    return stub


def load_model(file: str):
    spec = importlib.util.spec_from_file_location(f"triton_{file}", MODELS_DIR / f"{file}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_spec(task="binary", bands=3, dtype="uint8", semantic=None) -> ModelSpec:
    classes = ["background", "target"] if task != "multiclass" else ["a", "b", "c", "d"]
    dataset = DatasetSpec(name="t", task=task if task != "multiclass" else "multiclass",
                          classes=classes if task != "change" else ["no_change", "change"],
                          colors=[[i, i, i] for i in range(len(classes) if task != "change" else 2)],
                          bands=list(range(1, bands + 1)), dtype=dtype, mean=[100.0 + b for b in range(bands)],
                          std=[20.0 + b for b in range(bands)], semantic_classes=semantic)
    if task == "change":
        outputs = [OutputGroup("change", 2)]
        if semantic:
            outputs += [OutputGroup("semantic_a", len(semantic)), OutputGroup("semantic_b", len(semantic))]
        channels = 2 * bands
    else:
        outputs, channels = [OutputGroup("classes", len(classes))], bands
    return ModelSpec(dataset=dataset, architecture="unet", encoder="x", in_channels=channels, outputs=outputs,
                     tile_size=64, tile_sizes=[64, 128], stride=16)


def parse(text: str) -> dict:
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    return json_format.MessageToDict(config, preserving_proto_field_name=True)


def triton_args(config_text: str, kind: str = "CPU", repository: str = "", version: str = "1") -> dict:
    return {"model_config": json.dumps(parse(config_text)), "model_instance_kind": kind,
            "model_instance_device_id": "0", "model_repository": repository, "model_version": version}


@pytest.mark.parametrize("dtype,bands,task", [("uint8", 3, "binary"), ("uint16", 4, "multiclass"),
                                              ("uint8", 3, "change")])
def test_preprocess_matches_the_training_normalisation(dtype, bands, task):
    spec = model_spec(task, bands, dtype)
    config = model_configs("m", spec, 1, ServingOptions())["m-preprocess"]
    model = load_model("preprocess").TritonPythonModel()
    model.initialize(triton_args(config))
    top = 255 if dtype == "uint8" else 4000
    tiles = np.random.default_rng(0).integers(0, top, (3, 32, 48, spec.in_channels)).astype(dtype)
    (response,) = model.execute([_Request({"TILES": tiles})])
    assert response.error is None
    expected = np.stack([normalize(t, spec.dataset) for t in tiles])
    np.testing.assert_allclose(response.outputs["INPUT"], expected, rtol=1e-6, atol=1e-5)


def test_preprocess_answers_bad_requests_with_errors_and_keeps_serving():
    spec = model_spec()
    model = load_model("preprocess").TritonPythonModel()
    model.initialize(triton_args(model_configs("m", spec, 1, ServingOptions())["m-preprocess"]))
    wrong_bands = np.zeros((1, 16, 16, 4), np.uint8)
    empty = np.zeros((0, 16, 16, 3), np.uint8)
    good = np.zeros((1, 16, 16, 3), np.uint8)
    bad1, bad2, ok = model.execute([_Request({"TILES": wrong_bands}), _Request({"TILES": empty}),
                                    _Request({"TILES": good})])
    assert bad1.error is not None and "[N, H, W, 3]" in bad1.error.message
    assert bad2.error is not None and "empty" in bad2.error.message
    assert ok.error is None and ok.outputs["INPUT"].shape == (1, 3, 16, 16)


def test_preprocess_decodes_encoded_images():
    import io

    from PIL import Image

    spec = model_spec()
    model = load_model("preprocess").TritonPythonModel()
    model.initialize(triton_args(model_configs("m", spec, 1, ServingOptions())["m-decode"]))
    image = np.random.default_rng(1).integers(0, 255, (32, 40, 3)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    batch = np.frombuffer(buffer.getvalue(), dtype=np.uint8)[None]
    (response,) = model.execute([_Request({"IMAGES": batch})])
    assert response.error is None
    np.testing.assert_allclose(response.outputs["INPUT"][0], normalize(image, spec.dataset), atol=1e-5)


@pytest.mark.parametrize("semantic", [None, ["unchanged", "water", "tree"]])
def test_postprocess_class_maps_match_training(semantic):
    spec = model_spec("change", 3, semantic=semantic)
    model = load_model("postprocess").TritonPythonModel()
    model.initialize(triton_args(model_configs("m", spec, 1, ServingOptions())["m-postprocess"]))
    logits = np.random.default_rng(2).standard_normal((2, spec.num_output_channels, 8, 8)).astype(np.float32)
    (response,) = model.execute([_Request({"LOGITS": logits}, requested=["CLASS_MAP", "PROBABILITIES"])])
    assert response.error is None
    expected = torch_class_maps(torch.from_numpy(logits), spec.outputs)
    served = response.outputs["CLASS_MAP"]
    assert served.dtype == np.uint8 and served.shape == (2, len(spec.outputs), 8, 8)
    for i, group in enumerate(spec.outputs):
        np.testing.assert_array_equal(served[:, i], expected[group.name].numpy())
    probabilities = response.outputs["PROBABILITIES"]
    assert probabilities.dtype == np.float16
    np.testing.assert_allclose(probabilities[:, :2].astype(np.float32).sum(axis=1), 1.0, atol=2e-3)
    (no_probs,) = model.execute([_Request({"LOGITS": logits}, requested=["CLASS_MAP"])])
    assert "PROBABILITIES" not in no_probs.outputs


@pytest.mark.parametrize("channels", [1, 2, 3, 7])
def test_channel_argmax_is_numpys_including_ties(channels):
    scores = np.random.default_rng(channels).standard_normal((2, channels, 16, 24)).astype(np.float32)
    scores[:, -1, :4] = scores[:, 0, :4]  # ties go to the first channel, as numpy's
    scores[:, :, 4:6] = 0.0  # all equal
    index = heads.argmax_channels(scores)
    assert index.dtype == np.uint8
    np.testing.assert_array_equal(index, scores.argmax(axis=1))


def test_segmenter_tta_views_invert_exactly():
    segmenter = load_model("segmenter")
    x = np.random.default_rng(3).standard_normal((2, 3, 16, 16)).astype(np.float32)
    for mode, count in (("none", 1), ("flips", 3), ("d4", 8)):
        views = segmenter.tta_transforms(mode)
        assert len(views) == count
        for forward, inverse in views:
            np.testing.assert_array_equal(inverse(forward(x)), x)
    with pytest.raises(ValueError, match="tta must be one of"):
        segmenter.tta_transforms("bogus")
    assert tuple(averaging.TTA_VIEWS) == contract.TTA_MODES  # averaging.py cannot import contract in process


def test_average_of_a_model_with_itself_is_that_model():
    x = np.random.default_rng(4).standard_normal((2, 3, 16, 16)).astype(np.float32)
    double = lambda batch: batch[:, :2] * 2.0  # noqa: E731
    np.testing.assert_array_equal(averaging.average_logits([double, double], x), double(x))
    half = averaging.average_logits([double, lambda batch: batch[:, :2] * 0.0], x)
    np.testing.assert_allclose(half, x[:, :2], rtol=1e-6)


@pytest.mark.parametrize("task,semantic,dtype,bands", [("binary", None, "uint8", 3), ("multiclass", None, "uint16", 4),
                                                       ("change", ["u", "a", "b"], "uint8", 3)])
def test_ensemble_tensors_line_up(task, semantic, dtype, bands):
    spec = model_spec(task, bands, dtype, semantic)
    configs = {name: parse(text) for name, text in model_configs("m", spec, 7, ServingOptions(max_batch_size=4)).items()}
    ensembles = [c for c in configs.values() if c.get("platform") == "ensemble"]
    assert {e["name"] for e in ensembles} == ({"m", "m-files"} if task == "binary" else {"m"})
    for config in configs.values():
        assert config["max_batch_size"] == 4
        assert config["version_policy"]["specific"]["versions"] == ["7"]  # int64 as JSON strings
    for ensemble in ensembles:
        # Every tensor an ensemble step reads is produced earlier (or is an ensemble input) with the
        # step's declared dtype and dims.
        produced = {t["name"]: (t["data_type"], t["dims"]) for t in ensemble["input"]}
        for step in ensemble["ensemble_scheduling"]["step"]:
            model = configs[step["model_name"]]
            inputs = {t["name"]: (t["data_type"], t["dims"]) for t in model["input"]}
            outputs = {t["name"]: (t["data_type"], t["dims"]) for t in model["output"]}
            for key, tensor in step["input_map"].items():
                assert produced[tensor] == inputs[key], (ensemble["name"], step["model_name"], key)
            for key, tensor in step["output_map"].items():
                produced[tensor] = outputs[key]
        for output in ensemble["output"]:
            assert produced[output["name"]] == (output["data_type"], output["dims"])
        served = json.loads(ensemble["parameters"]["model_spec"]["string_value"])
        assert served["dataset"]["classes"] == spec.dataset.classes and served["triton"]["version"] == 7
    names = step_names("m")
    assert configs[names["preprocess"]]["input"][0]["dims"] == ["-1", "-1", str(spec.in_channels)]
    assert configs[names["preprocess"]]["input"][0]["data_type"] == f"TYPE_{dtype.upper()}"
    assert configs[names["postprocess"]]["output"][0]["dims"] == [str(len(spec.outputs)), "-1", "-1"]


def test_gpu_instances_are_chosen_by_configuration():
    configs = {n: parse(t) for n, t in model_configs("m", model_spec(), 1, ServingOptions("gpu")).items()}
    assert configs["m-preprocess"]["instance_group"][0]["kind"] == "KIND_GPU"
    assert configs["m-segmenter"]["instance_group"][0]["kind"] == "KIND_GPU"
    assert configs["m-postprocess"]["instance_group"][0]["kind"] == "KIND_CPU"


def test_segmenter_threads_are_chosen_by_configuration():
    configs = {n: parse(t) for n, t in model_configs("m", model_spec(), 1, ServingOptions(intra_op_threads=2)).items()}
    assert configs["m-segmenter"]["parameters"]["intra_op_threads"]["string_value"] == "2"
    default = parse(model_configs("m", model_spec(), 1, ServingOptions())["m-segmenter"])
    assert default["parameters"]["intra_op_threads"]["string_value"] == "0"  # ONNX Runtime's own choice
    with pytest.raises(ConfigError, match="intra-op threads"):
        ServingOptions(intra_op_threads=-1)


def test_segmenter_runtime_is_chosen_by_configuration():
    default = parse(model_configs("m", model_spec(), 1, ServingOptions())["m-segmenter"])
    assert default["parameters"]["runtime"]["string_value"] == "onnxruntime"
    chosen = parse(model_configs("m", model_spec(), 1, ServingOptions(runtime="openvino"))["m-segmenter"])
    assert chosen["parameters"]["runtime"]["string_value"] == "openvino"
    with pytest.raises(ConfigError, match="CPU instances only"):
        ServingOptions("gpu", runtime="openvino")
    with pytest.raises(ConfigError, match="runtime must be one of"):
        ServingOptions(runtime="tensorrt")
