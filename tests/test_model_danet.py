"""rsseg.models.danet: DANet (Fu et al. 2019) shapes, identity attention at init, global context, ONNX parity.

Tiny timm encoders ("test_resnet", "test_efficientnet"), 64x64 inputs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from rsseg.errors import ConfigError
from rsseg.export import assert_parity, check_parity, export_onnx
from rsseg.models import create_model
from rsseg.models.blocks import ConvBNReLU
from rsseg.models.danet import ChannelAttention, DANet, PositionAttention
from rsseg.spec import DatasetSpec, ModelSpec, OutputGroup

OUTPUTS = [OutputGroup("classes", 3)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def set_attention_scales(model: nn.Module, value: float) -> None:
    """Nonzero gamma/beta, as after training, so the attention paths contribute."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PositionAttention):
                m.gamma.fill_(value)
            elif isinstance(m, ChannelAttention):
                m.beta.fill_(value)


@pytest.mark.parametrize(("encoder", "stride"), [("test_resnet", 8), ("test_efficientnet", 8)])
def test_output_shape_and_stride(encoder: str, stride: int) -> None:
    model = create_model("danet", encoder, 3, OUTPUTS)
    assert isinstance(model, DANet)
    assert model.stride == stride
    assert len(model.encoder.feature_info.channels()) == 1  # only the deepest level is built
    deep = model.encoder.feature_info.channels()[-1]
    assert model.head.inter_channels == deep // 4
    assert model.head.pam.query.out_channels == max(1, deep // 4 // 8)
    x = torch.randn(2, 3, 64, 96)
    y = model(x)
    assert y.shape == (2, 3, 64, 96)
    # a 72x72 input is a multiple of the stride 8 but not of 16/32: the dilated encoder takes it
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 72, 72)).shape == (1, 3, 72, 72)


def test_output_stride_option_and_validation() -> None:
    model = create_model("danet", "test_resnet", 3, OUTPUTS, output_stride=16)
    assert model.stride == 16
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
    with pytest.raises(ConfigError, match="output_stride must be 8, 16 or 32"):
        create_model("danet", "test_resnet", 3, OUTPUTS, output_stride=4)
    with pytest.raises(ConfigError, match="dropout"):
        create_model("danet", "test_resnet", 3, OUTPUTS, dropout=1.5)


def test_attention_is_identity_at_init() -> None:
    pam, cam = PositionAttention(32), ChannelAttention()
    assert pam.gamma.item() == 0.0 and cam.beta.item() == 0.0
    x = torch.randn(2, 32, 8, 12)
    assert torch.equal(pam(x), x)
    assert torch.equal(cam(x), x)
    model = create_model("danet", "test_resnet", 3, OUTPUTS)
    assert all(m.gamma.item() == 0.0 for m in model.modules() if isinstance(m, PositionAttention))
    assert all(m.beta.item() == 0.0 for m in model.modules() if isinstance(m, ChannelAttention))
    # with nonzero scales the modules are no longer the identity
    set_attention_scales(nn.ModuleList([pam, cam]), 0.5)
    assert not torch.allclose(pam(x), x) and not torch.allclose(cam(x), x)


def test_attention_matches_reference_formula() -> None:
    pam, cam = PositionAttention(16), ChannelAttention()
    set_attention_scales(nn.ModuleList([pam, cam]), 0.7)
    x = torch.randn(1, 16, 3, 5)
    with torch.no_grad():
        f = x[0].reshape(16, -1)  # (C, N)
        q, k, v = (conv(x)[0].reshape(conv.out_channels, -1) for conv in (pam.query, pam.key, pam.value))
        a = torch.softmax(q.T @ k, dim=-1)  # a[i, j]: weight of position j for position i
        pam_ref = 0.7 * (v @ a.T) + f
        e = f @ f.T
        cam_ref = 0.7 * (torch.softmax(e.max(-1, keepdim=True).values - e, dim=-1) @ f) + f
        assert torch.allclose(pam(x)[0].reshape(16, -1), pam_ref, atol=1e-5)
        assert torch.allclose(cam(x)[0].reshape(16, -1), cam_ref, atol=1e-5)


def corner_dependence(module: nn.Module, x: torch.Tensor, size: int) -> float:
    """max |change| of the output's bottom-right `size` block when the input's top-left block is perturbed."""
    bumped = x.clone()
    bumped[..., :size, :size] += 10.0
    with torch.no_grad():
        return float((module(bumped) - module(x))[..., -size:, -size:].abs().max())


def test_position_attention_is_global_where_convs_are_not() -> None:
    x = torch.randn(1, 16, 16, 16)
    pam = PositionAttention(16)
    assert corner_dependence(pam, x, 1) == 0.0  # identity at init
    set_attention_scales(pam, 1.0)
    assert corner_dependence(pam, x, 1) > 1e-4
    convs = nn.Sequential(ConvBNReLU(16, 16), ConvBNReLU(16, 16), ConvBNReLU(16, 16)).eval()
    assert corner_dependence(convs, x, 1) == 0.0  # receptive field 7x7: the far corner cannot see the bump


def test_whole_model_context_comes_from_attention() -> None:
    model = create_model("danet", "test_resnet", 3, OUTPUTS).eval()
    x = torch.randn(1, 3, 256, 256)
    # scales at 0: encoder + convs only, whose receptive field does not span the 256x256 tile
    assert corner_dependence(model, x, 16) == 0.0
    set_attention_scales(model, 1.0)
    assert corner_dependence(model, x, 16) > 1e-4


def test_trains_with_batch_size_one_and_attention_gets_gradients() -> None:
    model = create_model("danet", "test_resnet", 3, OUTPUTS).train()
    model(torch.randn(1, 3, 64, 64)).square().mean().backward()
    head = model.head
    # gamma/beta get gradients at init (so they can leave 0); Q/K/V only once gamma is nonzero
    assert head.pam.gamma.grad is not None and head.pam.gamma.grad.abs().item() > 0
    assert head.cam.beta.grad is not None and head.cam.beta.grad.abs().item() > 0
    set_attention_scales(model, 0.5)
    model.zero_grad()
    model(torch.randn(1, 3, 64, 64)).square().mean().backward()
    assert head.pam.query.weight.grad.abs().sum() > 0


def test_onnx_export_parity_with_attention_active(tmp_path: Path) -> None:
    model = create_model("danet", "test_efficientnet", 3, OUTPUTS).eval()
    set_attention_scales(model, 0.5)  # exercise PAM/CAM in the graph, not identity residuals
    dataset = DatasetSpec(name="synthetic", task="multiclass", classes=["a", "b", "c"],
                          colors=[[0, 0, 0], [40, 0, 0], [80, 0, 0]], bands=[1, 2, 3])
    spec = ModelSpec(dataset=dataset, architecture="danet", encoder="test_efficientnet", in_channels=3,
                     outputs=OUTPUTS, tile_size=64, tile_sizes=[64], stride=model.stride)
    path = export_onnx(model, spec, tmp_path / "danet.onnx")
    report = check_parity(model, path, spec)  # two shapes, neither the export shape
    assert len({s[2:] for s in report.shapes}) == 2
    assert_parity(report, atol=max(1e-4, 1e-5 * report.max_abs_logit))
    assert report.class_maps_equal
