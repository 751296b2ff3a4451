"""MLproject and conda.yaml stay in step with the config dataclasses and pyproject.toml."""

from __future__ import annotations

import re

import pytest
import tomllib
import yaml

from pipelines._mlproject import render
from tests.conftest import PROJECT


def test_mlproject_is_generated_from_the_configs():
    assert (PROJECT / "MLproject").read_text() == render(), "run: python -m pipelines._mlproject > MLproject"


def test_every_command_placeholder_is_a_declared_parameter():
    project = yaml.safe_load((PROJECT / "MLproject").read_text())
    assert {"main", "prepare", "train", "benchmark"} <= set(project["entry_points"])
    for name, entry in project["entry_points"].items():
        placeholders = set(re.findall(r"\{(\w+)\}", entry["command"]))
        assert placeholders == set(entry.get("parameters", {})), name
        for param in entry.get("parameters", {}).values():
            assert param["type"] in ("string", "float", "path", "uri")


def test_conda_env_lists_the_package_dependencies():
    """Every entry point runs in the project's environment: the package's dependencies, its serve and bench
    extras and the server wheel at the version scripts/setup.sh installs."""
    import re

    conda = yaml.safe_load((PROJECT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    server = re.search(r'"(nvidia-pytriton==[^"]+)"', (PROJECT / "scripts" / "setup.sh").read_text()).group(1)
    extras = project["optional-dependencies"]
    assert sorted(pip) == sorted([*project["dependencies"], *extras["serve"], *extras["bench"], server])
    assert "tritonclient[all]>=2.50" in pip


def test_a_missing_dependency_is_one_line_naming_it_and_the_set_up():
    import subprocess
    import sys

    # onnx made unimportable, as in an environment built from training dependencies only
    code = ("import sys, runpy; sys.modules['onnx'] = None; sys.argv = ['promote']; "
            "runpy.run_module('pipelines.promote', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'onnx' is not installed" in lines[0] and "scripts/setup.sh" in lines[0], done.stderr


@pytest.mark.slow
@pytest.mark.triton
def test_train_and_promote_run_in_the_projects_own_environment(seaice_prepared, tmp_path):
    """`mlflow run` without --env-manager local builds conda.yaml's environment (here with uv, as where conda is
    absent) and every step runs in it: train registers a version, promote exports, checks and serves it."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from mlflow import MlflowClient

    bin_dir = str(Path(sys.executable).parent)  # mlflow and uv of the test environment
    assert shutil.which("uv", path=bin_dir), "uv is a dev dependency (pyproject.toml)"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}  # nothing left by other tests
    env.update(MLFLOW_TRACKING_URI=store, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    steps = [["-e", "train", "-P", f"data={seaice_prepared}", "-P", "epochs=1", "-P", "batch_size=4",
              "-P", "encoder=test_efficientnet", "-P", "model_name=own-env", "-P", f"checkpoint_dir={tmp_path / 'ckpt'}"],
             ["-e", "promote", "-P", "model_name=own-env", "-P", f"repo={tmp_path / 'triton_repo'}"]]
    for step in steps:
        done = subprocess.run([sys.executable, "-m", "mlflow", "run", str(PROJECT), *step, "--env-manager", "uv"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
        assert done.returncode == 0, (step[1], done.stderr[-3000:])
    assert (tmp_path / "triton_repo" / "own-env" / "history.json").is_file()
    import mlflow

    mlflow.set_tracking_uri(store)
    try:
        assert MlflowClient().get_registered_model("own-env").aliases == {"champion": 1}
    finally:
        mlflow.set_tracking_uri(None)
