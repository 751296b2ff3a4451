"""rsseg.models: registry, shapes, gradients, errors, encoder weights. Tiny timm encoders, 64x64 inputs."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from rsseg.errors import ConfigError
from rsseg.models import create_model, list_models, model_tasks, register_model
from rsseg.models.deeplab import select_deeplab_levels
from rsseg.models.encoders import Level, StaticSameConv2d, fix_same_padding
from rsseg.spec import OutputGroup

TINY = "test_efficientnet"


def outputs_for(arch: str, k: int = 3) -> tuple[int, list[OutputGroup]]:
    """(in_channels, outputs) suited to an architecture: change models get two 3-band dates."""
    if "change" in model_tasks(arch):
        return 6, [OutputGroup("change", 2)]
    return 3, [OutputGroup("classes", k)]


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.encoder.modules() if isinstance(m, nn.Conv2d))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_registry_lists_sorted_names() -> None:
    names = list_models()
    assert names == sorted(names)
    assert {"unet", "deeplabv3plus", "siamese_unet"} <= set(names)
    assert model_tasks("siamese_unet") == ("change",)


@pytest.mark.parametrize("encoder", [TINY, "test_resnet"])
@pytest.mark.parametrize("arch", list_models())
def test_forward_backward(arch: str, encoder: str) -> None:
    in_ch, outputs = outputs_for(arch)
    model = create_model(arch, encoder, in_ch, outputs)
    assert model.outputs == outputs and model.in_channels == in_ch
    x = torch.randn(2, in_ch, 64, 64)
    y = model(x)
    assert y.shape == (2, sum(g.channels for g in outputs), 64, 64)
    y.square().mean().backward()
    grad = first_conv(model).weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("arch", list_models())
def test_trains_with_batch_size_one(arch: str) -> None:
    # BatchNorm on a 1x1 map (e.g. an image-pooling branch) would fail here
    in_ch, outputs = outputs_for(arch)
    model = create_model(arch, TINY, in_ch, outputs).train()
    model(torch.randn(1, in_ch, 64, 64)).mean().backward()


@pytest.mark.parametrize("arch", list_models())
def test_non_square_input_keeps_resolution(arch: str) -> None:
    in_ch, outputs = outputs_for(arch)
    model = create_model(arch, TINY, in_ch, outputs).eval()
    with torch.no_grad():
        y = model(torch.randn(1, in_ch, 64, 96))
    assert y.shape[-2:] == (64, 96)


def test_change_model_with_semantic_groups_and_order() -> None:
    k = 4
    outputs = [OutputGroup("change", 2), OutputGroup("semantic_a", k), OutputGroup("semantic_b", k)]
    model = create_model("siamese_unet", TINY, 8, outputs).eval()
    xa, xb = torch.randn(2, 4, 64, 64), torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        y = model(torch.cat([xa, xb], 1))
        y_b_changed = model(torch.cat([xa, torch.randn_like(xb)], 1))
    assert y.shape == (2, 2 + 2 * k, 64, 64)
    # semantic_a sees only date A; semantic_b and change see date B
    assert torch.allclose(y[:, 2 : 2 + k], y_b_changed[:, 2 : 2 + k])
    assert not torch.allclose(y[:, 2 + k :], y_b_changed[:, 2 + k :])
    assert not torch.allclose(y[:, :2], y_b_changed[:, :2])

    # the same weights with the groups listed in another order give the channels in that order
    reordered = [outputs[2], outputs[0], outputs[1]]
    other = create_model("siamese_unet", TINY, 8, reordered).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        z = other(torch.cat([xa, xb], 1))
    assert torch.allclose(z, torch.cat([y[:, 2 + k :], y[:, :2], y[:, 2 : 2 + k]], 1))


def test_change_model_without_semantic_groups() -> None:
    model = create_model("siamese_unet", "test_resnet", 4, [OutputGroup("change", 2)])
    assert model.semantic_decoder is None
    assert model(torch.randn(2, 4, 64, 64)).shape == (2, 2, 64, 64)


@pytest.mark.parametrize(
    ("in_channels", "outputs", "match"),
    [
        (6, [OutputGroup("classes", 2)], "need a 'change' group"),
        (6, [OutputGroup("change", 3)], "must have 2"),
        (6, [OutputGroup("change", 2), OutputGroup("semantic_a", 4)], "without its pair"),
        (6, [OutputGroup("change", 2), OutputGroup("semantic_a", 4), OutputGroup("semantic_b", 5)], "same class"),
        (6, [OutputGroup("change", 2), OutputGroup("change", 2)], "unique"),
        (5, [OutputGroup("change", 2)], "must be even"),
        (6, [], "non-empty"),
    ],
)
def test_change_model_rejects_bad_outputs(in_channels: int, outputs: list[OutputGroup], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create_model("siamese_unet", TINY, in_channels, outputs)


def test_multispectral_uint16_range() -> None:
    model = create_model("unet", TINY, 4, [OutputGroup("classes", 2)]).eval()
    x = torch.randint(0, 65535, (1, 4, 64, 64)).float()  # raw uint16 values, cast to float
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 2, 64, 64) and torch.isfinite(y).all()


def test_unknown_architecture_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as err:
        create_model("segformer", TINY, 3, [OutputGroup("classes", 2)])
    for name in list_models():
        assert name in str(err.value)


def test_unknown_encoder_is_named() -> None:
    with pytest.raises(ConfigError, match="efficientnet_b99"):
        create_model("unet", "efficientnet_b99", 3, [OutputGroup("classes", 2)])


def test_unknown_kwarg_and_none_kwargs() -> None:
    with pytest.raises(ConfigError, match="encoder_depth"):  # lists what it does take
        create_model("unet", TINY, 3, [OutputGroup("classes", 2)], decoder_depth=3)
    # None means "use the default"
    model = create_model("unet", TINY, 3, [OutputGroup("classes", 2)], encoder_depth=None, decoder_channels=None)
    assert model.stride == 16


def test_decoder_options() -> None:
    model = create_model("unet", TINY, 3, [OutputGroup("classes", 2)], encoder_depth=5, decoder_channels="64,32,16,16,8")
    assert model.stride == 32
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    with pytest.raises(ConfigError, match="one decoder channel count per level"):
        create_model("unet", TINY, 3, [OutputGroup("classes", 2)], encoder_depth=3)
    with pytest.raises(ConfigError, match="offers 5 feature levels"):
        create_model("unet", TINY, 3, [OutputGroup("classes", 2)], encoder_depth=6, decoder_channels=(8,) * 6)
    with pytest.raises(ConfigError, match="attention"):
        create_model("unet", TINY, 3, [OutputGroup("classes", 2)], attention="cbam")


def test_bad_input_size_says_how_to_fix() -> None:
    model = create_model("unet", TINY, 3, [OutputGroup("classes", 2)])
    with pytest.raises(ConfigError, match="input height 100 is not a multiple of 16; pad or crop to 96 or 112"):
        model(torch.randn(1, 3, 100, 64))
    with pytest.raises(ConfigError, match="input width 8 is not a multiple of 16; pad to 16"):
        model(torch.randn(1, 3, 64, 8))
    with pytest.raises(ConfigError, match="5 channels but the model was built for 3"):
        model(torch.randn(1, 5, 64, 64))


def test_seed_unet_parameter_count() -> None:
    outputs = [OutputGroup("classes", 2)]
    seed = create_model("unet", "tf_efficientnet_lite3", 3, outputs, trim_encoder=False,
                        decoder_block="inverted_residual")
    n = sum(p.numel() for p in seed.parameters())
    assert seed.stride == 16
    assert seed.encoder.feature_info.reduction() == [2, 4, 8, 16]
    assert abs(n - 7.0e6) <= 0.15 * 7.0e6, n
    # trimming drops the encoder blocks after the deepest used level: far fewer parameters, same logits
    trimmed = create_model("unet", "tf_efficientnet_lite3", 3, outputs, decoder_block="inverted_residual")
    assert sum(p.numel() for p in trimmed.parameters()) < 0.4 * n
    trimmed.load_state_dict(seed.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(seed.eval()(x), trimmed.eval()(x))


def test_static_same_padding_matches_timm() -> None:
    # tf_* encoders use TF "SAME" padding; the static version must agree for stride-multiple inputs
    ref = timm.create_model("tf_efficientnet_lite0", features_only=True, pretrained=False).eval()
    fixed = copy.deepcopy(ref)
    assert fix_same_padding(fixed) > 0
    assert any(isinstance(m, StaticSameConv2d) for m in fixed.modules())
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        for a, b in zip(ref(x), fixed(x)):
            assert torch.allclose(a, b)


def test_pretrained_path_loads_encoder_weights(tmp_path) -> None:
    # a classification checkpoint (with head keys) of the same timm model
    state = timm.create_model("test_resnet", pretrained=False).state_dict()
    path = tmp_path / "test_resnet.pth"
    torch.save(state, path)
    model = create_model("unet", "test_resnet", 3, [OutputGroup("classes", 2)], pretrained_path=str(path))
    enc = model.encoder.state_dict()
    stem = next(k for k in enc if k.endswith("weight") and enc[k].ndim == 4)
    deep = next(k for k in enc if k.startswith("layer3.") and enc[k].ndim == 4)
    assert torch.equal(enc[stem], state[stem])
    assert torch.equal(enc[deep], state[deep])
    # 4 bands from an RGB checkpoint: the stem is adapted, the rest loads as is
    model4 = create_model("deeplabv3plus", "test_resnet", 4, [OutputGroup("classes", 2)], pretrained_path=str(path))
    enc4 = model4.encoder.state_dict()
    assert enc4[stem].shape[1] == 4 and state[stem].shape[1] == 3
    assert torch.allclose(enc4[stem][:, :3], state[stem][:, :3] * 3 / 4)  # timm's adapt_input_conv scaling
    assert torch.equal(enc4[deep], state[deep])


def test_pretrained_safetensors_with_flattened_feature_names(tmp_path) -> None:
    # timm's FeatureListNet renames stages.0 -> stages_0; a plain load_state_dict would match nothing
    state = timm.create_model("test_convnext", pretrained=False).state_dict()
    path = tmp_path / "test_convnext.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = create_model("unet", "test_convnext", 3, [OutputGroup("classes", 2)], pretrained_path=str(path))
    enc = model.encoder.state_dict()
    assert torch.equal(enc["stages_1.blocks.0.conv_dw.weight"], state["stages.1.blocks.0.conv_dw.weight"])


def test_pretrained_path_errors(tmp_path) -> None:
    outputs = [OutputGroup("classes", 2)]
    missing = tmp_path / "nope.pth"
    with pytest.raises(ConfigError, match="nope.pth"):
        create_model("unet", TINY, 3, outputs, pretrained_path=str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read"):
        create_model("unet", TINY, 3, outputs, pretrained_path=str(garbage))
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"foo.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(ConfigError, match="none of its 1 tensors"):
        create_model("unet", TINY, 3, outputs, pretrained_path=str(unrelated))


def test_deeplab_level_selection() -> None:
    def levels(*reductions: int) -> list[Level]:
        return [Level(i, 8, r) for i, r in enumerate(reductions)]

    assert [lv.reduction for lv in select_deeplab_levels(levels(2, 4, 8, 16, 32), 16)] == [4, 16]
    assert [lv.reduction for lv in select_deeplab_levels(levels(4, 8, 16, 32), 32)] == [4, 32]
    assert [lv.reduction for lv in select_deeplab_levels(levels(16, 16, 16), 16)] == [16]
    assert [lv.reduction for lv in select_deeplab_levels(levels(32,), 16)] == [32]  # only stride 32 on offer


def test_register_model_rejects_a_second_builder_for_a_name() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        register_model("unet")(lambda **kw: None)


def test_tracing_skips_the_input_check() -> None:
    model = create_model("deeplabv3plus", TINY, 3, [OutputGroup("classes", 2)]).eval()
    traced = torch.jit.trace(model, torch.randn(1, 3, 64, 64), check_trace=False)
    assert traced(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("arch", list_models())
def test_torch_export_dynamic_hw(arch: str) -> None:
    # torch.export is what the dynamo ONNX exporter runs; batch, H and W stay dynamic
    from torch.export import Dim, export

    in_ch, outputs = outputs_for(arch)
    model = create_model(arch, "tf_efficientnet_lite0", in_ch, outputs, trim_encoder=True).eval()
    s = model.stride
    shapes = {"x": {0: Dim("n", min=1, max=64), 2: s * Dim("h", min=1, max=256), 3: s * Dim("w", min=1, max=256)}}
    program = export(model, (torch.randn(2, in_ch, 4 * s, 6 * s),), dynamic_shapes=shapes)
    x = torch.randn(3, in_ch, 2 * s, 5 * s)
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)


def test_deeplab_output_stride_dilates_instead_of_dropping() -> None:
    outputs = [OutputGroup("classes", 2)]
    dropped = create_model("deeplabv3plus", "test_resnet", 3, outputs)
    dilated = create_model("deeplabv3plus", "test_resnet", 3, outputs, output_stride=8)
    assert dropped.stride == 16 and dilated.stride == 8
    assert dilated.encoder.feature_info.reduction()[-1] == 8
    # the dilated encoder keeps the deepest stage the default drops
    assert sum(p.numel() for p in dilated.encoder.parameters()) > sum(p.numel() for p in dropped.encoder.parameters())
    assert dilated(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
