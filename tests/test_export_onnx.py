"""rsseg.export.onnx: export of every architecture, dynamic shapes, spec metadata, parity with PyTorch.

Fast tests use the tiny "test_efficientnet" encoder (stride 16, traced at 64x64, checked at 96x128 and
80x112). The seed UNet and the torch.export-based exporter are `slow`.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch

from rsseg.errors import ConfigError, ExportError
from rsseg.export import (
    DEFAULT_OPSET,
    INPUT_NAME,
    OUTPUT_NAME,
    SPEC_KEY,
    ParityReport,
    assert_parity,
    check_parity,
    export_onnx,
    onnx_session,
    read_spec,
)
from rsseg.export.onnx import _compare_class_maps
from rsseg.models import create_model, list_models, model_tasks
from rsseg.spec import DatasetSpec, ModelSpec, OutputGroup

log = logging.getLogger(__name__)

TINY = "test_efficientnet"
SEMANTIC = [OutputGroup("change", 2), OutputGroup("semantic_a", 4), OutputGroup("semantic_b", 4)]
# (architecture, bands, outputs): change models take 2 * bands channels
CASES = {
    "unet": ("unet", 3, [OutputGroup("classes", 3)]),
    "deeplabv3plus": ("deeplabv3plus", 3, [OutputGroup("classes", 3)]),
    "siamese_unet": ("siamese_unet", 3, [OutputGroup("change", 2)]),
    "siamese_unet_semantic": ("siamese_unet", 4, SEMANTIC),
    "danet": ("danet", 3, [OutputGroup("classes", 3)]),
    "pspnet": ("pspnet", 3, [OutputGroup("classes", 3)]),
    "siamese_pspnet": ("siamese_pspnet", 3, [OutputGroup("change", 2)]),
    "siamese_pspnet_semantic": ("siamese_pspnet", 4, SEMANTIC),
    "unetplusplus": ("unetplusplus", 3, [OutputGroup("classes", 3)]),
    "hrnet_ocr": ("hrnet_ocr", 3, [OutputGroup("classes", 3)]),
}


def parity_atol(report: ParityReport) -> float:
    """1e-4, or 1e-5 of the largest logit when that is larger.

    fp32 rounding differences (ONNX Runtime vs PyTorch kernels) scale with the logits: these random-weight
    models reach |logit| ~50, where about 1.5e-4 was measured (3e-6 relative); an export fault is far larger.
    """
    return max(1e-4, 1e-5 * report.max_abs_logit)


def make_spec(model: torch.nn.Module, arch: str, encoder: str, bands: int, outputs: list[OutputGroup]) -> ModelSpec:
    change = "change" in model_tasks(arch)
    semantic = ["unchanged", "water", "building", "forest"] if len(outputs) > 1 else None
    classes = ["unchanged", "changed"] if change else [f"c{i}" for i in range(outputs[0].channels)]
    dataset = DatasetSpec(
        name="synthetic", task="change" if change else "multiclass", classes=classes,
        colors=[[i * 40, 0, 0] for i in range(len(classes))], bands=list(range(1, bands + 1)),
        semantic_classes=semantic,
    )
    return ModelSpec(
        dataset=dataset, architecture=arch, encoder=encoder, in_channels=model.in_channels, outputs=outputs,
        tile_size=256, tile_sizes=[256, 512], stride=model.stride,
    )


def build(arch: str, bands: int, outputs: list[OutputGroup], encoder: str = TINY) -> tuple[torch.nn.Module, ModelSpec]:
    torch.manual_seed(0)
    in_ch = 2 * bands if "change" in model_tasks(arch) else bands
    model = create_model(arch, encoder, in_ch, outputs).eval()
    return model, make_spec(model, arch, encoder, bands, outputs)


Exported = tuple[torch.nn.Module, ModelSpec, Path]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    """case name -> (model in eval mode, spec, exported path); each case exported once per module."""
    done: dict[str, Exported] = {}

    def get(name: str) -> Exported:
        if name not in done:
            model, spec = build(*CASES[name])
            model.train()  # export must not depend on, nor change, the caller's mode
            path = export_onnx(model, spec, tmp_path_factory.mktemp(name) / "model.onnx")
            assert model.training
            done[name] = (model.eval(), spec, path)
        return done[name]

    return get


@pytest.fixture(params=list(CASES))
def exported(request: pytest.FixtureRequest, exports: Callable[[str], Exported]) -> Exported:
    return exports(request.param)


def test_cases_cover_every_architecture() -> None:
    assert {arch for arch, _, _ in CASES.values()} == set(list_models())


def test_graph_io_dynamic_dims_and_metadata(exported: Exported) -> None:
    _, spec, path = exported
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temp file left behind
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    io = ((proto.graph.input[0], spec.in_channels), (proto.graph.output[0], spec.num_output_channels))
    for value, channels in io:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        dims = value.type.tensor_type.shape.dim
        assert len(dims) == 4 and dims[1].dim_value == channels
        for i in (0, 2, 3):  # batch, H, W are named (dynamic), not fixed
            assert dims[i].dim_param and not dims[i].HasField("dim_value"), (value.name, i, dims[i])
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {DEFAULT_OPSET}
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[SPEC_KEY] == spec.to_json()
    assert read_spec(path) == spec


def test_parity_at_other_shapes(exported: Exported) -> None:
    model, spec, path = exported
    report = check_parity(model, path, spec)
    s = spec.stride
    assert report.shapes == [(2, spec.in_channels, 6 * s, 8 * s), (2, spec.in_channels, 5 * s, 7 * s)]
    assert report.providers == ["CPUExecutionProvider"]
    assert report.max_abs_diff < parity_atol(report)
    assert report.class_maps_equal and report.mismatched_pixels == 0
    assert_parity(report, atol=parity_atol(report))
    data = report.to_dict()
    assert json.loads(json.dumps(data))["shapes"][0] == [2, spec.in_channels, 6 * s, 8 * s]


def test_batch_and_explicit_sizes(exports: Callable[[str], Exported]) -> None:
    # the semantic change model has batch arithmetic (it encodes both dates as one 2N batch)
    model, spec, path = exports("siamese_unet_semantic")
    report = check_parity(model, path, spec, sizes=[spec.stride * 3, (spec.stride * 2, spec.stride * 5)], batch=3)
    assert [r[0] for r in report.shapes] == [3, 3] and report.shapes[0][2:] == (48, 48)
    assert_parity(report, atol=parity_atol(report))


def test_wrong_weights_fail_parity(tmp_path: Path) -> None:
    model, spec = build(*CASES["unet"])
    path = export_onnx(model, spec, tmp_path / "model.onnx")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.head.bias[1] += 0.5  # one parameter changed after export
    report = check_parity(other, path, spec)
    assert report.max_abs_diff == pytest.approx(0.5, abs=1e-3)
    # the flipped pixels all had margins < 0.5: explained by the 0.5 logit difference, so near-ties
    assert report.near_tie_flips > 0 and report.mismatched_pixels == 0
    with pytest.raises(ExportError, match=r"max \|onnx - torch\| logits diff 0\.5 \(atol 0\.001\), 0 class-map pixels"):
        assert_parity(report)


def test_bad_arguments_rejected(tmp_path: Path) -> None:
    model, spec = build(*CASES["unet"])
    dest = tmp_path / "model.onnx"
    with pytest.raises(ConfigError, match="opset 16 .* opset >= 17"):
        export_onnx(model, spec, dest, opset=16)
    with pytest.raises(ConfigError, match="opset 17 .*dynamo=True.* opset >= 18"):
        export_onnx(model, spec, dest, opset=17, dynamo=True)
    with pytest.raises(ConfigError, match="multiple of the model stride 16"):
        export_onnx(model, spec, dest, export_size=40)
    wrong = ModelSpec.from_dict({**spec.to_dict(), "in_channels": 4})
    with pytest.raises(ConfigError, match="4"):
        export_onnx(model, wrong, dest)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="multiples of the model stride"):
        check_parity(model, dest, spec, sizes=[(40, 64)])


def test_assert_parity_rejects_nan_and_passes_within_atol() -> None:
    shapes = [(2, 3, 96, 128)]
    ok = ParityReport(shapes, 5e-4, True, 0, ["CPUExecutionProvider"])
    assert_parity(ok, atol=1e-3)
    with pytest.raises(ExportError, match="diff nan"):
        assert_parity(ParityReport(shapes, float("nan"), True, 0, ["CPUExecutionProvider"]))
    with pytest.raises(ExportError, match="3 class-map pixels differ"):
        assert_parity(ParityReport(shapes, 1e-6, False, 3, ["CPUExecutionProvider"]))
    big = ParityReport(shapes, 2e-3, True, 0, ["CPUExecutionProvider"], max_abs_logit=200.0)
    with pytest.raises(ExportError, match=r"\(atol 0\.001\)"):
        assert_parity(big)
    assert_parity(big, rtol=1e-5)  # 1e-3 + 1e-5 * 200 = 3e-3
    with pytest.raises(ExportError, match=r"atol 0\.001 \+ rtol 1e-06 \* max \|logit\| 200"):
        assert_parity(big, rtol=1e-6)


def test_near_ties_are_not_mismatches() -> None:
    groups = [OutputGroup("change", 2), OutputGroup("semantic_a", 3), OutputGroup("semantic_b", 3)]
    ref = torch.zeros(1, 8, 1, 3)
    ref[0, :, 0, 0] = torch.tensor([0.0, 1e-6, 0, 5, 0, 0, 5, 0])  # change near-tie, changed
    ref[0, :, 0, 1] = torch.tensor([0.0, 5, 0, 2, 2 + 1e-6, 0, 5, 0])  # semantic_a near-tie among classes >= 1
    ref[0, :, 0, 2] = torch.tensor([0.0, 5, 0, 5, 0, 0, 5, 0])  # clear decisions
    out = ref.clone()
    out[0, 1, 0, 0] -= 2e-6  # flips change (and with it both semantic maps) at pixel 0
    out[0, 4, 0, 1] -= 2e-6  # flips semantic_a at pixel 1
    assert _compare_class_maps(ref, out, groups, diff=2e-6) == (0, 4)
    out[0, 6, 0, 2] -= 10.0  # semantic_b flips at pixel 2, where the margin (5) is far beyond 2 * diff
    assert _compare_class_maps(ref, out, groups, diff=2e-6) == (1, 4)


def test_session_skips_unavailable_providers(exports: Callable[[str], Exported]) -> None:
    _, _, path = exports("unet")
    session = onnx_session(path, ["NoSuchExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]


def calibrate_batchnorm(model: torch.nn.Module, in_channels: int, steps: int = 4) -> None:
    """Give a random-init model BatchNorm statistics of its own activations, as training would.

    Without this, eval mode (running var 1) lets activations grow layer by layer: the seed UNet's
    logits reach ~1e4 and fp32 noise alone makes differences of ~10.
    """
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(4, in_channels, 64, 64, generator=gen))
    model.eval()


@pytest.mark.slow
def test_seed_unet_export_and_parity(tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    model, spec = build("unet", 3, [OutputGroup("classes", 2)], encoder="tf_efficientnet_lite3")
    calibrate_batchnorm(model, 3)
    start = time.perf_counter()
    path = export_onnx(model, spec, tmp_path / "seed.onnx")
    seconds = time.perf_counter() - start
    report = check_parity(model, path, spec)
    # The yardstick: how far PyTorch's own fp32 result is from fp64 on the first parity input. This
    # random-weight network has large gain (logits ~100), so fp32 rounding alone reaches ~1e-2.
    x = torch.randn(report.shapes[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32_noise = float((model(x).double() - copy.deepcopy(model).double()(x.double())).abs().max())
    figures = {
        "export_s": round(seconds, 2), "size_mb": round(path.stat().st_size / 1e6, 2),
        "fp32_noise": fp32_noise, **report.to_dict(),
    }
    log.info("seed UNet ONNX: %s", figures)
    for key, value in figures.items():
        record_property(key, value)
    assert seconds < 60
    assert_parity(report, atol=max(1e-3, 4 * fp32_noise))


@pytest.mark.slow
def test_dynamo_exporter_parity(tmp_path: Path) -> None:
    model, spec = build(*CASES["siamese_unet_semantic"])
    path = export_onnx(model, spec, tmp_path / "model.onnx", opset=18, dynamo=True)
    proto = onnx.load(str(path))
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert all(dims[i].dim_param for i in (0, 2, 3))
    assert read_spec(path) == spec
    report = check_parity(model, path, spec, batch=3)
    assert_parity(report, atol=parity_atol(report))
