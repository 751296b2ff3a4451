#!/usr/bin/env bash
# Set-up on a fresh machine: a virtualenv in .venv with the project and its test dependencies.
# Idempotent: re-running only installs what changed. Needs Python 3.11 and pip access to PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.rsseg-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    .venv/bin/pip install --quiet --upgrade pip wheel
    # torch and torchvision together first: the team's machines serve these two from local disk.
    .venv/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
    .venv/bin/pip install --quiet -e ".[dev]"
    # The Triton Inference Server binary (with the Python backend) ships in this wheel; only the binary
    # is used, so its Python dependencies (numpy<2 among them) are not installed.
    .venv/bin/pip install --quiet --no-deps "nvidia-pytriton==0.7.0"
    touch "$stamp"
fi
