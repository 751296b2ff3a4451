"""End to end through MLflow: `mlflow run . -e train --env-manager local` registers a version; the main
job (the README's first command) trains, registers, promotes and asks the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from tests.conftest import PROJECT, TINY_ENCODER


def _env(uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    env["PATH"] = f"{os.path.dirname(sys.executable)}:{env['PATH']}"
    return env


@pytest.mark.slow
def test_mlflow_run_train_registers_a_version_with_metrics(seaice_prepared, mlflow_store, tmp_path):
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "mlflow"), "run", str(PROJECT), "-e", "train",
        "--env-manager", "local", "--experiment-name", "test-e2e",
        "-P", f"data={seaice_prepared}", "-P", f"encoder={TINY_ENCODER}", "-P", "epochs=2",
        "-P", "batch_size=4", "-P", f"checkpoint_dir={tmp_path / 'ckpt'}", "-P", "model_name=e2e-seaice",
    ]
    done = subprocess.run(cmd, env=_env(mlflow_store), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient(mlflow_store)
    versions = client.search_model_versions("name='e2e-seaice'")
    assert len(versions) == 1
    version = versions[0]
    assert version.tags["headline_metric"] == "val_iou_target"
    assert 0.0 <= float(version.tags["val_iou_target"]) <= 1.0
    assert version.tags["spec.task"] == "binary" and version.tags["spec.encoder"] == TINY_ENCODER

    run = client.get_run(version.run_id)
    assert run.data.params["encoder"] == TINY_ENCODER
    history = client.get_metric_history(run.info.run_id, "val_iou_target")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "dataset", "figures", "model_spec.json"} <= artifacts
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert figures == {"figures/confusion_matrix.png", "figures/predictions.png"}
    spec = json.loads(open(client.download_artifacts(run.info.run_id, "model_spec.json", str(tmp_path))).read())
    assert spec["dataset"]["mean"] == [127.5] * 3 and spec["dataset"]["std"] == [31.875] * 3
    assert spec["model_name"] == "e2e-seaice"

    # The registered model loads back through MLflow (pyfunc, raw tiles) and segments a tile.
    import mlflow.pyfunc
    import numpy as np

    model = mlflow.pyfunc.load_model(f"models:/e2e-seaice/{version.version}")
    out = model.predict(np.zeros((1, 64, 64, 3), np.uint8))
    assert out.shape == (1, 1, 64, 64) and out.dtype == np.uint8


@pytest.mark.slow
def test_prepare_entry_point_reports_bad_input_in_one_line(tmp_path, mlflow_store):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, "-m", "pipelines.prepare", "--source", str(empty), "--out",
                           str(tmp_path / "out")], cwd=PROJECT, env=_env(mlflow_store), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert "Traceback" not in done.stderr
    assert lines[-1].startswith("error: ") and str(empty) in lines[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_ddp_trains_on_two_cpu_processes_and_registers_once(seaice_prepared, mlflow_store, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nproc-per-node", "2", "--master-port", "29517", "-m", "pipelines.train",
           "--data", str(seaice_prepared), "--encoder", TINY_ENCODER, "--epochs", "1", "--batch-size", "2",
           "--checkpoint-dir", str(tmp_path / "ckpt"), "--model-name", "ddp-seaice"]
    env = _env(mlflow_store)
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(cmd, cwd=PROJECT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    versions = MlflowClient(mlflow_store).search_model_versions("name='ddp-seaice'")
    assert len(versions) == 1  # rank 0 alone logs and registers
    assert "val_iou_target" in versions[0].tags


@pytest.mark.slow
@pytest.mark.triton
def test_main_job_trains_registers_promotes_and_asks_the_server(tmp_path, mlflow_store, capsys):
    """What `make demo` runs (pipelines.main), on a small generated source and the tiny encoder."""
    from pipelines.main import main
    from rsseg.data.synthetic import generate_seaice

    generate_seaice(tmp_path / "scenes", scenes=3, size=512, seed=3)  # prepared with the default 512 tile
    assert main(["--source", str(tmp_path / "scenes"), "--epochs", "1", "--encoder", TINY_ENCODER,
                 "--model-name", "main-e2e", "--repo", str(tmp_path / "repo")]) == 0
    out = capsys.readouterr().out
    assert "registered model main-e2e version 1" in out
    assert f"promoted main-e2e v1 into {tmp_path / 'repo'}" in out
    answer = out[out.index("tritonserver "):].splitlines()
    assert "served main-e2e v1 (Triton version 1)" in answer[0]
    shares = [float(line.split()[-2]) for line in answer[1:3]]  # background, ice: % of the tile's pixels
    assert sum(shares) == pytest.approx(100.0, abs=0.2)
    assert (tmp_path / "data" / "prepared" / "scenes" / "dataset_spec.json").is_file()  # prepared under cwd
