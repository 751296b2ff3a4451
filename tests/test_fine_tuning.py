"""Deep supervision (unet aux_heads), pretrained encoder weights by name (timm's cache, offline), and
fine-tuning a registered version (`init_from`)."""

from __future__ import annotations

import huggingface_hub
import onnx
import pytest
import timm
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from rsseg.errors import ConfigError
from rsseg.export import export_onnx
from rsseg.losses import build_loss, deep_supervision_loss
from rsseg.models import create_model
from rsseg.models.encoders import resolve_encoder_weights
from rsseg.spec import OutputGroup
from rsseg.tracked_training import train_and_register
from rsseg.tracking import load_model_uri
from tests.conftest import TINY_ENCODER, tiny_config

OUTPUTS = [OutputGroup("classes", 3)]


# ------------------------------------------------------------------------------------------- aux heads


def test_aux_heads_train_with_deep_supervision_and_serve_without() -> None:
    torch.manual_seed(0)
    model = create_model("unet", TINY_ENCODER, 3, OUTPUTS, aux_heads=True).train()
    plain = create_model("unet", TINY_ENCODER, 3, OUTPUTS).train()
    assert model.aux_weights == [0.4, 0.4]
    assert plain.aux_weights == [] and len(plain.aux_heads) == 0
    x = torch.randn(2, 3, 64, 64)
    assert isinstance(model(x), torch.Tensor)  # only training asks for the auxiliary outputs

    model.emit_aux = True
    logits, *aux = model(x)
    assert logits.shape == (2, 3, 64, 64)
    assert [a.shape[-1] for a in aux] == [16, 32] and all(a.shape[1] == 3 for a in aux)

    target = {"classes": torch.randint(0, 3, (2, 64, 64))}
    loss_fn = build_loss(OUTPUTS)
    total, main, parts = deep_supervision_loss(loss_fn, (logits, *aux), target, model.aux_weights)
    alone, _ = loss_fn(logits.float(), target)
    assert main is logits and {"aux0_loss", "aux1_loss"} <= set(parts)
    assert float(total.detach()) == pytest.approx(float(alone) + 0.4 * (parts["aux0_loss"] + parts["aux1_loss"]), rel=1e-5)
    total.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.aux_heads.parameters())


def test_aux_heads_are_not_in_the_exported_graph(tmp_path) -> None:
    from tests.test_export_onnx import make_spec

    torch.manual_seed(0)
    model = create_model("unet", TINY_ENCODER, 3, OUTPUTS, aux_heads=True)
    model.emit_aux = True
    path = export_onnx(model, make_spec(model, "unet", TINY_ENCODER, 3, OUTPUTS), tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    assert len(graph.output) == 1
    assert not [i.name for i in graph.initializer if "aux_heads" in i.name]


def test_aux_heads_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="aux_weight must be a positive number"):
        create_model("unet", TINY_ENCODER, 3, OUTPUTS, aux_heads=True, aux_weight=0)
    with pytest.raises(ConfigError, match="unet only"):
        create_model("siamese_unet", TINY_ENCODER, 6, [OutputGroup("change", 2)], aux_heads=True)


# ----------------------------------------------------------------------------------- encoder weights


def test_encoder_weights_empty_or_a_path_pass_through(tmp_path) -> None:
    assert resolve_encoder_weights("", TINY_ENCODER) is None
    assert resolve_encoder_weights(str(tmp_path / "w.pth"), TINY_ENCODER) == str(tmp_path / "w.pth")


def test_imagenet_offline_says_so_in_one_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    # a closed loopback port: refused at once, as on a machine without internet (nothing is downloaded)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(ConfigError) as err:
        resolve_encoder_weights("imagenet", TINY_ENCODER)
    message = str(err.value)
    assert "\n" not in message and "not in the local Hugging Face cache" in message
    assert "127.0.0.1 is unreachable" in message and "timm/test_efficientnet" in message
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        resolve_encoder_weights("imagenet", TINY_ENCODER)


def test_imagenet_weights_load_from_timms_local_cache(tmp_path, monkeypatch) -> None:
    """A file laid out as huggingface_hub caches timm's weights is found and loaded into the encoder."""
    torch.manual_seed(1)
    classifier = timm.create_model(TINY_ENCODER, pretrained=False)
    repo = timm.models.get_pretrained_cfg(TINY_ENCODER).hf_hub_id
    cache = tmp_path / "hub"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(snapshot / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    path = resolve_encoder_weights("imagenet", TINY_ENCODER)
    assert path is not None and path.endswith("model.safetensors")
    model = create_model("unet", TINY_ENCODER, 3, OUTPUTS, pretrained_path=path)
    stem = classifier.conv_stem.weight
    assert torch.equal(model.encoder.conv_stem.weight, stem)


# ------------------------------------------------------------------------------------------ init_from


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())  # BatchNorm statistics move even at lr 0


@pytest.mark.slow
def test_init_from_fine_tunes_a_registered_version_with_another_loss(seaice_prepared, change_prepared, mlflow_store,
                                                                     tmp_path) -> None:
    name = "fine-tune"
    first = train_and_register(tiny_config(seaice_prepared, tmp_path / "a", epochs=1, model_name=name,
                                           model_options="aux_heads=true"))
    assert first["model_version"] == "1"
    # lr ~ 0: the fine-tuned version must still be the registered one's weights, not a new random model
    second = train_and_register(tiny_config(seaice_prepared, tmp_path / "b", epochs=1, model_name=name,
                                            init_from=f"models:/{name}/1", loss="lovasz", lr=1e-12,
                                            encoder="test_resnet", model_options=""))
    assert second["model_version"] == "2"
    before, _ = load_model_uri(f"models:/{name}/1")
    after, spec = load_model_uri(f"models:/{name}/2")
    assert spec.encoder == TINY_ENCODER and spec.architecture == "unet"  # kept from version 1
    assert len(after.aux_heads) == 2 and not after.emit_aux
    a, b = _weights(before), _weights(after)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    run = MlflowClient().get_run(MlflowClient().get_model_version(name, "2").run_id)
    assert run.data.params["init_from"] == f"models:/{name}/1" and run.data.params["loss"] == "lovasz"
    lineage = MlflowClient().get_model_version(name, "2").tags
    assert lineage["init_from"] == f"models:/{name}/1" and lineage["parent_version"] == f"{name}/1"
    assert lineage["parent_run_id"] == MlflowClient().get_model_version(name, "1").run_id

    with pytest.raises(ConfigError, match="this dataset needs 6"):
        train_and_register(tiny_config(change_prepared, tmp_path / "c", epochs=1, init_from=f"models:/{name}/1"))


@pytest.mark.parametrize("uri, message", [
    ("rsseg-binary/1", "give models:/NAME/VERSION"),
    ("models:/nobody/3", "no such registered version"),
    ("models:/nobody@champion", "no such alias"),
    ("runs:/0123456789abcdef", "no trained model in that run"),
])
def test_init_from_names_a_bad_uri(uri, message, mlflow_store) -> None:
    with pytest.raises(ConfigError, match=message):
        load_model_uri(uri)
