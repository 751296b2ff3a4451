"""Promotion end to end with a real tritonserver: two registered versions, the better one served,
served class maps equal ONNX Runtime's and PyTorch's, rollback, a refused promotion that changes
nothing, and bad requests answered with errors while the server keeps serving."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from mlflow import MlflowClient
from tritonclient.utils import InferenceServerException

from rsseg.client.oneshot import connect, infer_tiles, served_spec
from rsseg.config import PromoteConfig
from rsseg.data.datasets import PreparedData
from rsseg.data.transforms import normalize
from rsseg.errors import PromotionRefused
from rsseg.inference import class_maps
from rsseg.promotion import promote, rollback
from rsseg.served_check import onnx_class_maps
from rsseg.serving.repository import read_history, step_names
from rsseg.serving.server import TritonServer
from rsseg.tracked_training import train_and_register
from tests.conftest import tiny_config

pytestmark = pytest.mark.triton

NAME = "promo-seaice"


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def real_tiles(prepared: Path, n: int = 3) -> np.ndarray:
    data = PreparedData.load(prepared)
    return np.stack([data.raw_tile(i) for i in range(n)])


@pytest.fixture
def two_versions(seaice_prepared, mlflow_store, tmp_path):
    weak = train_and_register(tiny_config(seaice_prepared, tmp_path / "weak", epochs=1, lr=1e-6, model_name=NAME))
    strong = train_and_register(tiny_config(seaice_prepared, tmp_path / "strong", epochs=3, lr=3e-3,
                                            model_name=NAME))
    client = MlflowClient()
    values = {str(v.version): float(v.tags["val_iou_target"]) for v in client.search_model_versions(f"name='{NAME}'")}
    assert values[strong["model_version"]] > values[weak["model_version"]], values
    return str(weak["model_version"]), str(strong["model_version"])


def test_promote_serve_refuse_and_roll_back(two_versions, seaice_prepared, tmp_path):
    weak, strong = two_versions
    repo = tmp_path / "triton_repo"
    client = MlflowClient()

    first = promote(PromoteConfig(model_name=NAME, version=weak, repo=str(repo)))
    assert first["version"] == weak and first["served_check"]["pixels_agree"] == 1.0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == weak

    second = promote(PromoteConfig(model_name=NAME, repo=str(repo)))  # picks the better version
    assert second["version"] == strong and second["previous_champion"] == weak
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == strong
    assert str(client.get_model_version_by_alias(NAME, "previous").version) == weak
    assert second["parity"]["class_maps_equal"] and second["parity"]["max_abs_diff"] < 1e-3
    assert read_history(repo, NAME)["served"] == 2

    # A worse version is refused and nothing changes, byte for byte.
    before = tree_digest(repo)
    with pytest.raises(PromotionRefused, match="does not beat champion"):
        promote(PromoteConfig(model_name=NAME, version=weak, repo=str(repo)))
    assert tree_digest(repo) == before
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == strong

    tiles = real_tiles(seaice_prepared)
    with TritonServer(repo) as server:
        server.wait_model_ready(NAME)
        spec = served_spec(connect(server.grpc_url), NAME)
        assert spec["model_version"] == strong and spec["dataset"]["mean"] == [127.5] * 3
        served = infer_tiles(server.grpc_url, NAME, tiles)
        served_files = _infer_files(server.grpc_url, tiles[0])
        maps, probabilities = infer_tiles(server.grpc_url, NAME, tiles, probabilities=True)
        with_tta = infer_tiles(server.grpc_url, NAME, tiles, tta="d4")
        _bad_requests_get_errors_and_serving_goes_on(server.grpc_url, tiles)
    onnx = repo / step_names(NAME)["segmenter"] / "2" / "model.onnx"
    model_spec_ = _spec(repo, 2)
    np.testing.assert_array_equal(served, onnx_class_maps(onnx, model_spec_, tiles))
    # The registry holds the served file itself: an onnx-flavour model on the version's run, tagged.
    (logged,) = second["served_check"]["onnx_models"]
    assert client.get_model_version(NAME, strong).tags["served_onnx"] == logged
    import mlflow
    import onnx as onnx_lib

    (registry_copy,) = Path(mlflow.artifacts.download_artifacts(logged, dst_path=str(tmp_path / "dl"))).glob("*.onnx")
    assert registry_copy.read_bytes() == onnx.read_bytes()
    assert mlflow.onnx.load_model(logged) == onnx_lib.load(str(onnx))
    np.testing.assert_array_equal(onnx_class_maps(registry_copy, model_spec_, tiles), served)
    np.testing.assert_array_equal(served_files, served[:1])
    np.testing.assert_array_equal(maps, served)
    assert probabilities.dtype == np.float16 and probabilities.shape == (3, 2, *tiles.shape[1:3])
    np.testing.assert_allclose(probabilities.astype(np.float32).sum(axis=1), 1.0, atol=2e-3)
    # fp16 probabilities can round a near tie to an exact one, where argmax takes the first class
    differs = probabilities.argmax(axis=1) != served[:, 0]
    assert differs.mean() < 1e-3 and (probabilities[:, 0][differs] == probabilities[:, 1][differs]).all()
    assert with_tta.shape == served.shape
    from rsseg.tracking import load_registered

    model, _ = load_registered(NAME, strong)
    with torch.no_grad():
        logits = model(torch.from_numpy(np.stack([normalize(t, model_spec_.dataset) for t in tiles])))
    torch_maps = class_maps(logits, model_spec_.outputs)["classes"].numpy()
    assert (served[:, 0] == torch_maps).mean() >= 0.9999

    back = rollback(PromoteConfig(model_name=NAME, repo=str(repo)))
    assert back["version"] == weak and read_history(repo, NAME)["served"] == 1
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == weak
    with TritonServer(repo) as server:
        server.wait_model_ready(NAME)
        rolled = infer_tiles(server.grpc_url, NAME, tiles)
    weak_onnx = repo / step_names(NAME)["segmenter"] / "1" / "model.onnx"
    np.testing.assert_array_equal(rolled, onnx_class_maps(weak_onnx, _spec(repo, 1), tiles))


def _spec(repo: Path, version: int):
    from rsseg.spec import ModelSpec

    return ModelSpec.load(repo / step_names(NAME)["segmenter"] / str(version) / "model_spec.json")


def _infer_files(url: str, tile: np.ndarray) -> np.ndarray:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="PNG")
    data = np.frombuffer(buffer.getvalue(), dtype=np.uint8)[None]
    with connect(url) as client:
        tensor = grpcclient.InferInput("IMAGES", list(data.shape), "UINT8")
        tensor.set_data_from_numpy(data)
        return client.infer(f"{NAME}-files", [tensor]).as_numpy("CLASS_MAP")


def _bad_requests_get_errors_and_serving_goes_on(url: str, tiles: np.ndarray) -> None:
    bad = {
        "dtype": tiles.astype(np.float32),
        "bands": np.concatenate([tiles, tiles[..., :1]], axis=-1),
        "rank": tiles[0],
        "empty": tiles[:0],
    }
    with connect(url) as client:
        # Request parameters reach the segmenter through the ensemble: an unknown TTA mode is refused.
        good = grpcclient.InferInput("TILES", list(tiles[:1].shape), "UINT8")
        good.set_data_from_numpy(tiles[:1])
        with pytest.raises(InferenceServerException, match="tta must be one of"):
            client.infer(NAME, [good], parameters={"tta": "bogus"})
        for what, array in bad.items():
            dtype = "FP32" if array.dtype == np.float32 else "UINT8"
            tensor = grpcclient.InferInput("TILES", list(array.shape), dtype)
            tensor.set_data_from_numpy(array)
            with pytest.raises(InferenceServerException):
                client.infer(NAME, [tensor])
            good = grpcclient.InferInput("TILES", list(tiles[:1].shape), "UINT8")
            good.set_data_from_numpy(tiles[:1])
            assert client.infer(NAME, [good]).as_numpy("CLASS_MAP").shape == (1, 1, *tiles.shape[1:3]), what
