"""Shared fixtures: tiny generated datasets (real GeoTIFFs with a CRS) and a temporary MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest

from rsseg.config import TrainConfig
from rsseg.data.prepare import prepare_dataset
from rsseg.data.synthetic import generate_change, generate_seaice

PROJECT = Path(__file__).resolve().parent.parent
TINY_ENCODER = "test_efficientnet"


@pytest.fixture(scope="session")
def seaice_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("seaice")
    # Six scenes: the validation scene has ice (the generator's ice-free scene falls in training).
    generate_seaice(root / "source", scenes=6, size=96, seed=1)
    prepare_dataset(root / "source", root / "prepared", tile_size=64, overlap=32, progress=False)
    return root / "prepared"


@pytest.fixture(scope="session")
def change_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("change")
    generate_change(root / "source", pairs=4, size=64, seed=2, semantic_classes=4)
    prepare_dataset(root / "source", root / "prepared", tile_size=64, overlap=0, progress=False)
    return root / "prepared"


@pytest.fixture(scope="session")
def binary_change_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("binary-change")
    generate_change(root / "source", pairs=4, size=64, seed=3)
    prepare_dataset(root / "source", root / "prepared", tile_size=64, overlap=0, progress=False)
    return root / "prepared"


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite tracking store + artifact folder for one test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def tiny_config(data: Path, tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(data=str(data), encoder=TINY_ENCODER, epochs=2, batch_size=4, restart_epochs=2,
                  checkpoint_dir=str(tmp_path / "ckpt"), overlays=2)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test that used a tritonserver gets the server's state and log tail in its report: a
    server that died under a test (a crash, the OOM killer) is otherwise seen only as refused requests."""
    from rsseg.serving.server import TritonServer

    report = yield
    if report.failed:
        values = getattr(item, "funcargs", {}).values()
        for server in {id(s): s for v in values for s in (v if isinstance(v, tuple) else (v,))
                       if isinstance(s, TritonServer)}.values():
            state = "running" if server.exit_code is None else f"exited with code {server.exit_code}"
            report.sections.append((f"tritonserver {server.grpc_url} ({state}), log tail", server.log_tail(60)))
    return report
