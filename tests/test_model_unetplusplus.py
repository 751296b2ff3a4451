"""rsseg.models.unetplusplus: UNet++ (Zhou et al. 2018) shapes, nested node layout (checked against
segmentation_models_pytorch's UnetPlusPlusDecoder), encoders without a stride-2 level or with repeated
reductions, gradients, deep supervision, option errors, ONNX parity.

Tiny timm encoders ("test_efficientnet", "test_resnet", "test_convnext"), 64x64 inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from rsseg.errors import ConfigError
from rsseg.export import assert_parity, check_parity, export_onnx
from rsseg.models import create_model, default_encoder, model_kwargs, model_tasks
from rsseg.models.blocks import SCSE
from rsseg.models.unet import SEED_DECODER_CHANNELS, UNetOptions
from rsseg.models.unetplusplus import UNetPlusPlus, UNetPlusPlusDecoder
from rsseg.spec import DEFAULT_ENCODER, DatasetSpec, ModelSpec, OutputGroup

OUTPUTS = [OutputGroup("classes", 3)]
TINY = "test_efficientnet"
# encoder_depth 4 on a stride-2..16 encoder: rows 1..4 hold the paper's L^3 grid (3 * 4 / 2 = 6 nodes with
# j >= 1), row 0 (input resolution, no encoder level) only the main path's last block: 7, as smp builds it.
DEPTH4_NODES = [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (1, 3), (0, 4)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def features(channels: list[int], reductions: list[int], size: int, batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, c, size // r, size // r) for c, r in zip(channels, reductions)]


def smp_state(ref: nn.Module, ours: UNetPlusPlusDecoder, smp_name: Callable[[tuple[int, int]], str]
              ) -> dict[str, torch.Tensor]:
    """smp's decoder state dict under our names (its SCSE modules name their layers differently)."""
    rename = {"attention.cSE.1": "cse.0", "attention.cSE.3": "cse.2", "attention.sSE.0": "sse.0"}
    state = {}
    for i, j in ours.nested_nodes:
        for key, value in ref.blocks[smp_name((i, j))].state_dict().items():
            for old, new in rename.items():
                key = key.replace(old, new)
            state[f"blocks.x_{i}_{j}.{key}"] = value
    return state


def test_registration() -> None:
    assert model_tasks("unetplusplus") == ("binary", "multiclass")
    assert default_encoder("unetplusplus") == DEFAULT_ENCODER
    fields = dataclasses.fields(UNetOptions)
    assert model_kwargs("unetplusplus") == {f.name: model_kwargs("unet")[f.name] for f in fields}


@pytest.mark.parametrize("encoder", [TINY, "test_resnet"])
def test_output_shape(encoder: str) -> None:
    model = create_model("unetplusplus", encoder, 3, OUTPUTS)
    assert isinstance(model, UNetPlusPlus)
    assert model.stride == 16 and model.encoder.feature_info.reduction() == [2, 4, 8, 16]
    assert model.decoder.final_scale == 1 and model.aux_weights == []
    y = model(torch.randn(2, 3, 64, 96))
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 64, 96)
    model.emit_aux = True  # deep supervision off by default: still one tensor in training
    assert isinstance(model(torch.randn(1, 3, 64, 64)), torch.Tensor)


