"""The model spec's shared records: accepted window sizes, the prepared grid, output groups."""

from __future__ import annotations

import pytest

from rsseg.errors import ConfigError
from rsseg.heads import CHANGE, CLASSES, SEMANTIC
from rsseg.spec import MAX_TILE_SIZE, DatasetSpec, accepted_tile_sizes, default_colors, output_groups_for


def test_accepted_sizes_are_stride_multiples_from_the_training_tile() -> None:
    assert accepted_tile_sizes(256, 32, largest=384) == [256, 288, 320, 352, 384]
    assert accepted_tile_sizes(256, 16)[-1] == MAX_TILE_SIZE
    assert accepted_tile_sizes(2048, 32) == [2048]  # a tile above the menu's top is still accepted


def test_accepted_sizes_refuse_a_tile_off_the_stride() -> None:
    with pytest.raises(ConfigError, match="not a multiple of the model's stride 32"):
        accepted_tile_sizes(200, 32)


def _dataset(**kw) -> DatasetSpec:
    return DatasetSpec(name="d", task=kw.pop("task", "binary"), classes=["a", "b"], colors=default_colors(2),
                       bands=[1, 2, 3], **kw)


def test_dataset_spec_carries_the_grid_and_reads_older_specs_without_it() -> None:
    spec = _dataset(tile_size=256, overlap=32)
    again = DatasetSpec.from_dict(spec.to_dict())
    assert (again.tile_size, again.overlap) == (256, 32)
    older = spec.to_dict()
    del older["tile_size"], older["overlap"]
    assert DatasetSpec.from_dict(older).tile_size is None


def test_output_groups_use_the_head_names() -> None:
    assert [g.name for g in output_groups_for(_dataset())] == [CLASSES]
    assert [g.name for g in output_groups_for(_dataset(task="change"))] == [CHANGE]
    semantic = _dataset(task="change", semantic_classes=["unchanged", "water", "tree"])
    assert [(g.name, g.channels) for g in output_groups_for(semantic)] == [(CHANGE, 2), *((s, 3) for s in SEMANTIC)]
