"""prepare_dataset on every layout, bad inputs, and the generated datasets (mask decoding: test_masks).

All default tests use small data generated into tmp_path; the opt-in `bench` test prepares the real
datasets of ../shared/data when they are there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio

from rsseg.data.layouts import collect_scenes, detect_layout
from rsseg.data.masks import (
    decode_mask,
    mask_targets,
    pack_rgb,
    read_mask,
)
from rsseg.data.palette import load_palette
from rsseg.data.prepare import prepare_dataset
from rsseg.data.raster import read_window
from rsseg.data.synthetic import (
    generate_change,
    generate_landcover,
    generate_seaice,
    write_geotiff,
    write_jpeg,
    write_png,
)
from rsseg.data.tiling import tile_starts
from rsseg.errors import ConfigError, DataError, OutputError
from rsseg.outputs import OWNER_FILE, owner
from rsseg.spec import DatasetSpec

PROJECT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _spec(**kw) -> DatasetSpec:
    base = dict(name="t", task="binary", classes=["background", "target"], colors=[[0, 0, 0], [255, 255, 255]],
                bands=[1, 2, 3])
    base.update(kw)
    return DatasetSpec(**base)


def _read_csvs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    scenes = pd.read_csv(out / "scenes.csv", dtype={"scene": str}, keep_default_na=False)
    tiles = pd.read_csv(out / "tiles.csv", dtype={"scene": str})
    return scenes, tiles


def _check_manifest(out: Path, tile_size: int, overlap: int, folds: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Invariants every prepared dataset has: full coverage, edge tiles, scene-level splits and folds."""
    scenes, tiles = _read_csvs(out)
    assert list(scenes.columns) == ["scene", "image", "mask", "image_b", "mask_b", "mask_change", "height", "width",
                                    "fold", "split"]
    assert list(tiles.columns) == ["scene", "row", "col", "size", "fold", "split"]
    assert scenes["scene"].is_unique
    for s in scenes.itertuples():
        assert Path(s.image).is_absolute() and Path(s.image).exists()
        t = tiles[tiles["scene"] == s.scene]
        rows, cols = tile_starts(s.height, tile_size, overlap), tile_starts(s.width, tile_size, overlap)
        assert len(t) == len(rows) * len(cols)
        assert t["row"].max() == s.height - tile_size and t["col"].max() == s.width - tile_size  # edge tiles
        cover = np.zeros((s.height, s.width), bool)
        for r, c in zip(t["row"], t["col"]):
            cover[r:r + tile_size, c:c + tile_size] = True
        assert cover.all()
        assert (t["size"] == tile_size).all()
        assert (t["fold"] == s.fold).all() and (t["split"] == s.split).all()  # no leak across splits/folds
    assert set(scenes["split"]) <= {"train", "val"}
    assert set(scenes["fold"]) <= set(range(folds))
    if len(scenes) >= 2:
        assert (scenes["split"] == "val").sum() >= 1 and (scenes["split"] == "train").sum() >= 1
    # Folds partition the scenes round-robin: sizes differ by at most one.
    sizes = [int((scenes["fold"] == f).sum()) for f in range(folds)]
    assert sum(sizes) == len(scenes) and max(sizes) - min(sizes) <= 1
    assert not (out.parent / f".{out.name}.tmp").exists()
    spec = DatasetSpec.load(out / "dataset_spec.json")  # the grid travels in the spec
    assert (spec.tile_size, spec.overlap) == (tile_size, overlap)
    return scenes, tiles


def _direct_counts(scenes: pd.DataFrame, spec: DatasetSpec, column: str = "mask") -> np.ndarray:
    counts = np.zeros(256, np.int64)
    for path in scenes[column]:
        counts += np.bincount(decode_mask(read_mask(path, spec), spec).ravel(), minlength=256)
    return counts


# -------------------------------------------------------------------------------------------- synthetic


def test_generate_seaice(tmp_path):
    src = generate_seaice(tmp_path / "seaice", scenes=5, size=128, seed=3)
    assert (src / "GENERATED").exists() and "seed=3" in (src / "README.txt").read_text()
    origins, both = set(), 0
    images, masks = [], []
    for i in range(1, 6):
        with rasterio.open(src / "image" / f"{i}.tif") as ds:
            assert ds.crs.to_epsg() == 3413 and ds.count == 3 and ds.dtypes[0] == "uint8"
            assert ds.res == (50.0, 50.0)
            origins.add((ds.transform.c, ds.transform.f))
            images.append(ds.read())
        m = read_window(src / "gt" / f"{i}.png")[..., 0]
        assert set(np.unique(m)) <= {0, 255}
        both += len(np.unique(m)) == 2
        masks.append(m > 0)
    assert len(origins) == 5 and both >= 4
    assert not masks[-1].any()  # one scene without ice
    # Not separable by one global threshold on one band.
    y = np.concatenate([m.ravel() for m in masks])
    for band in range(3):
        x = np.concatenate([im[band].ravel() for im in images])
        best = max(((x >= t) & y).sum() / max(((x >= t) | y).sum(), 1) for t in range(0, 256, 4))
        assert best < 0.95
    # Same seed, same pixels.
    again = generate_seaice(tmp_path / "again", scenes=5, size=128, seed=3)
    assert np.array_equal(read_window(again / "image" / "2.tif"), read_window(src / "image" / "2.tif"))


