"""Every model family goes the whole way: train -> register -> promote (ONNX, parity, the real server's
answer) -> tritonserver -> `clients/segment.py` stitching a scene; and a model that cannot export is
refused when training starts, not at promotion. Smallest encoders, one epoch."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from rsseg.client.cli import main as segment
from rsseg.config import PromoteConfig
from rsseg.data.datasets import PreparedData
from rsseg.errors import ConfigError
from rsseg.models import registry
from rsseg.models.registry import SegmentationModel
from rsseg.promotion import promote
from rsseg.serving.server import TritonServer
from rsseg.tracked_training import train_and_register
from rsseg.training import train
from tests.conftest import tiny_config

# (architecture, encoder, dataset fixture, model options): one per family not covered elsewhere (unet,
# deeplabv3plus and siamese_unet go the whole way in test_promotion / test_pipelines / test_segment_cli)
FAMILIES = [
    ("unetplusplus", "test_efficientnet", "seaice_prepared", ""),
    ("pspnet", "test_resnet", "seaice_prepared", "lightweight=true"),
    ("danet", "test_efficientnet", "seaice_prepared", ""),
    ("hrnet_ocr", "hrnet_w18_small", "seaice_prepared", "ocr_mid_channels=32,ocr_key_channels=16"),
    ("siamese_pspnet", "test_efficientnet", "change_prepared", "lightweight=true"),
]


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.parametrize("architecture, encoder, fixture, options", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_trains_registers_promotes_serves_and_stitches(architecture, encoder, fixture, options, request,
                                                              mlflow_store, tmp_path):
    data = request.getfixturevalue(fixture)
    name = f"zoo-{architecture}"
    registered = train_and_register(tiny_config(data, tmp_path, epochs=1, architecture=architecture,
                                                encoder=encoder, model_options=options, model_name=name))
    repo = tmp_path / "repo"
    summary = promote(PromoteConfig(model_name=name, version=registered["model_version"], repo=str(repo)))
    assert summary["parity"]["class_maps_equal"]
    assert summary["served_check"]["pixels_agree"] == 1.0  # the real server equals ONNX Runtime

    source = data.parent / "source"
    if architecture.startswith("siamese"):
        args = ["--before", str(source / "im1"), "--after", str(source / "im2")]
        first = sorted((source / "im1").iterdir())[0]
    else:
        first = sorted((source / "image").iterdir())[0]
        args = [str(first)]
    out = tmp_path / "maps"
    with TritonServer(repo) as server:
        server.wait_model_ready(name)
        assert segment([*args, "--out", str(out), "--url", server.grpc_url, "--no-progress"]) == 0
    maps = sorted(p for p in out.rglob("*.tif") if first.stem in p.name)
    assert maps, sorted(out.rglob("*"))
    with rasterio.open(first) as src, rasterio.open(maps[0]) as dst:
        assert (dst.width, dst.height) == (src.width, src.height)
        classes = dst.read(1)
    assert classes.max() < 255 or (classes == 255).mean() < 0.01  # a map, not nodata


class _Unexportable(SegmentationModel):
    """A model whose graph ONNX cannot express (an SVD)."""

    def __init__(self, in_channels, outputs):
        super().__init__(in_channels, outputs, stride=1)
        self.conv = torch.nn.Conv2d(in_channels, self.out_channels, 1)

    def forward_logits(self, x):
        y = self.conv(x)
        return y + torch.linalg.svdvals(y).sum()


def test_a_model_that_cannot_export_is_refused_before_training(seaice_prepared, tmp_path, monkeypatch):
    def build(encoder, in_channels, outputs, pretrained_path=None):
        return _Unexportable(in_channels, outputs)

    for table, value in ((registry._MODELS, build), (registry._TASKS, ("binary", "multiclass")),
                         (registry._ENCODERS, "test_efficientnet")):
        monkeypatch.setitem(table, "unexportable", value)
    data = PreparedData.load(seaice_prepared)
    epochs = []
    with pytest.raises(ConfigError, match="unexportable/test_efficientnet cannot be exported to ONNX") as err:
        train(tiny_config(seaice_prepared, tmp_path, architecture="unexportable", encoder=""), data,
              on_epoch_end=lambda epoch, _: epochs.append(epoch))
    assert epochs == [] and "check_export=false" in str(err.value)
    # opting out trains it (for users who never promote)
    result = train(tiny_config(seaice_prepared, tmp_path, architecture="unexportable", encoder="", epochs=1,
                               check_export=False), data)
    assert result.best_epoch == 1 and np.isfinite(list(result.best_metrics.values())).all()
