# The README's two commands. Everything runs in .venv (created by scripts/setup.sh).
SHELL := /bin/bash
export PATH := $(CURDIR)/.venv/bin:$(PATH)

.PHONY: setup demo test test-all bench

setup:
	bash scripts/setup.sh

# The main job end to end on embedded defaults (generated data, SQLite store in ./mlflow.db).
demo: setup
	mlflow run . --env-manager local

# Fast tests, the slow ones and those that start a real tritonserver on loopback (what CI runs).
test: setup
	python -m pytest -m "not gpu and not bench" -q

bench: setup
	python -m pipelines.benchmark --dataset all