def test_nested_nodes_for_depth_4_and_5() -> None:
    model = create_model("unetplusplus", TINY, 3, OUTPUTS, decoder_channels=SEED_DECODER_CHANNELS)
    dec = model.decoder
    assert dec.nested_nodes == DEPTH4_NODES and len(dec.blocks) == 7
    c2, c4, c8, c16 = model.encoder.feature_info.channels()
    # the dense skip pathways: X^{i,j} concatenates X^{i,0..j-1}; side nodes keep their row's encoder channels
    blocks = {name: dec.blocks[name] for name in ("x_1_1", "x_1_2", "x_1_3", "x_2_2", "x_0_4")}
    assert blocks["x_1_1"].conv1[0].in_channels == c4 + c2 and blocks["x_1_1"].conv2[0].out_channels == c2
    assert blocks["x_1_2"].conv1[0].in_channels == c4 + 2 * c2  # up(X^{2,1}: c4) + X^{1,0..1}
    assert blocks["x_1_3"].conv1[0].in_channels == 64 + 3 * c2  # main path: up(X^{2,2}: 64) + X^{1,0..2}
    assert blocks["x_2_2"].conv1[0].in_channels == 128 + 2 * c4  # up(X^{3,1}: 128) + X^{2,0..1}
    assert blocks["x_0_4"].conv1[0].in_channels == 32 and isinstance(blocks["x_0_4"].attention1, nn.Identity)
    assert [dec.node_channels[(i, 4 - i)] for i in (3, 2, 1, 0)] == [128, 64, 32, 16]  # decoder_channels
    assert c16 == dec.node_channels[(4, 0)]
    # encoder_depth 5: rows 1..5 are the paper's UNet++ L^4 (10 nodes), plus the full-resolution block
    deep = create_model("unetplusplus", TINY, 3, OUTPUTS, encoder_depth=5, decoder_channels=(64, 32, 16, 16, 8))
    nodes = deep.decoder.nested_nodes
    assert len([n for n in nodes if n[0] >= 1]) == 10 and len(nodes) == 11 and nodes[-1] == (0, 5)
    assert deep.stride == 32 and deep(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_every_node_runs_and_matches_smp() -> None:
    smp_decoder = pytest.importorskip("segmentation_models_pytorch.decoders.unetplusplus.decoder")
    # >= 16 channels everywhere: smp's SCSE would get 0 hidden channels below (ours keeps 1)
    channels, reductions, dec_ch = [16, 32, 48, 64], [2, 4, 8, 16], (64, 32, 16, 16)
    ours = UNetPlusPlusDecoder(channels, reductions, dec_ch).eval()
    ref = smp_decoder.UnetPlusPlusDecoder([3, *channels], dec_ch, n_blocks=4, attention_type="scse").eval()
    n = 4

    def smp_name(node: tuple[int, int]) -> str:  # X^{i,j} is smp's x_{d}_{l}: l = row from the deepest - 1
        i, j = node
        return f"x_{n - i - j}_{n - i - 1}"

    assert sorted(smp_name(node) for node in ours.nested_nodes) == sorted(ref.blocks)
    for m in ref.modules():  # non-trivial BatchNorm statistics, so a misplaced tensor shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    state = smp_state(ref, ours, smp_name)
    # smp keeps an unused attention1 on its skip-less last block; ours has none
    unused = [k for k in state if k.startswith(f"blocks.x_0_{n}.attention1.")]
    assert unused
    ours.load_state_dict({k: v for k, v in state.items() if k not in unused}, strict=True)
    feats = features(channels, reductions, 64)
    ran = []
    hooks = [block.register_forward_hook(lambda *_, name=name: ran.append(name)) for name, block in ours.blocks.items()]
    with torch.no_grad():
        out = ours(feats)
        expected = ref([torch.randn(2, 3, 64, 64), *feats])
    for h in hooks:
        h.remove()
    assert sorted(ran) == sorted(ours.blocks) and len(ran) == len(ours.blocks)
    assert out.shape == (2, 16, 64, 64)
    assert torch.allclose(out, expected, atol=1e-5)


def test_gradient_reaches_encoder_stem_and_every_node() -> None:
    model = create_model("unetplusplus", TINY, 3, OUTPUTS).train()
    model(torch.randn(1, 3, 64, 64)).square().mean().backward()  # batch 1 in training
    stem = next(m for m in model.encoder.modules() if isinstance(m, nn.Conv2d))
    assert stem.weight.grad is not None and stem.weight.grad.abs().sum() > 0
    for name, block in model.decoder.blocks.items():
        grad = block.conv1[0].weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_encoder_without_stride_2_level() -> None:
    # test_convnext starts at stride 4: row 0 (stride 2) has no level, a bilinear x2 closes the gap
    model = create_model("unetplusplus", "test_convnext", 3, OUTPUTS)
    assert model.encoder.feature_info.reduction() == [4, 8, 16, 32] and model.stride == 32
    assert model.decoder.final_scale == 2 and 0 not in model.decoder.levels
    assert model.decoder.nested_nodes == DEPTH4_NODES
    assert model(torch.randn(2, 3, 64, 96)).shape == (2, 3, 64, 96)


def test_repeated_reductions_and_gaps() -> None:
    # two levels at stride 4: the deeper one (index 2) is X^{2,0}
    dec = UNetPlusPlusDecoder([8, 16, 12, 24, 32], [2, 4, 4, 8, 16], (32, 16, 8, 8))
    assert dec.levels == {4: 4, 3: 3, 2: 2, 1: 0}
    assert dec.nested_nodes == DEPTH4_NODES and dec.node_channels[(2, 1)] == 12
    assert dec(features([8, 16, 12, 24, 32], [2, 4, 4, 8, 16], 64)).shape == (2, 8, 64, 64)
    # no level at stride 16: nested pathways stop at that row, the main path goes on without a skip
    dec = UNetPlusPlusDecoder([8, 16, 32, 40, 48], [2, 4, 8, 32, 64], (32, 16, 16, 8, 8))
    assert 3 not in dec.levels and dec.final_scale == 2
    assert dec.nested_nodes == [(0, 1), (1, 1), (4, 1), (0, 2), (3, 2), (2, 3), (1, 4), (0, 5)]
    assert isinstance(dec.blocks["x_3_2"].attention1, nn.Identity)  # main node of the empty row: no skip
    assert dec(features([8, 16, 32, 40, 48], [2, 4, 8, 32, 64], 128, batch=1)).shape == (1, 8, 128, 128)
    # all levels at one reduction (a ViT-like encoder): a plain upsampling path
    dec = UNetPlusPlusDecoder([8, 8, 8], [16, 16, 16], (16, 8, 8, 4))
    assert dec.nested_nodes == [(3, 1), (2, 2), (1, 3), (0, 4)] and dec.levels == {4: 2}
    with pytest.raises(ConfigError, match="upsample past input resolution"):
        UNetPlusPlusDecoder([8, 16], [2, 4], (16, 8, 8))


def test_deep_supervision() -> None:
    model = create_model("unetplusplus", TINY, 3, OUTPUTS, aux_heads=True, aux_weight=0.5)
    assert model.aux_nodes == [(1, 1), (1, 2)] and model.aux_weights == [0.5, 0.5]
    assert all(head.kernel_size == (1, 1) for head in model.aux_heads)
    x = torch.randn(2, 3, 64, 64)
    model.train()
    model.emit_aux = True
    logits, *aux = model(x)
    assert logits.shape == (2, 3, 64, 64) and [a.shape for a in aux] == [(2, 3, 32, 32)] * 2
    (logits.mean() + sum(a.mean() for a in aux)).backward()
    assert all(h.weight.grad is not None for h in model.aux_heads)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_train(x)[0])
    assert len(create_model("unetplusplus", TINY, 3, OUTPUTS, aux_heads=True, encoder_depth=3,
                            decoder_channels=(32, 16, 8)).aux_heads) == 1
    with pytest.raises(ConfigError, match="aux_heads needs nested nodes"):
        create_model("unetplusplus", TINY, 3, OUTPUTS, aux_heads=True, encoder_depth=2, decoder_channels=(16, 8))