# ------------------------------------------------------------------------------------------------ layouts


def test_pairs_binary255_generated(tmp_path):
    src = generate_seaice(tmp_path / "seaice", scenes=6, size=150, seed=1)
    res = prepare_dataset(src, tmp_path / "out", tile_size=64, overlap=16, folds=3, progress=False)
    spec = DatasetSpec.load(res.spec_path)
    assert spec == res.spec
    assert spec.name == "generated-seaice" and spec.generated
    assert spec.task == "binary" and spec.classes == ["background", "ice"] and spec.mask_encoding == "binary255"
    assert spec.bands == [1, 2, 3] and spec.dtype == "uint8" and spec.mean == [127.5] * 3
    scenes, tiles = _check_manifest(res.out, 64, 16, 3)
    assert tile_starts(150, 64, 16) == [0, 48, 86]
    assert len(scenes) == 6 and len(tiles) == 6 * 9 == res.num_tiles
    assert (scenes["image_b"] == "").all() and (scenes["mask_b"] == "").all()
    stats = json.loads(res.stats_path.read_text())
    counts = _direct_counts(scenes, spec)
    assert stats["class_pixels"] == {"background": counts[0], "ice": counts[1]}
    assert stats["ignored_pixels"] == 0
    assert stats["scenes"] == {"total": 6, "train": 5, "val": 1}
    assert sum(f["scenes"] for f in stats["folds"].values()) == 6
    # Band statistics equal a direct computation.
    pix = np.concatenate([read_window(p).reshape(-1, 3) for p in scenes["image"]]).astype(np.float64)
    np.testing.assert_allclose(stats["bands"]["mean"], pix.mean(0), atol=1e-3)
    np.testing.assert_allclose(stats["bands"]["std"], pix.std(0), atol=1e-3)
    assert stats["bands"]["max"] == pix.max(0).astype(int).tolist()
    # Same seed, same splits; a different seed reshuffles scenes, never tiles within a scene.
    res2 = prepare_dataset(src, tmp_path / "out2", tile_size=64, overlap=16, folds=3, progress=False)
    assert _read_csvs(res2.out)[0].equals(scenes)


