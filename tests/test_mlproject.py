"""MLproject and conda.yaml stay in step with the config dataclasses and pyproject.toml."""

from __future__ import annotations

import re

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
    conda = yaml.safe_load((PROJECT / "conda.yaml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    declared = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(pip) == sorted(declared)
