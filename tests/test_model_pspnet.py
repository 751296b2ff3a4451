"""rsseg.models.pspnet: pyramid pooling (exact adaptive pooling, exportable), PSPNet and the siamese change PSPNet:
shapes, strides, levels, output order, lightweight heads, batch-1 training, global context, ONNX parity.

Tiny timm encoders ("test_resnet", "test_efficientnet", "hrnet_w18_small"), 64x64 inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rsseg.errors import ConfigError
from rsseg.export import assert_parity, check_parity, export_onnx
from rsseg.models import create_model, default_encoder, model_kwargs
from rsseg.models.blocks import ConcatLevels
from rsseg.models.pspnet import (
    PSPNet,
    PyramidPooling,
    SeparableConvBNReLU,
    SiamesePSPNet,
    adaptive_avg_pool,
    adaptive_pool_matrix,
    default_psp_channels,
    parse_bins,
)
from rsseg.spec import DEFAULT_ENCODER, DatasetSpec, ModelSpec, OutputGroup

OUTPUTS = [OutputGroup("classes", 3)]
CHANGE = [OutputGroup("change", 2)]
SEMANTIC = [OutputGroup("change", 2), OutputGroup("semantic_a", 4), OutputGroup("semantic_b", 4)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def depthwise_convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.groups > 1
            and m.groups == m.in_channels == m.out_channels and m.kernel_size == (3, 3)]


@pytest.mark.parametrize("size", [(12, 12), (7, 9), (5, 14), (2, 3), (1, 1), (40, 56)])
@pytest.mark.parametrize("bins", [1, 2, 3, 6])
def test_adaptive_avg_pool_matches_torch(size: tuple[int, int], bins: int) -> None:
    # sizes not divisible by the bins, and smaller than them (overlapping windows), included
    x = torch.randn(2, 5, *size)
    assert torch.allclose(adaptive_avg_pool(x, bins), F.adaptive_avg_pool2d(x, bins), atol=1e-6)
    m = adaptive_pool_matrix(size[0], bins, x)
    assert m.shape == (bins, size[0]) and torch.allclose(m.sum(1), torch.ones(bins))


def test_pyramid_pooling_shapes_and_norms() -> None:
    ppm = PyramidPooling(16, (1, 2, 3, 6), 4)
    assert ppm.out_channels == 16 + 4 * 4
    x = torch.randn(2, 16, 7, 9)  # 7 and 9: no bin but 1 divides both
    y = ppm(x)
    assert y.shape == (2, 32, 7, 9)
    assert torch.equal(y[:, :16], x)  # the feature itself comes first
    one = y[:, 16:20]
    assert torch.equal(one, one[:, :, :1, :1].expand_as(one))  # 1 bin: constant over the map
    six = y[:, 28:32]
    assert not torch.allclose(six, six[:, :, :1, :1].expand_as(six))
    # no BatchNorm on the 1x1 map of the 1-bin branch; BatchNorm on the others
    assert not any(isinstance(m, nn.BatchNorm2d) for m in ppm.stages[0].modules())
    assert all(any(isinstance(m, nn.BatchNorm2d) for m in s.modules()) for s in ppm.stages[1:])
    # each branch is the pooled map through its stage, upsampled bilinearly
    with torch.no_grad():
        ppm.eval()
        ref = F.interpolate(ppm.stages[2](F.adaptive_avg_pool2d(x, 3)), size=(7, 9), mode="bilinear",
                            align_corners=False)
        assert torch.allclose(ppm(x)[:, 24:28], ref, atol=1e-6)


@pytest.mark.parametrize(("encoder", "stride"), [("test_resnet", 8), ("test_efficientnet", 8)])
def test_pspnet_is_dilated_to_stride_8(encoder: str, stride: int) -> None:
    model = create_model("pspnet", encoder, 3, OUTPUTS)
    assert isinstance(model, PSPNet)
    assert model.stride == stride and model.up_to_input == stride and model.concat is None
    assert model.encoder.feature_info.reduction() == [8]  # only the deepest (dilated) level is built
    deep = model.encoder.feature_info.channels()[-1]
    assert model.head.ppm.out_channels == deep + 4 * (deep // 4)
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 3, 64, 96)
    with torch.no_grad():  # a multiple of 8 but not of 16: the dilated encoder takes it
        assert model.eval()(torch.randn(1, 3, 72, 72)).shape == (1, 3, 72, 72)


def test_pspnet_output_stride_and_encoder_depth() -> None:
    assert create_model("pspnet", "test_resnet", 3, OUTPUTS, output_stride=16).stride == 16
    shallow = create_model("pspnet", "test_resnet", 3, OUTPUTS, encoder_depth=2)
    assert shallow.stride == 4 and shallow.encoder.feature_info.reduction() == [4]
    assert shallow(torch.randn(1, 3, 36, 44)).shape == (1, 3, 36, 44)
    with pytest.raises(ConfigError, match="encoder_depth 6 but encoder 'test_resnet' offers 5"):
        create_model("pspnet", "test_resnet", 3, OUTPUTS, encoder_depth=6)
    with pytest.raises(ConfigError, match="encoder_depth must be a positive integer"):
        create_model("pspnet", "test_resnet", 3, OUTPUTS, encoder_depth=0)


def test_pspnet_on_hrnet_fuses_all_branches() -> None:
    model = create_model("pspnet", "hrnet_w18_small", 3, OUTPUTS)
    info = model.encoder.feature_info
    assert info.reduction() == [4, 8, 16, 32]  # the stride-2 stem is left out
    assert isinstance(model.concat, ConcatLevels) and model.feature_channels == sum(info.channels())
    assert model.stride == 32 and model.up_to_input == 4
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 3, 64, 96)
    deepest = create_model("pspnet", "hrnet_w18_small", 3, OUTPUTS, levels="deepest")
    assert deepest.concat is None and deepest.encoder.feature_info.reduction() == [32]
    assert deepest(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    # concat on a dilated encoder: levels at strides 4 and 8 fused at 4
    concat = create_model("pspnet", "test_resnet", 3, OUTPUTS, levels="concat")
    assert concat.encoder.feature_info.reduction() == [4, 8, 8, 8] and concat.up_to_input == 4
    assert concat(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_psp_channels_default_and_option() -> None:
    assert [default_psp_channels(c) for c in (2048, 384, 270, 96)] == [512, 96, 67, 64]
    model = create_model("pspnet", "test_resnet", 3, OUTPUTS)
    assert model.head.channels == default_psp_channels(model.feature_channels)
    assert create_model("pspnet", "test_resnet", 3, OUTPUTS, psp_channels=24).head.channels == 24
    assert model_kwargs("pspnet")["bins"] == (1, 2, 3, 6) and model_kwargs("pspnet")["lightweight"] is False


def test_bins_option() -> None:
    assert parse_bins("1/2/3/6") == parse_bins("1,2,3,6") == parse_bins((1, 2, 3, 6)) == (1, 2, 3, 6)
    model = create_model("pspnet", "test_resnet", 3, OUTPUTS, bins="2/4")
    assert model.head.ppm.bins == (2, 4) and len(model.head.ppm.stages) == 2
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ConfigError, match="repeats"):
        create_model("pspnet", "test_resnet", 3, OUTPUTS, bins=(1, 2, 2))
    with pytest.raises(ConfigError, match="bins"):
        create_model("pspnet", "test_resnet", 3, OUTPUTS, bins="1/x")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"output_stride": 4}, "output_stride must be 8, 16 or 32"),
        ({"levels": "all"}, "levels 'all' is not one of auto, deepest, concat"),
        ({"psp_channels": 0}, "psp_channels must be a positive integer"),
        ({"dropout": 1.0}, "dropout"),
        ({"lightweight": "yes"}, "lightweight must be true or false"),
    ],
)
def test_bad_options_name_the_option(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_model("pspnet", "test_resnet", 3, OUTPUTS, **kwargs)
    with pytest.raises(ConfigError, match=match):
        create_model("siamese_pspnet", "test_resnet", 6, CHANGE, **kwargs)


@pytest.mark.parametrize(("arch", "in_ch", "outputs"), [("pspnet", 3, OUTPUTS), ("siamese_pspnet", 8, SEMANTIC)])
def test_lightweight_heads_are_depthwise_separable(arch: str, in_ch: int, outputs: list[OutputGroup]) -> None:
    dense = create_model(arch, "test_resnet", in_ch, outputs)
    light = create_model(arch, "test_resnet", in_ch, outputs, lightweight=True)
    heads = [m for m in light.modules() if m.__class__.__name__ == "PSPHead"]
    assert heads and all(isinstance(h.bottleneck, SeparableConvBNReLU) for h in heads)
    dw = depthwise_convs(nn.ModuleList(heads))
    assert len(dw) == len(heads) and all(c.groups == c.in_channels > 1 for c in dw)
    assert not depthwise_convs(nn.ModuleList(m for m in dense.modules() if m.__class__.__name__ == "PSPHead"))
    assert n_params(light) < n_params(dense)
    assert n_params(light.encoder) == n_params(dense.encoder)  # only the heads change
    x = torch.randn(2, in_ch, 64, 64)
    assert light(x).shape == dense(x).shape


def test_siamese_semantic_groups_and_order() -> None:
    k = 4
    model = create_model("siamese_pspnet", "test_efficientnet", 8, SEMANTIC).eval()
    assert isinstance(model, SiamesePSPNet) and model.stride == 8
    xa, xb = torch.randn(2, 4, 64, 64), torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        y = model(torch.cat([xa, xb], 1))
        y_b_changed = model(torch.cat([xa, torch.randn_like(xb)], 1))
        y_swapped = model(torch.cat([xb, xa], 1))
    assert y.shape == (2, 2 + 2 * k, 64, 64)
    # semantic_a sees only date A; semantic_b and change see date B
    assert torch.allclose(y[:, 2 : 2 + k], y_b_changed[:, 2 : 2 + k])
    assert not torch.allclose(y[:, 2 + k :], y_b_changed[:, 2 + k :])
    assert not torch.allclose(y[:, :2], y_b_changed[:, :2])
    # the change head sees |fa - fb|: symmetric in the dates; the semantic maps swap
    assert torch.allclose(y[:, :2], y_swapped[:, :2], atol=1e-5)
    assert torch.allclose(y[:, 2 : 2 + k], y_swapped[:, 2 + k :], atol=1e-5)

    reordered = [SEMANTIC[2], SEMANTIC[0], SEMANTIC[1]]
    other = create_model("siamese_pspnet", "test_efficientnet", 8, reordered).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        z = other(torch.cat([xa, xb], 1))
    assert torch.allclose(z, torch.cat([y[:, 2 + k :], y[:, :2], y[:, 2 : 2 + k]], 1))


def test_siamese_on_hrnet_and_change_only() -> None:
    model = create_model("siamese_pspnet", "hrnet_w18_small", 8, SEMANTIC)
    assert isinstance(model.concat, ConcatLevels) and model.stride == 32 and model.up_to_input == 4
    assert model(torch.randn(2, 8, 64, 96)).shape == (2, 10, 64, 96)
    change_only = create_model("siamese_pspnet", "hrnet_w18_small", 6, CHANGE)
    assert change_only.semantic_head is None
    assert change_only(torch.randn(2, 6, 64, 64)).shape == (2, 2, 64, 64)
    assert default_encoder("siamese_pspnet") == "hrnet_w18"
    assert default_encoder("pspnet") == DEFAULT_ENCODER


def test_siamese_fcn_semantic_head_is_the_seeds() -> None:
    model = create_model("siamese_pspnet", "test_resnet", 8, SEMANTIC, semantic_head="fcn")
    assert isinstance(model.change_head.ppm, PyramidPooling) and isinstance(model.semantic_head.ppm, nn.Identity)
    assert model(torch.randn(1, 8, 64, 64)).shape == (1, 10, 64, 64)
    with pytest.raises(ConfigError, match="semantic_head 'ocr' is not one of psp, fcn"):
        create_model("siamese_pspnet", "test_resnet", 8, SEMANTIC, semantic_head="ocr")


@pytest.mark.parametrize(
    ("in_channels", "outputs", "match"),
    [
        (5, CHANGE, "must be even"),
        (6, OUTPUTS, "need a 'change' group"),
        (6, [OutputGroup("change", 2), OutputGroup("semantic_a", 4)], "without its pair"),
    ],
)
def test_siamese_rejects_bad_inputs(in_channels: int, outputs: list[OutputGroup], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_model("siamese_pspnet", "test_resnet", in_channels, outputs)


@pytest.mark.parametrize(("arch", "encoder", "in_ch", "outputs"), [
    ("pspnet", "test_resnet", 3, OUTPUTS),
    ("pspnet", "hrnet_w18_small", 3, OUTPUTS),
    ("siamese_pspnet", "test_efficientnet", 8, SEMANTIC),
    ("siamese_pspnet", "hrnet_w18_small", 6, CHANGE),
])
def test_trains_with_batch_size_one(arch: str, encoder: str, in_ch: int, outputs: list[OutputGroup]) -> None:
    model = create_model(arch, encoder, in_ch, outputs).train()
    model(torch.randn(1, in_ch, 64, 64)).square().mean().backward()
    for head in (m for m in model.modules() if isinstance(m, PyramidPooling)):
        for stage in head.stages:  # every bin, the 1x1 one included, learns
            assert stage[0].weight.grad is not None and stage[0].weight.grad.abs().sum() > 0


def test_context_spans_the_whole_input() -> None:
    # test_resnet's receptive field does not span a 256x256 tile (see test_model_danet); the 1-bin pooling does
    model = create_model("pspnet", "test_resnet", 3, OUTPUTS).eval()
    x = torch.randn(1, 3, 256, 256)
    bumped = x.clone()
    bumped[..., :16, :16] += 10.0
    with torch.no_grad():
        assert float((model(bumped) - model(x))[..., -16:, -16:].abs().max()) > 1e-4


def spec_for(model: nn.Module, arch: str, encoder: str, bands: int, outputs: list[OutputGroup]) -> ModelSpec:
    change = arch.startswith("siamese")
    semantic = ["unchanged", "water", "building", "forest"] if len(outputs) > 1 else None
    classes = ["unchanged", "changed"] if change else [f"c{i}" for i in range(outputs[0].channels)]
    dataset = DatasetSpec(name="synthetic", task="change" if change else "multiclass", classes=classes,
                          colors=[[i * 40, 0, 0] for i in range(len(classes))], bands=list(range(1, bands + 1)),
                          semantic_classes=semantic)
    return ModelSpec(dataset=dataset, architecture=arch, encoder=encoder, in_channels=model.in_channels,
                     outputs=outputs, tile_size=64, tile_sizes=[64], stride=model.stride)


@pytest.mark.parametrize(("arch", "encoder", "bands", "outputs", "kwargs"), [
    ("pspnet", "test_resnet", 3, OUTPUTS, {}),
    ("pspnet", "test_efficientnet", 3, OUTPUTS, {"lightweight": True}),
    ("siamese_pspnet", "hrnet_w18_small", 4, SEMANTIC, {}),
])
def test_onnx_parity_at_two_shapes(tmp_path: Path, arch: str, encoder: str, bands: int,
                                   outputs: list[OutputGroup], kwargs: dict) -> None:
    in_ch = 2 * bands if arch.startswith("siamese") else bands
    model = create_model(arch, encoder, in_ch, outputs, **kwargs).eval()
    spec = spec_for(model, arch, encoder, bands, outputs)
    path = export_onnx(model, spec, tmp_path / f"{arch}.onnx")  # traced at 4 * stride, batch 1
    # batch 2 at 6x8 and 5x7 strides, neither the traced shape; at stride 8 the 5x7 map fits no bin > 1 evenly
    report = check_parity(model, path, spec)
    s = spec.stride
    assert [r[2:] for r in report.shapes] == [(6 * s, 8 * s), (5 * s, 7 * s)]
    assert_parity(report, atol=max(1e-4, 1e-5 * report.max_abs_logit))
    assert report.class_maps_equal
