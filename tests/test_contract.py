"""The wire contract both sides import: the names in the written configs are the contract's."""

from __future__ import annotations

from rsseg import contract
from rsseg.serving.repository import ServingOptions, model_configs, model_files
from rsseg.spec import DatasetSpec, ModelSpec, OutputGroup, default_colors


def _spec() -> ModelSpec:
    dataset = DatasetSpec(name="d", task="binary", classes=["a", "b"], colors=default_colors(2), bands=[1, 2, 3])
    return ModelSpec(dataset=dataset, architecture="unet", encoder="e", in_channels=3,
                     outputs=[OutputGroup("classes", 2)], tile_size=64, tile_sizes=[64], stride=32)


def test_step_names_and_is_step_agree() -> None:
    steps = contract.step_names("m")
    assert all(contract.is_step(n) for n in steps.values())
    assert not contract.is_step("m") and not contract.is_step("my-model")
    assert contract.wire_type("uint16") == "UINT16"


def test_configs_use_the_contract_names_and_ship_it() -> None:
    configs = model_configs("m", _spec(), 1, ServingOptions())
    ensemble = configs["m"]
    for name in (contract.TILES, contract.NORMALISED, contract.LOGITS, contract.CLASS_MAP, contract.PROBABILITIES):
        assert f'"{name}"' in ensemble, name
    assert f'name: "{contract.IMAGES}"' in configs[contract.step_names("m")["files"]]
    files = model_files("m", _spec())
    for role in ("preprocess", "segmenter", "postprocess"):
        assert "contract.py" in files[contract.step_names("m")[role]], role