def _grey_pairs(root: Path, n: int = 3, size: int = 80, img_dir: str = "images", mask_dir: str = "groundtruth"):
    rng = np.random.default_rng(0)
    (root / img_dir).mkdir(parents=True)
    (root / mask_dir).mkdir()
    for i in range(n):
        write_png(root / img_dir / f"sat_{i}.png", rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        yy, xx = np.mgrid[0:size, 0:size]
        grey = np.clip(255 - np.abs(xx - size // 2 - i) * 40, 0, 254).astype(np.uint8)  # anti-aliased road
        write_png(root / mask_dir / f"sat_{i}.png", grey)
    return root


def test_pairs_threshold(tmp_path):
    src = _grey_pairs(tmp_path / "roads")
    assert detect_layout(src) == "pairs"
    with pytest.raises(DataError, match=r"sat_0\.png.*--mask-threshold 128") as exc:
        prepare_dataset(src, tmp_path / "out", tile_size=64, overlap=16, progress=False)
    assert "\n" not in str(exc.value)
    assert not (tmp_path / "out").exists()
    res = prepare_dataset(src, tmp_path / "out", tile_size=64, overlap=0, mask_threshold=128, classes=["road"],
                          progress=False)
    assert res.spec.mask_encoding == "threshold" and res.spec.mask_threshold == 128
    assert res.spec.classes == ["background", "road"] and res.spec.name == "roads" and not res.spec.generated
    scenes, tiles = _check_manifest(res.out, 64, 0, 3)
    assert len(tiles) == 3 * 4
    raw = np.concatenate([read_window(p).ravel() for p in scenes["mask"]])
    assert res.stats["class_pixels"] == {"background": int((raw < 128).sum()), "road": int((raw >= 128).sum())}


def test_pairs_multiclass_index_and_01(tmp_path):
    src = tmp_path / "mc"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        write_png(src / "images" / f"{i}.png", rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
        m = rng.integers(0, 4, (70, 90), dtype=np.uint8)
        m[:5] = 255
        write_png(src / "masks" / f"{i}.png", m)
    res = prepare_dataset(src, tmp_path / "out", classes=["a", "b", "c", "d"], tile_size=64, overlap=8,
                          progress=False)
    assert res.spec.task == "multiclass" and res.spec.mask_encoding == "index" and res.spec.num_classes == 4
    scenes, tiles = _check_manifest(res.out, 64, 8, 3)
    assert len(tiles) == 4 * 2 * 2
    counts = _direct_counts(scenes, res.spec)
    assert res.stats["class_pixels"] == dict(zip("abcd", counts[:4].tolist()))
    assert res.stats["ignored_pixels"] == counts[255] == 4 * 5 * 90
    # Three names for four values: the mask naming the out-of-range value is reported.
    with pytest.raises(DataError, match=r"masks/0\.png: mask values 3 are outside"):
        prepare_dataset(src, tmp_path / "bad", classes=["a", "b", "c"], tile_size=64, overlap=16, progress=False)
    assert not (tmp_path / "bad").exists()
    # 0/1 masks -> index encoding.
    src01 = tmp_path / "b01"
    (src01 / "image").mkdir(parents=True)
    (src01 / "gt").mkdir()
    write_png(src01 / "image" / "x.png", np.zeros((64, 64, 3), np.uint8))
    write_png(src01 / "gt" / "x.png", np.eye(64, dtype=np.uint8))
    res01 = prepare_dataset(src01, tmp_path / "o01", tile_size=64, overlap=16, progress=False)
    assert res01.spec.mask_encoding == "index" and res01.stats["class_pixels"] == {"background": 64 * 63,
                                                                                    "target": 64}


def _paletted_png(path: Path, rgb: np.ndarray) -> None:
    """Write an RGB colour mask as a colour-table PNG (as some Dubai tiles are)."""
    packed = pack_rgb(rgb)
    keys, index = np.unique(packed, return_inverse=True)
    cmap = {i: ((int(k) >> 16) & 255, (int(k) >> 8) & 255, int(k) & 255, 255) for i, k in enumerate(keys)}
    with rasterio.open(path, "w", driver="PNG", height=rgb.shape[0], width=rgb.shape[1], count=1,
                       dtype="uint8") as dst:
        dst.write(index.reshape(rgb.shape[:2]).astype(np.uint8), 1)
        dst.write_colormap(1, cmap)


def test_palette_nested_dubai(tmp_path):
    src = tmp_path / "dubai"
    generate_landcover(src / "tile_1", scenes=2, size=96, seed=1, image_suffix=".jpg")
    generate_landcover(src / "tile_2", scenes=2, size=80, seed=2, image_suffix=".jpg")
    # One mask stored with a colour table instead of RGB: decodes the same.
    m = src / "tile_2" / "masks" / "image_part_002.png"
    rgb = read_window(m)
    _paletted_png(m, rgb)
    assert read_window(m).shape[-1] == 1 and np.array_equal(read_mask(m, _spec(mask_encoding="palette",
                                                                                 palette=[[0, 0, 0, 0]])), rgb)
    assert detect_layout(src, palette_given=True) == "palette"
    names = [s.name for s in collect_scenes(src, "palette")]
    assert names == ["tile_1_image_part_001", "tile_1_image_part_002", "tile_2_image_part_001",
                     "tile_2_image_part_002"]
    res = prepare_dataset(src, tmp_path / "out", palette="dubai", tile_size=64, overlap=16, progress=False)
    spec = res.spec
    assert spec.task == "multiclass" and spec.classes == ["land", "water", "building", "vegetation", "road"]
    assert spec.colors[1] == [226, 169, 41] and spec.mask_encoding == "palette"
    assert [0, 0, 0, 255] in spec.palette and [155, 155, 155, 255] in spec.palette
    scenes, tiles = _check_manifest(res.out, 64, 16, 3)
    assert len(tiles) == 2 * 4 + 2 * 4  # 96 -> [0, 32]; 80 -> [0, 16]
    counts = _direct_counts(scenes, spec)
    assert res.stats["class_pixels"] == dict(zip(spec.classes, counts[:5].tolist()))
    assert res.stats["ignored_pixels"] == counts[255] > 0
    assert res.stats["ignored_pixels_by_color"]["0,0,0"] == 2 * 96 + 2 * 80  # the black slivers
    assert res.stats["unknown_color_pixels"] == 0

    # An unknown colour: error names the file, the count and the colour; "ignore" maps it to ignore.
    bad = src / "tile_1" / "masks" / "image_part_001.png"
    rgb = read_window(bad)
    rgb[10:12, 10:15] = (1, 2, 3)
    write_png(bad, rgb)
    with pytest.raises(DataError, match=r"image_part_001\.png: 10 pixels .*\(1, 2, 3\).*--unknown-colors ignore"):
        prepare_dataset(src, tmp_path / "out2", palette="dubai", tile_size=64, overlap=16, progress=False)
    assert not (tmp_path / "out2").exists()
    res2 = prepare_dataset(src, tmp_path / "out2", palette="dubai", tile_size=64, unknown_colors="ignore",
                           overlap=16, progress=False)
    assert res2.stats["unknown_color_pixels"] == 10 and res2.stats["unknown_colors"] == [[[1, 2, 3], 10]]
    assert res2.stats["ignored_pixels"] == res.stats["ignored_pixels"] + 10


def test_change_levir(tmp_path):
    src = generate_change(tmp_path / "levir", pairs=3, size=96, seed=0)
    for old, new in (("A", "a"), ("B", "b")):  # lowercase copies are accepted too
        (src / old).rename(src / new)
    assert detect_layout(src) == "change"
    res = prepare_dataset(src, tmp_path / "out", tile_size=64, overlap=0, progress=False)
    spec = res.spec
    assert spec.task == "change" and spec.classes == ["no_change", "change"] and spec.semantic_classes is None
    assert spec.mask_encoding == "binary255" and spec.name == "generated-change"
    scenes, tiles = _check_manifest(res.out, 64, 0, 3)
    assert len(tiles) == 3 * 4
    assert all(Path(p).parent.name == "b" for p in scenes["image_b"]) and (scenes["mask_b"] == "").all()
    counts = np.zeros(2, np.int64)
    for p in scenes["mask"]:
        counts += np.bincount(mask_targets(read_mask(p, spec), None, spec)["change"].ravel(), minlength=2)
    assert res.stats["class_pixels"] == {"no_change": counts[0], "change": counts[1]} and counts[1] > 0
    assert res.stats["bands"]["pixels"] == [2 * 3 * 96 * 96] * 3  # both dates


def test_second_semantic_change(tmp_path):
    src = generate_change(tmp_path / "second", pairs=4, size=64, seed=5, semantic_classes=4)
    assert detect_layout(src) == "second"
    res = prepare_dataset(src, tmp_path / "out", tile_size=64, overlap=16, progress=False,
                          classes=["unchanged", "water", "tree", "building"])
    spec = res.spec
    assert spec.task == "change" and spec.semantic_classes == ["unchanged", "water", "tree", "building"]
    assert spec.has_semantic and spec.headline_metric == "sek" and spec.mask_encoding == "index"
    scenes, tiles = _check_manifest(res.out, 64, 16, 3)
    assert len(tiles) == 4 and (scenes["mask_b"] != "").all() and (scenes["image_b"] != "").all()
    change = np.zeros(256, np.int64)
    sem_a = np.zeros(256, np.int64)
    for s in scenes.itertuples():
        t = mask_targets(read_mask(s.mask, spec), read_mask(s.mask_b, spec), spec)
        change += np.bincount(t["change"].ravel(), minlength=256)
        sem_a += np.bincount(t["semantic_a"].ravel(), minlength=256)
    assert res.stats["class_pixels"] == {"no_change": change[0], "change": change[1]}
    assert res.stats["semantic_a_pixels"] == {"water": sem_a[1], "tree": sem_a[2], "building": sem_a[3]}
    assert res.stats["unchanged_mismatch_pixels"] == 0
    # Default names from the values found.
    res2 = prepare_dataset(src, tmp_path / "out2", tile_size=64, overlap=16, progress=False, name="sem")
    assert res2.spec.semantic_classes == ["unchanged", "class_1", "class_2", "class_3"]
    assert res2.spec.name == "generated-sem"  # generated data always says so


def test_second_colour_labels_with_palette(tmp_path):
    src = generate_change(tmp_path / "second", pairs=2, size=64, seed=1, semantic_classes=3)
    colours = [[255, 255, 255], [0, 0, 255], [0, 128, 0]]  # unchanged, water, tree (SECOND-like)
    for d in ("label1", "label2"):
        for p in (src / d).iterdir():
            write_png(p, np.array(colours, np.uint8)[read_window(p)[..., 0]])
    pal = tmp_path / "second.json"
    pal.write_text(json.dumps({"classes": [{"name": n, "color": c} for n, c in
                                           zip(["unchanged", "water", "tree"], colours)]}))
    res = prepare_dataset(src, tmp_path / "out", palette=pal, tile_size=64, overlap=0, progress=False)
    assert res.spec.mask_encoding == "palette" and res.spec.semantic_classes == ["unchanged", "water", "tree"]
    assert res.spec.semantic_colors == colours
    ref = prepare_dataset(generate_change(tmp_path / "ref", pairs=2, size=64, seed=1, semantic_classes=3),
                          tmp_path / "out_ref", tile_size=64, overlap=0, progress=False)
    assert res.stats["class_pixels"] == ref.stats["class_pixels"]
    assert list(res.stats["semantic_b_pixels"].values()) == list(ref.stats["semantic_b_pixels"].values())


def test_block_reads_match_whole_reads(tmp_path, monkeypatch):
    from rsseg.data import scan

    src = generate_landcover(tmp_path / "lc", scenes=2, size=100, seed=4)
    whole = prepare_dataset(src, tmp_path / "a", palette="dubai", tile_size=64, overlap=0, progress=False)
    monkeypatch.setattr(scan, "_BLOCK", 24)  # many partial blocks per scene
    blocked = prepare_dataset(src, tmp_path / "b", palette="dubai", tile_size=64, overlap=0, progress=False)
    for key in ("class_pixels", "ignored_pixels", "ignored_pixels_by_color", "bands"):
        assert blocked.stats[key] == whole.stats[key]


def test_progress_bar_and_cli(tmp_path, capsys, monkeypatch):
    from pipelines.prepare import main

    src = generate_seaice(tmp_path / "seaice", scenes=2, size=64, seed=0)
    prepare_dataset(src, tmp_path / "out", tile_size=64, overlap=0, progress=True)
    assert "prepare" in capsys.readouterr().err
    assert main(["--source", str(src), "--out", str(tmp_path / "cli"), "--tile-size", "64", "--overlap", "0"]) == 0
    assert '"total": 2' in capsys.readouterr().out
    with pytest.raises(DataError) as err:
        main(["--source", str(src), "--out", str(tmp_path / "cli2"), "--tile-size", "96"])
    assert "--tile-size 64" in str(err.value) and not (tmp_path / "cli2").exists()


def test_uint16_four_bands_and_bands_option(tmp_path):
    src = tmp_path / "ms"
    (src / "image").mkdir(parents=True)
    (src / "gt").mkdir()
    rng = np.random.default_rng(2)
    for i in range(2):
        arr = rng.integers(0, 12000, (64, 96, 4), dtype=np.uint16)
        arr[0, 0] = 0
        write_geotiff(src / "image" / f"s{i}.tif", arr, nodata=0)
        write_png(src / "gt" / f"s{i}.png", (rng.random((64, 96)) > 0.5).astype(np.uint8) * 255)
    res = prepare_dataset(src, tmp_path / "out", tile_size=64, overlap=0, progress=False)
    assert res.spec.dtype == "uint16" and res.spec.bands == [1, 2, 3, 4] and res.spec.num_bands == 4
    assert res.spec.nodata == 0  # from the files
    assert len(res.stats["bands"]["mean"]) == 4 and res.stats["bands"]["max"][0] < 12000
    assert res.stats["bands"]["pixels"][0] < 2 * 64 * 96  # nodata pixels left out
    res3 = prepare_dataset(src, tmp_path / "out3", tile_size=64, bands=[4, 1], overlap=16, progress=False)
    assert res3.spec.bands == [4, 1] and res3.spec.mean == [127.5, 127.5]
    with pytest.raises(ConfigError, match="band 5 does not exist"):
        prepare_dataset(src, tmp_path / "out4", tile_size=64, bands=[5], overlap=16, progress=False)


def _hidden(folder: Path) -> list[str]:
    """Temporary or half-written entries (dot names) left beside the outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_out_holding_other_files_is_refused_and_kept(tmp_path):
    src = generate_seaice(tmp_path / "seaice", scenes=2, size=64, seed=0)
    user = tmp_path / "user"
    user.mkdir()
    (user / "important.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"user: folder is not empty and holds files this command did not write"):
        prepare_dataset(src, user, tile_size=64, overlap=0, progress=False, overwrite=True)  # never widened
    assert [p.name for p in user.iterdir()] == ["important.txt"] and (user / "important.txt").read_text() == "mine"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    with pytest.raises(OutputError, match=r"notes\.txt: exists and is not a folder"):
        prepare_dataset(src, a_file, tile_size=64, overlap=0, progress=False)
    with pytest.raises(OutputError, match=r"notes\.txt is a file, not a folder"):
        prepare_dataset(src, a_file / "sub", tile_size=64, overlap=0, progress=False)
    assert a_file.read_text() == "keep"
    other = generate_seaice(tmp_path / "other", scenes=1, size=64, seed=1)
    with pytest.raises(OutputError, match="was written by generate"):
        prepare_dataset(src, other, tile_size=64, overlap=0, progress=False)
    with pytest.raises(ConfigError, match="must not be the dataset folder"):
        prepare_dataset(src, src, tile_size=64, overlap=16, progress=False)
    assert (src / "image").exists()
    assert _hidden(tmp_path) == []


def test_out_is_checked_before_any_pixel_is_read(tmp_path):
    src = _pairs(tmp_path / "src")
    (src / "image" / "1.tif").write_bytes(b"damaged")  # would fail the scan
    user = tmp_path / "user"
    user.mkdir()
    (user / "a.txt").write_text("x")
    with pytest.raises(OutputError, match="did not write"):
        prepare_dataset(src, user, tile_size=64, overlap=0, progress=False)


def test_overwrite_replaces_only_an_earlier_prepare_output(tmp_path):
    src = generate_seaice(tmp_path / "seaice", scenes=2, size=64, seed=0)
    out = tmp_path / "out"
    prepare_dataset(src, out, tile_size=64, overlap=0, progress=False)
    assert owner(out) == "prepare" and (out / OWNER_FILE).is_file()
    tiles = (out / "tiles.csv").read_text()
    with pytest.raises(OutputError, match="holds an earlier output of prepare; pass --overwrite"):
        prepare_dataset(src, out, tile_size=32, overlap=0, progress=False)
    with pytest.raises(DataError, match="smaller than the tile size"):  # a failed run keeps the old output
        prepare_dataset(src, out, tile_size=128, overlap=0, progress=False, overwrite=True)
    assert (out / "tiles.csv").read_text() == tiles
    res = prepare_dataset(src, out, tile_size=32, overlap=0, progress=False, overwrite=True)
    assert res.num_tiles == 2 * 4 and (out / "tiles.csv").read_text() != tiles and owner(out) == "prepare"
    # An output of a version without the marker: recognised by its exact files only.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name in ("scenes.csv", "tiles.csv", "dataset_spec.json", "stats.json"):
        shutil.copy(out / name, legacy / name)
    prepare_dataset(src, legacy, tile_size=64, overlap=0, progress=False, overwrite=True)
    assert owner(legacy) == "prepare" and len(pd.read_csv(legacy / "tiles.csv")) == 2
    (legacy / OWNER_FILE).unlink()
    (legacy / "mine.txt").write_text("x")
    with pytest.raises(OutputError, match="did not write"):
        prepare_dataset(src, legacy, tile_size=64, overlap=0, progress=False, overwrite=True)
    assert (legacy / "mine.txt").exists()
    assert _hidden(tmp_path) == []


def test_out_may_be_a_link_to_a_folder(tmp_path):
    src = generate_seaice(tmp_path / "seaice", scenes=2, size=64, seed=0)
    (tmp_path / "disk").mkdir()
    link = tmp_path / "link"
    link.symlink_to("disk")
    prepare_dataset(src, link, tile_size=64, overlap=0, progress=False)
    prepare_dataset(src, link, tile_size=32, overlap=0, progress=False, overwrite=True)
    assert link.is_symlink() and owner(tmp_path / "disk") == "prepare" and len(pd.read_csv(link / "tiles.csv")) == 8
    assert _hidden(tmp_path) == []


def _prepare_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.prepare", *args], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120)


def _one_error_line(done: subprocess.CompletedProcess, *needles: str) -> None:
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert all(n in errors[0] for n in needles), errors[0]


def test_prepare_cli_out_refusals_and_overwrite(tmp_path):
    src = generate_seaice(tmp_path / "seaice", scenes=2, size=64, seed=0)
    common = ["--source", str(src), "--tile-size", "64", "--overlap", "0"]
    user = tmp_path / "d"
    user.mkdir()
    (user / "important.txt").write_text("mine")
    _one_error_line(_prepare_cli(*common, "--out", str(user)), str(user), "did not write", "(nothing was changed)")
    assert (user / "important.txt").read_text() == "mine" and len(list(user.iterdir())) == 1
    a_file = tmp_path / "f.txt"
    a_file.write_text("keep")
    _one_error_line(_prepare_cli(*common, "--out", str(a_file)), str(a_file), "not a folder")
    assert a_file.read_text() == "keep"
    out = tmp_path / "out"
    assert _prepare_cli(*common, "--out", str(out)).returncode == 0
    _one_error_line(_prepare_cli(*common, "--out", str(out)), "earlier output of prepare", "--overwrite")
    done = _prepare_cli(*common, "--out", str(out), "--overwrite")
    assert done.returncode == 0 and "prepared" in done.stdout, done.stderr
    assert _hidden(tmp_path) == []  # no .NAME.old-PID, no temp folder


def test_prepare_cli_damaged_raster_is_one_line_with_gdals_cause(tmp_path):
    src = tmp_path / "src"
    _bad_truncated(src)
    done = _prepare_cli("--source", str(src), "--out", str(tmp_path / "out"), "--tile-size", "64", "--overlap", "0")
    _one_error_line(done, "0.png: cannot read as a raster (", "libpng")
    assert "GDAL signalled" not in done.stderr and "See previous exception" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists() and _hidden(tmp_path) == []


def test_overwrite_flag_alone_or_with_a_value():
    from pipelines._cli import parser_for
    from rsseg.config import PrepareConfig

    parser = parser_for(PrepareConfig, "")
    assert parser.parse_args(["--overwrite"]).overwrite is True
    assert parser.parse_args(["--overwrite", "false", "--source", "x"]).overwrite is False  # as MLproject passes it
    assert parser.parse_args([]).overwrite is False


def test_generators_never_replace_a_users_folder(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "photo.png").write_bytes(b"x")
    for generate in (lambda: generate_seaice(user, scenes=1, size=64),
                     lambda: generate_change(user, pairs=1, size=64),
                     lambda: generate_landcover(user, scenes=1, size=64)):
        with pytest.raises(OutputError, match="did not write"):
            generate()
    assert [p.name for p in user.iterdir()] == ["photo.png"]
    src = generate_seaice(tmp_path / "gen", scenes=1, size=64, seed=0)
    generate_change(src, pairs=1, size=64)  # its own earlier output: replaced
    assert (src / "A").is_dir() and not (src / "image").exists()
    (src / OWNER_FILE).unlink()  # generated before output markers: GENERATED says it is generated
    generate_seaice(src, scenes=1, size=64)
    assert (src / "image").is_dir() and not (src / "A").exists()
    assert _hidden(tmp_path) == []


# --------------------------------------------------------------------------------------------- bad inputs


def _pairs(root: Path, sizes=((64, 64), (64, 64)), bands: int = 3, dtype=np.uint8) -> Path:
    (root / "image").mkdir(parents=True)
    (root / "gt").mkdir()
    for i, (h, w) in enumerate(sizes):
        write_geotiff(root / "image" / f"{i}.tif", np.ones((h, w, bands), dtype))
        write_png(root / "gt" / f"{i}.png", np.zeros((h, w), np.uint8))
    return root


def _write_truncated(path: Path, write, array: np.ndarray) -> None:
    write(path, array)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bad_missing(root: Path) -> str:
    return re.escape(str(root)) + ": dataset folder not found"


def _bad_source_is_a_file(root: Path) -> str:
    root.write_text("not a folder")
    return re.escape(str(root)) + ": is a file, not a folder; give the folder that holds the images and masks"


def _bad_empty(root: Path) -> str:
    root.mkdir()
    return re.escape(str(root)) + ": dataset folder is empty"


def _bad_layout(root: Path) -> str:
    (root / "pictures").mkdir(parents=True)
    return r"no recognised dataset layout \(found pictures/\); accepted layouts: image/\+gt/"


def _bad_image_without_mask(root: Path) -> str:
    _pairs(root)
    write_png(root / "image" / "extra.png", np.zeros((64, 64, 3), np.uint8))
    return "extra.png"


def _bad_mask_without_image(root: Path) -> str:
    _pairs(root)
    write_png(root / "gt" / "lonely.png", np.zeros((64, 64), np.uint8))
    return "lonely.png"


def _bad_too_small(root: Path) -> str:
    _pairs(root, sizes=((64, 64), (100, 70)))
    return r"0\.tif: image is 64x64 px, smaller than the tile size 128; use --tile-size 64"


def _bad_size_mismatch(root: Path) -> str:
    _pairs(root)
    write_png(root / "gt" / "1.png", np.zeros((64, 80), np.uint8))
    return r"1\.png: mask is 80x64 px but its image .*1\.tif is 64x64"


def _bad_unreadable(root: Path) -> str:
    _pairs(root)
    (root / "image" / "1.tif").write_bytes(b"not a tiff at all")
    return r"1\.tif: cannot read"


def _bad_truncated(root: Path) -> str:
    _pairs(root, sizes=((200, 200), (64, 64)))
    _write_truncated(root / "gt" / "0.png", write_png,
                     np.random.default_rng(0).integers(0, 2, (200, 200), dtype=np.uint8) * 255)
    return r"0\.png: cannot read as a raster \(.*libpng: Read Error\)"  # GDAL's cause


def _bad_truncated_tiff(root: Path) -> str:
    _pairs(root, sizes=((600, 600), (600, 600)))
    _write_truncated(root / "image" / "1.tif", write_geotiff,
                     np.random.default_rng(0).integers(0, 255, (600, 600, 3), dtype=np.uint8))
    return r"1\.tif: cannot read as a raster \(TIFFFillTile:Read error at row \d+, col \d+, tile \d+; got \d+ bytes"


def _bad_folder_named_like_a_mask(root: Path) -> str:
    _pairs(root)
    (root / "gt" / "1.png").unlink()
    (root / "gt" / "1.png").mkdir()
    return r"gt/1\.png: named like an image but is a folder, not a file; replace it with the image file or remove it"


def _bad_broken_link(root: Path) -> str:
    _pairs(root)
    (root / "gt" / "1.png").unlink()
    (root / "gt" / "1.png").symlink_to("../../elsewhere/1.png")
    return r"gt/1\.png: named like an image but is a broken link pointing at \.\./\.\./elsewhere/1\.png"


def _bad_named_pipe(root: Path) -> str:
    _pairs(root)
    (root / "image" / "1.tif").unlink()
    os.mkfifo(root / "image" / "1.tif")  # opening it would block forever
    return r"image/1\.tif: named like an image but is a named pipe"


def _bad_truncated_jpeg(root: Path) -> str:
    _pairs(root, sizes=((64, 64),))
    (root / "image" / "0.tif").unlink()
    _write_truncated(root / "image" / "0.jpg", write_jpeg,
                     np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    return r"0\.jpg: cannot read"


def _bad_values(root: Path) -> str:
    _pairs(root)
    write_png(root / "gt" / "1.png", np.full((64, 64), 7, np.uint8))
    return r"1\.png: mask values 7 are not binary"


def _bad_change_sizes(root: Path) -> str:
    for d in ("A", "B", "label"):
        (root / d).mkdir(parents=True)
    write_png(root / "A" / "p.png", np.zeros((64, 64, 3), np.uint8))
    write_png(root / "B" / "p.png", np.zeros((64, 72, 3), np.uint8))
    write_png(root / "label" / "p.png", np.zeros((64, 64), np.uint8))
    return r"B/p\.png: 72x64 px but its pair .*A/p\.png is 64x64"


def _bad_band_counts(root: Path) -> str:
    _pairs(root)
    write_geotiff(root / "image" / "1.tif", np.ones((64, 64, 4), np.uint8))
    return r"1\.tif: 4 bands but .*0\.tif has 3"


def _bad_dtypes(root: Path) -> str:
    _pairs(root)
    write_geotiff(root / "image" / "1.tif", np.ones((64, 64, 3), np.uint16))
    return r"1\.tif: pixel type uint16 but .*0\.tif is uint8"


def _bad_float(root: Path) -> str:
    _pairs(root)
    with rasterio.open(root / "image" / "0.tif", "w", driver="GTiff", height=64, width=64, count=3,
                       dtype="float32") as dst:
        dst.write(np.zeros((3, 64, 64), np.float32))
    return r"0\.tif: pixel type float32 is not supported"


def _bad_colour_mask_without_palette(root: Path) -> str:
    _pairs(root)
    write_png(root / "gt" / "1.png", np.dstack([np.zeros((64, 64), np.uint8), np.full((64, 64), 9, np.uint8),
                                               np.zeros((64, 64), np.uint8)]))
    return r"1\.png: colour mask .*--palette"


BAD = [_bad_missing, _bad_source_is_a_file, _bad_empty, _bad_layout, _bad_image_without_mask, _bad_mask_without_image, _bad_too_small,
       _bad_size_mismatch, _bad_unreadable, _bad_truncated, _bad_truncated_tiff, _bad_truncated_jpeg, _bad_values,
       _bad_change_sizes, _bad_band_counts, _bad_dtypes, _bad_float, _bad_colour_mask_without_palette,
       _bad_folder_named_like_a_mask, _bad_broken_link, _bad_named_pipe]


@pytest.mark.parametrize("make", BAD, ids=[f.__name__[5:] for f in BAD])
def test_bad_inputs(tmp_path, make):
    src = tmp_path / "src"
    expected = make(src)
    out = tmp_path / "out"
    tile = 128 if make is _bad_too_small else 64
    with pytest.raises(DataError) as exc:
        prepare_dataset(src, out, tile_size=tile, overlap=0, progress=False)
    msg = str(exc.value)
    assert "\n" not in msg and "previous exception" not in msg
    assert str(src) in msg
    assert re.search(expected, msg), msg
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_palette_files(tmp_path):
    p = tmp_path / "p.json"
    p.write_text('{"classes": [{"name": "a", "color": [1, 2]}]}')
    with pytest.raises(ConfigError, match=r"p\.json: classes\[0\]\.color"):
        load_palette(p)
    p.write_text('{"classes": [{"name": "a", "color": [1, 2, 3]}], "ignore": [[1, 2, 3]]}')
    with pytest.raises(ConfigError, match="listed twice"):
        load_palette(p)
    with pytest.raises(ConfigError, match="shipped palettes: deepglobe, dubai"):
        load_palette(tmp_path / "nope.json")
    src = generate_landcover(tmp_path / "lc", scenes=1, size=64)
    with pytest.raises(ConfigError, match="needs --palette"):
        prepare_dataset(src, tmp_path / "out", layout="palette", tile_size=64, overlap=16, progress=False)


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.bench
@pytest.mark.parametrize(
    "folder, kwargs, scenes",
    [
        ("seaice_gaofen", {}, 1),
        ("roads", {"mask_threshold": 128, "tile_size": 256, "classes": ["road"]}, 70),
        ("levir_cd", {"tile_size": 256}, 7),
        ("dubai_landcover", {"palette": "dubai", "tile_size": 256}, 54),
    ],
)
def test_real_datasets(tmp_path, folder, kwargs, scenes):
    src = SHARED / folder
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    res = prepare_dataset(src, tmp_path / "out", progress=False, **kwargs)
    assert res.num_scenes == scenes
    _check_manifest(res.out, res.stats["tile_size"], res.stats["overlap"], 3)
    classes = res.stats["class_pixels"]
    assert all(v > 0 for v in classes.values()), classes
    if folder == "dubai_landcover":
        assert res.stats["unknown_color_pixels"] == 0
        assert res.stats["ignored_pixels_by_color"]["0,0,0"] > 0
        tiles = {Path(p).parts[-3] for p in pd.read_csv(res.scenes_csv)["image"]}
        assert tiles == {f"tile_{i}" for i in range(1, 7)}
    shutil.rmtree(res.out)