def test_options_and_errors() -> None:
    with pytest.raises(ConfigError, match="decoder_block 'inverted_residual'.*decoder_block='conv'"):
        create_model("unetplusplus", TINY, 3, OUTPUTS, decoder_block="inverted_residual")
    with pytest.raises(ConfigError, match="one decoder channel count per level"):
        create_model("unetplusplus", TINY, 3, OUTPUTS, encoder_depth=3)
    with pytest.raises(ConfigError, match="attention"):
        create_model("unetplusplus", TINY, 3, OUTPUTS, attention="cbam")
    plain = create_model("unetplusplus", TINY, 3, OUTPUTS, attention="none", decoder_channels="64,32,16,8")
    assert not any(isinstance(m, SCSE) for m in plain.decoder.modules())
    assert plain.decoder.node_channels[(0, 4)] == 8
    assert not any(isinstance(m, SCSE) for m in create_model("unetplusplus", TINY, 3, OUTPUTS).modules())  # default
    scse = create_model("unetplusplus", TINY, 3, OUTPUTS, attention="scse")
    assert sum(isinstance(m, SCSE) for m in scse.decoder.modules()) == 2 * 7 - 1  # no attention1 without skip
    # same encoder as unet, more decoder parameters (the nested nodes)
    unet = create_model("unet", TINY, 3, OUTPUTS, attention="scse")
    assert n_params(scse.encoder) == n_params(unet.encoder) and n_params(scse) > n_params(unet)


def test_onnx_export_parity_at_two_shapes(tmp_path: Path) -> None:
    dataset = DatasetSpec(name="synthetic", task="multiclass", classes=["a", "b", "c"],
                          colors=[[0, 0, 0], [40, 0, 0], [80, 0, 0]], bands=[1, 2, 3])
    convs = []
    for name, kwargs in (("plain", {}), ("aux", {"aux_heads": True})):
        model = create_model("unetplusplus", TINY, 3, OUTPUTS, **kwargs).eval()
        spec = ModelSpec(dataset=dataset, architecture="unetplusplus", encoder=TINY, in_channels=3,
                         outputs=OUTPUTS, tile_size=64, tile_sizes=[64], stride=model.stride)
        path = export_onnx(model, spec, tmp_path / f"{name}.onnx")
        report = check_parity(model, path, spec)  # two shapes, neither the export shape
        assert len({s[2:] for s in report.shapes}) == 2
        assert_parity(report, atol=max(1e-4, 1e-5 * report.max_abs_logit))
        assert report.class_maps_equal
        convs.append(sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node))
    assert convs[0] == convs[1]  # the deep-supervision heads are not in the exported graph
