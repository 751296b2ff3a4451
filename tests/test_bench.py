"""The serving and scene benchmarks run end to end on small inputs and report every figure the README
quotes (the real figures come from the README's runs; nothing here is timed)."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def test_serving_benchmark_runs_small(capsys):
    from pipelines.bench_serving import main as bench_main

    assert bench_main(["--tile", "64", "--tiles", "4", "--batch", "2", "--max-in-flight", "2",
                       "--encoder", "test_efficientnet"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["tile"], result["tiles"], result["max_in_flight"]) == (64, 4, 2)
    for key in ("onnxruntime_tiles_per_s", "triton_tiles_per_s", "ratio_triton_to_onnxruntime"):
        assert result[key] > 0, key


def test_scene_benchmark_runs_small(capsys):
    """`python -m pipelines.bench_scene` end to end on a small scene and the tiny encoder: every figure
    the README quotes is there and plausible (the real figures come from the 8192² and 20000² runs)."""
    from pipelines.bench_scene import main as bench_main

    assert bench_main(["--size", "1000", "--tile", "256", "--margin", "32", "--reference-tiles", "4",
                       "--encoder", "test_efficientnet", "--shared-memory", "system"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["windows"] == 25  # ceil(1000 / 192)^2 windows of 256 at stride 192
    for key in ("end_to_end_megapixels_per_s", "onnxruntime_tiles_per_s_before", "onnxruntime_tiles_per_s_after",
                "pytorch_eager_tiles_per_s", "ratio_end_to_end_to_onnxruntime_tiles", "client_peak_rss_mb"):
        assert result[key] > 0, key
    assert result["end_to_end_megapixels_per_s"] == pytest.approx(1.0 / result["end_to_end_s"], rel=0.01)
    steps = result["server_steps"]  # from Triton's metrics: every window went through every step once
    assert steps["bench"]["tiles"] == steps["bench-segmenter"]["tiles"] == 25
    assert steps["bench-segmenter"]["compute_s"] > 0

