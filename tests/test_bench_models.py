"""bench_models: the zoo table's cost columns measured on a small tile, and its layout (the real figures come
from `python -m pipelines.bench_models`, README)."""

from __future__ import annotations

import numpy as np
import pytest

from rsseg.bench.models import ZOO, Entry, cost_row, format_zoo_table
from rsseg.bench.quality import pixel_agreement
from rsseg.models import list_models


def test_zoo_costs_and_table() -> None:
    assert {e.architecture for e in ZOO} == set(list_models())  # every architecture has its row
    plain, aux = cost_row(Entry("unet", ("roads",)), tile=64, seconds=0.05), cost_row(
        Entry("unet", ("roads",), "aux_heads=true"), tile=64, seconds=0.05)
    assert plain["params_m"] == aux["params_m"] > 0  # auxiliary heads are not part of the served model
    assert plain["gflops_per_tile"] > 0 and plain["ort_cpu_tiles_per_s"] > 0 and not plain["bounded_receptive_field"]
    cell = {"architecture": "unet", "dataset": "dubai", "ours_served": 0.5, "ours_tiles_per_s": 3.0,
            "served_whole_agreement": 0.995}
    table = format_zoo_table([plain, aux], [cell]).splitlines()
    assert table[0].count("|") == table[1].count("|") == table[2].count("|")
    assert "| 0.500 | no | 99.50% of pixels |" in table[2] and table[3].endswith("| - | no | - |")
    assert pixel_agreement([np.zeros((2, 2)), np.ones(3)], [np.eye(2), np.ones(3)]) == pytest.approx(5 / 7)


def test_receptive_field_probe_tells_global_pooling_from_local_convs() -> None:
    import torch

    from rsseg.bench.models import bounded_receptive_field

    torch.manual_seed(0)
    local = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 3, padding=1))
    pooled = torch.nn.Sequential(local, torch.nn.Flatten(2), torch.nn.Softmax(-1), torch.nn.Unflatten(2, (64, 64)))
    x = torch.randn(1, 3, 64, 64)
    assert bounded_receptive_field(local, x) and not bounded_receptive_field(pooled, x)
