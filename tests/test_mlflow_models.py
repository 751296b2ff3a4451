"""A registered version works with MLflow's own tools: pyfunc on raw tiles of any size (dynamic signature,
params), weights without pickle, `mlflow models predict` and a real `mlflow models serve` process, and the
promoted ONNX file logged as an onnx-flavour model that answers as the served file."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from rsseg.evaluation import OnnxModel
from rsseg.export.onnx import export_onnx
from rsseg.tracking import load_registered
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def registered(seaice_prepared, tmp_path_factory):
    """One trained, registered version in a store of its own (module scope: training is the slow part)."""
    from rsseg.tracked_training import train_and_register

    tmp = tmp_path_factory.mktemp("mlflow-models")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    before = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        out = train_and_register(tiny_config(seaice_prepared, tmp / "t", epochs=1, model_name="pyfunc-seaice"))
        model, spec = load_registered("pyfunc-seaice", out["model_version"])
        onnx = export_onnx(model, spec, tmp / "model.onnx")
        yield {"uri": uri, "tmp": tmp, "version": out["model_version"], "spec": spec, "onnx": onnx}
    finally:
        os.chdir(cwd)
        mlflow.set_tracking_uri(None)
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before


def _tiles(h: int = 64, w: int = 96, n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, h, w, 3)).astype(np.uint8)


@pytest.mark.slow
def test_pyfunc_takes_raw_tiles_of_any_size_and_answers_as_onnx_runtime(registered):
    uri = f"models:/pyfunc-seaice/{registered['version']}"
    model = mlflow.pyfunc.load_model(uri)
    (schema,) = model.metadata.get_input_schema().inputs
    assert schema.shape == (-1, -1, -1, 3) and schema.type == np.dtype("uint8")  # dynamic N, H, W
    reference = OnnxModel(registered["onnx"], registered["spec"])
    for h, w in ((64, 96), (128, 64)):
        tiles = _tiles(h, w)
        maps = model.predict(tiles)
        assert maps.shape == (2, 1, h, w) and maps.dtype == np.uint8
        assert (maps == reference.class_maps(tiles)).mean() >= 0.999  # torch vs ONNX Runtime: near-ties only
    both = model.predict(_tiles(), params={"probabilities": True, "tta": "flips"})
    assert set(both) == {"class_map", "probabilities"}
    assert both["probabilities"].dtype == np.float16 and both["probabilities"].shape == (2, 2, 64, 96)
    np.testing.assert_allclose(both["probabilities"].astype(np.float32).sum(axis=1), 1.0, atol=2e-3)
    with pytest.raises(Exception, match="multiple of"):
        model.predict(_tiles(60, 64))


@pytest.mark.slow
def test_the_logged_model_holds_no_pickle(registered):
    from mlflow import MlflowClient

    source = MlflowClient().get_model_version("pyfunc-seaice", registered["version"]).source
    local = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(registered["tmp"] / "dl")))
    files = [p.name for p in local.rglob("*") if p.is_file()]
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pth"))], files
    flavours = yaml.safe_load((local / "MLmodel").read_text())["flavors"]
    assert "pytorch" not in flavours and "python_model" not in flavours["python_function"]  # built from code
    assert (local / "artifacts" / "weights.pt").is_file() and (local / "artifacts" / "model_spec.json").is_file()
    import torch

    torch.load(local / "artifacts" / "weights.pt", weights_only=True)  # plain tensors only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_mlflow_models_serve_and_predict_answer_as_onnx_runtime(registered):
    tiles = _tiles(64, 64, n=1, seed=3)
    expected = OnnxModel(registered["onnx"], registered["spec"]).class_maps(tiles)
    # As in an activated environment: `mlflow models serve` runs uvicorn from PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"],
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    uri = f"models:/pyfunc-seaice/{registered['version']}"
    request = registered["tmp"] / "request.json"
    request.write_text(json.dumps({"inputs": tiles.tolist()}))
    mlflow_cli = [sys.executable, "-m", "mlflow"]

    predicted = registered["tmp"] / "predicted.json"
    done = subprocess.run([*mlflow_cli, "models", "predict", "-m", uri, "-i", str(request), "-t", "json",
                           "-o", str(predicted), "--env-manager", "local"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    answer = np.asarray(json.loads(predicted.read_text())["predictions"], dtype=np.uint8)
    assert (answer == expected).mean() >= 0.999

    port = _free_port()
    server = subprocess.Popen([*mlflow_cli, "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"mlflow models serve did not start: {server.stderr.read()[-2000:]!r}")
                time.sleep(1)
        post = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=request.read_bytes(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(post, timeout=120) as response:
            served = np.asarray(json.loads(response.read())["predictions"], dtype=np.uint8)
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert served.shape == expected.shape
    assert (served == expected).mean() >= 0.999
