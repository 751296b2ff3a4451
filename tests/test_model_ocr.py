"""rsseg.models.ocr: HRNet-OCR (Yuan et al. 2020) shapes, soft-region auxiliary output, OCR formulas, global
context, training with deep supervision, ONNX parity.

Tiny encoders ("hrnet_w18_small", "test_resnet", "test_efficientnet"), 64x64 inputs.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch

from rsseg.errors import ConfigError
from rsseg.export import assert_parity, check_parity, export_onnx
from rsseg.losses import build_loss, deep_supervision_loss
from rsseg.models import create_model, default_encoder
from rsseg.models.encoders import Level
from rsseg.models.ocr import HRNetOCR, ObjectAttention, OCRHead, SpatialGather, select_ocr_levels
from rsseg.spec import DatasetSpec, ModelSpec, OutputGroup

OUTPUTS = [OutputGroup("classes", 3)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(("encoder", "fused"), [("hrnet_w18_small", 16 + 32 + 64 + 128), ("test_resnet", None)])
def test_output_shape_levels_and_attributes(encoder: str, fused: int | None) -> None:
    model = create_model("hrnet_ocr", encoder, 3, OUTPUTS, ocr_mid_channels=64, ocr_key_channels=32)
    assert isinstance(model, HRNetOCR)
    assert model.aux_weights == [0.4]
    info = model.encoder.feature_info
    assert info.reduction() == [4, 8, 16, 32]  # the stride-2 stem level is skipped
    assert model.stride == 32 and model.up_to_input == 4
    assert model.fuse.out_channels == (fused or sum(info.channels()))
    assert model.head.pixel[0].in_channels == model.fuse.out_channels
    assert model.head.pixel[0].out_channels == 64 and model.head.attention.key_channels == 32
    y = model(torch.randn(2, 3, 64, 96))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 64, 96)


def test_defaults_are_the_papers() -> None:
    assert default_encoder("hrnet_ocr") == "hrnet_w18"
    model = create_model("hrnet_ocr", "hrnet_w18_small", 3, OUTPUTS)
    head = model.head
    assert head.pixel[0].out_channels == 512 and head.attention.key_channels == 256
    assert head.fuse[1].p == pytest.approx(0.05)
    # HRNet's raw branch outputs (branch_features_kwargs), not timm's 128..1024-channel "incre" features
    assert model.encoder.feature_info.channels() == [16, 32, 64, 128]


def test_forward_train_returns_soft_regions() -> None:
    model = create_model("hrnet_ocr", "test_resnet", 3, [OutputGroup("classes", 5)], ocr_mid_channels=32,
                         ocr_key_channels=16).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, aux = model.forward_train(x)
        served = model.forward_logits(x)
    assert logits.shape == (2, 5, 64, 64)
    assert len(aux) == len(model.aux_weights) == 1
    assert aux[0].shape == (2, 5, 16, 16)  # the soft object regions at the fused stride 4
    assert torch.allclose(logits, served)  # same main logits with or without the auxiliary output
    feats = model.fuse(model.encoder(x))
    with torch.no_grad():
        assert torch.allclose(aux[0], model.head.aux_head(feats))


def test_eval_returns_one_tensor_even_with_emit_aux() -> None:
    model = create_model("hrnet_ocr", "test_resnet", 3, OUTPUTS, ocr_mid_channels=32, ocr_key_channels=16)
    model.emit_aux = True
    model.eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 64))
    assert isinstance(y, torch.Tensor) and y.shape == (1, 3, 64, 64)


def test_training_step_with_deep_supervision() -> None:
    model = create_model("hrnet_ocr", "hrnet_w18_small", 3, OUTPUTS, ocr_mid_channels=32, ocr_key_channels=16)
    model.emit_aux = True
    model.train()
    out = model(torch.randn(1, 3, 64, 64))  # batch 1: no BatchNorm on the (N, K, C) region vectors
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == (1, 3, 64, 64) and out[1].shape == (1, 3, 16, 16)
    targets = {"classes": torch.randint(0, 3, (1, 64, 64))}
    loss_fn = build_loss(OUTPUTS)
    total, logits, parts = deep_supervision_loss(loss_fn, out, targets, model.aux_weights)
    main, _ = loss_fn(out[0], targets)
    assert logits is out[0] and "aux0_loss" in parts
    assert total.item() == pytest.approx(main.item() + 0.4 * parts["aux0_loss"], rel=1e-5)
    total.backward()
    region_classifier = model.head.aux_head[-1]
    assert region_classifier.weight.grad is not None and region_classifier.weight.grad.abs().sum() > 0
    assert model.head.attention.f_object[0].weight.grad.abs().sum() > 0
    assert next(model.encoder.parameters()).grad.abs().sum() > 0


def test_main_loss_alone_trains_the_region_head() -> None:
    # the OCR path uses the soft regions without detaching them, as in the reference
    head = OCRHead(8, 3, mid_channels=16, key_channels=8).train()
    head(torch.randn(2, 8, 12, 12))[0].square().mean().backward()
    assert head.aux_head[-1].weight.grad.abs().sum() > 0


def test_spatial_gather_matches_formula() -> None:
    feats, regions = torch.randn(2, 6, 4, 5), torch.randn(2, 3, 4, 5)
    out = SpatialGather()(feats, regions)
    assert out.shape == (2, 3, 6)
    for n in range(2):
        for k in range(3):
            w = torch.softmax(regions[n, k].reshape(-1), 0)  # over all pixels of region k
            assert torch.allclose(out[n, k], feats[n].reshape(6, -1) @ w, atol=1e-6)


def test_object_attention_matches_formula() -> None:
    block = ObjectAttention(6, 4).eval()
    x, objects = torch.randn(1, 6, 3, 5), torch.randn(1, 2, 6)
    with torch.no_grad():
        out = block(x, objects)
        q = block.f_pixel(x)[0].reshape(4, -1).T  # (HW, Ck)
        k = block.f_object(objects)[0]  # (K, Ck)
        v = block.f_down(objects)[0]  # (K, Ck)
        a = torch.softmax(q @ k.T / 2.0, dim=-1)  # scale 1 / sqrt(4); softmax over the K regions
        ref = block.f_up((a @ v).T.reshape(1, 4, 3, 5))
    assert out.shape == x.shape
    assert torch.allclose(out, ref, atol=1e-6)


def test_head_context_is_global() -> None:
    head = OCRHead(8, 3, mid_channels=16, key_channels=8).eval()
    x = torch.randn(1, 8, 32, 32)
    bumped = x.clone()
    bumped[..., :2, :2] += 10.0
    with torch.no_grad():
        delta = (head(bumped)[0] - head(x)[0])[..., -2:, -2:].abs().max()
    # local convs (3x3 + 1x1s) cannot reach 30 pixels away: only the object regions carry the change there
    assert delta > 1e-5


def test_single_channel_output() -> None:
    model = create_model("hrnet_ocr", "test_resnet", 3, [OutputGroup("mask", 1)], ocr_mid_channels=16,
                         ocr_key_channels=8)
    model(torch.randn(1, 3, 64, 64)).mean().backward()


@pytest.mark.parametrize(("option", "value", "match"), [
    ("ocr_mid_channels", 0, "ocr_mid_channels must be a positive integer"),
    ("ocr_key_channels", True, "ocr_key_channels must be a positive integer"),
    ("ocr_key_channels", 1.5, "ocr_key_channels must be a positive integer"),
    ("dropout", 1.0, r"dropout must be a number in \[0, 1\)"),
])
def test_bad_options_rejected(option: str, value: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_model("hrnet_ocr", "test_resnet", 3, OUTPUTS, **{option: value})


def test_onnx_export_parity_and_single_output(tmp_path: Path) -> None:
    model = create_model("hrnet_ocr", "hrnet_w18_small", 3, OUTPUTS, ocr_mid_channels=64, ocr_key_channels=32)
    model.emit_aux = True  # must not leak into the export
    model.eval()
    dataset = DatasetSpec(name="synthetic", task="multiclass", classes=["a", "b", "c"],
                          colors=[[0, 0, 0], [40, 0, 0], [80, 0, 0]], bands=[1, 2, 3])
    spec = ModelSpec(dataset=dataset, architecture="hrnet_ocr", encoder="hrnet_w18_small", in_channels=3,
                     outputs=OUTPUTS, tile_size=64, tile_sizes=[64], stride=model.stride)
    path = export_onnx(model, spec, tmp_path / "ocr.onnx")
    proto = onnx.load(str(path))
    assert len(proto.graph.output) == 1
    ops = [node.op_type for node in proto.graph.node]
    assert ops.count("Softmax") == 2  # the spatial gather and the object attention, nothing else
    # the region classifier's weights are in the graph once (OCR needs it), no second copy for an aux output
    classifier = model.head.aux_head[-1].weight
    same = [t for t in proto.graph.initializer if tuple(t.dims) == tuple(classifier.shape)]
    assert len(same) == 1
    report = check_parity(model, path, spec)  # two shapes, neither the export shape
    assert len({s[2:] for s in report.shapes}) == 2
    assert_parity(report, atol=max(1e-4, 1e-5 * report.max_abs_logit))
    assert report.class_maps_equal


def test_level_selection_skips_the_stride_two_stem() -> None:
    levels = [Level(0, 8, 2), Level(1, 16, 4), Level(2, 32, 8)]
    assert [lv.index for lv in select_ocr_levels(levels)] == [1, 2]
    assert [lv.index for lv in select_ocr_levels(levels[:1])] == [0]  # nothing at >= 4: keep what there is
