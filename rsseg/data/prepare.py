"""From a labelled dataset's folder layout to a manifest: scenes.csv, tiles.csv, dataset_spec.json, stats.json.

No pixels are copied: the manifest points at the source files by absolute path and tiles are windows
(`rsseg.data.tiling`) read at training time. Every image and mask is read once here, block by block, to
check it and to count classes and band statistics.

Layouts (auto-detected from folder names):
  pairs    image/ + gt/ (Gaofen sea ice), images/ + groundtruth/ (roads), images/ + masks/; also nested one
           level (tile_N/images + tile_N/masks). Binary (0/255, 0/1, or grey with a threshold) or index masks.
  palette  the same folders with colour masks, decoded by a palette JSON (Dubai, DeepGlobe).
  change   A/ + B/ + label/ (LEVIR-CD; a/ b/ accepted): binary change masks.
  second   im1/ + im2/ + label1/ + label2/ (SECOND / SenseEarth): semantic maps of both dates, 0 = unchanged.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from rasterio.errors import RasterioError
from rasterio.windows import Window as RioWindow
from tqdm import tqdm

from rsseg import faults
from rsseg.data.masks import (
    binarize_rgb,
    colormap_lut,
    decode_palette,
    pack_rgb,
    unpack_rgb,
)
from rsseg.data.raster import (
    IMAGE_SUFFIXES,
    RasterInfo,
    gdal_cause,
    not_a_file,
    raster_info,
)
from rsseg.data.synthetic import GENERATED_MARKER
from rsseg.data.tiling import grid_windows
from rsseg.errors import ConfigError, DataError, UserError
from rsseg.outputs import check_output_dir, replace_output_dir
from rsseg.spec import DTYPES, TASKS, DatasetSpec, default_colors

log = logging.getLogger(__name__)

LAYOUTS = ("pairs", "palette", "change", "second")
PALETTE_DIR = Path(__file__).parent / "palettes"
SCENE_COLUMNS = ["scene", "image", "mask", "image_b", "mask_b", "height", "width", "fold", "split"]
TILE_COLUMNS = ["scene", "row", "col", "size", "fold", "split"]
# Outputs of prepare from before the owner marker (rsseg.outputs): exactly these files.
LEGACY_OUTPUT = {"prepare": {"scenes.csv", "tiles.csv", "dataset_spec.json", "stats.json"}}

_PAIR_DIRS = (("image", "gt"), ("images", "groundtruth"), ("images", "masks"))
_CHANGE_DIRS = ("A", "B", "label")
_SECOND_DIRS = ("im1", "im2", "label1", "label2")
_LAYOUT_HELP = (
    "accepted layouts: image/+gt/, images/+groundtruth/ or images/+masks/ (pairs; colour masks with --palette), "
    "the same nested one level (tile_N/images + tile_N/masks), A/+B/+label/ (change, LEVIR-CD), "
    "im1/+im2/+label1/+label2/ (second, SECOND/SenseEarth)"
)
# Blocks read at a time: bounded memory whatever the scene size.
_BLOCK = 1024
# Make damaged files fail here rather than read as garbage: GDAL 3.10's whole-image PNG fast path returns
# junk without an error for a truncated PNG, and libjpeg only warns about a truncated JPEG.
_STRICT_READS = {"GDAL_PNG_WHOLE_IMAGE_OPTIM": "NO", "GDAL_ERROR_ON_LIBJPEG_WARNING": "TRUE"}


@dataclass
class Scene:
    name: str
    image: Path
    mask: Path
    image_b: Path | None = None
    mask_b: Path | None = None
    height: int = 0
    width: int = 0

    @property
    def images(self) -> list[Path]:
        return [p for p in (self.image, self.image_b) if p is not None]

    @property
    def masks(self) -> list[Path]:
        return [p for p in (self.mask, self.mask_b) if p is not None]


@dataclass
class PreparedDataset:
    """What `prepare_dataset` wrote: the spec, the manifest paths and the counts."""

    spec: DatasetSpec
    out: Path
    layout: str
    scenes_csv: Path
    tiles_csv: Path
    spec_path: Path
    stats_path: Path
    num_scenes: int
    num_tiles: int
    scenes_per_split: dict[str, int] = field(default_factory=dict)
    tiles_per_split: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Palette:
    path: Path
    names: list[str]
    colors: list[list[int]]
    entries: list[list[int]]  # [[r, g, b, class_index], ...], ignore colours -> ignore_index
    binarize: int | None = None


# ------------------------------------------------------------------------------------------------ public API


def prepare_dataset(
    source: str | Path,
    out: str | Path,
    *,
    layout: str = "auto",
    task: str | None = None,
    name: str | None = None,
    tile_size: int = 512,
    overlap: int = 64,
    folds: int = 3,
    val_fraction: float = 0.1,
    seed: int = 0,
    classes: list[str] | None = None,
    palette: str | Path | None = None,
    unknown_colors: str = "error",
    mask_threshold: int | None = None,
    bands: list[int] | None = None,
    ignore_index: int = 255,
    nodata: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> PreparedDataset:
    """Check a labelled dataset and write its manifest to `out`: a new or empty folder, or (with
    `overwrite`) an earlier output of prepare, replaced only once everything succeeded.

    Raises DataError / ConfigError / OutputError with one line naming the file and the fix; nothing is
    left at `out`.
    """
    source = Path(source)
    out = Path(out)
    if out.is_symlink() and out.is_dir():
        out = out.resolve()  # write where the link points: a folder can replace a folder, not a link
    _check_params(layout, task, tile_size, overlap, folds, val_fraction, unknown_colors, mask_threshold,
                  ignore_index, classes)
    _check_source(source, out)
    # Before reading any pixel: a refused --out costs nothing.
    check_output_dir(out, "prepare", overwrite=overwrite, legacy=LEGACY_OUTPUT)
    marker = _read_marker(source)

    pal = load_palette(palette, ignore_index) if palette is not None else None
    if layout == "auto":
        layout = detect_layout(source, palette_given=pal is not None)
        log.info("%s: detected layout %r", source, layout)
    if layout == "palette" and pal is None:
        raise ConfigError(
            f"{source}: layout 'palette' needs --palette FILE (a JSON file, or a shipped one: {', '.join(shipped_palettes())})"
        )
    if pal is not None and mask_threshold is not None:
        raise ConfigError("--mask-threshold applies to grey masks, not colour masks; for noisy colour masks set "
                          f'"binarize" in the palette file {pal.path}')
    if pal is not None and layout == "change":
        raise ConfigError(f"{source}: layout 'change' has binary change masks; drop --palette (palettes decode "
                          "colour masks of the pairs, palette and second layouts)")
    task = _resolve_task(layout, task, classes, pal, source)

    scenes = collect_scenes(source, layout)
    infos = _check_rasters(scenes, tile_size, overlap, bands, pal)
    first = infos[scenes[0].image]
    band_list = list(bands) if bands else list(range(1, first.count + 1))
    if nodata is None and first.nodata is not None and float(first.nodata).is_integer():
        nodata = int(first.nodata)  # the file's own nodata, so stats and training skip it

    scan = _scan(scenes, infos, band_list, first.dtype, pal, unknown_colors, ignore_index, nodata, progress)

    spec_kwargs, class_stats = _decide_classes(
        scenes, layout, task, classes, pal, scan, mask_threshold, ignore_index, marker
    )
    ds_name = _dataset_name(name, marker, source)
    spec = DatasetSpec(
        name=ds_name,
        task=task,
        bands=band_list,
        dtype=first.dtype,
        ignore_index=ignore_index,
        nodata=nodata,
        generated=marker is not None,
        **spec_kwargs,
    )

    scene_df, tile_df = _manifest(scenes, tile_size, overlap, folds, val_fraction, seed)
    stats = _stats(spec, layout, source, scene_df, tile_df, folds, tile_size, overlap, scan, class_stats)
    empty = [c for c, n in stats["class_pixels"].items() if n == 0]
    if empty:
        log.warning("%s: no pixel of class(es) %s in any mask; check the classes, threshold or palette",
                    source, ", ".join(empty))
    written = _write_output(out, spec, scene_df, tile_df, stats, overwrite)
    log.info(
        "prepared %s: %d scenes, %d tiles of %d px (%s) -> %s",
        spec.name, len(scene_df), len(tile_df), tile_size, ", ".join(f"{k} {v}" for k, v in stats["tiles"].items()),
        written,
    )
    return PreparedDataset(
        spec=spec,
        out=written,
        layout=layout,
        scenes_csv=written / "scenes.csv",
        tiles_csv=written / "tiles.csv",
        spec_path=written / "dataset_spec.json",
        stats_path=written / "stats.json",
        num_scenes=len(scene_df),
        num_tiles=len(tile_df),
        scenes_per_split={s: int((scene_df["split"] == s).sum()) for s in ("train", "val")},
        tiles_per_split={s: int((tile_df["split"] == s).sum()) for s in ("train", "val")},
        stats=stats,
    )


def shipped_palettes() -> list[str]:
    return sorted(p.stem for p in PALETTE_DIR.glob("*.json"))


def load_palette(palette: str | Path, ignore_index: int = 255) -> Palette:
    """Read a palette JSON: {"classes": [{"name", "color": [r, g, b]}...], "ignore": [[r, g, b]...],
    "binarize": 128 (optional)}. A bare name ("dubai", "deepglobe") picks a shipped palette."""
    path = Path(palette)
    if not path.exists() and str(palette) in shipped_palettes():
        path = PALETTE_DIR / f"{palette}.json"
    if not path.is_file():
        raise ConfigError(
            f"{palette}: palette file not found; give a JSON file or one of the shipped palettes: {', '.join(shipped_palettes())}"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the palette file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: palette is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    example = '{"classes": [{"name": "water", "color": [226, 169, 41]}, ...], "ignore": [[0, 0, 0]]}'
    if not isinstance(data, dict) or not isinstance(data.get("classes"), list) or not data["classes"]:
        raise ConfigError(f"{path}: palette needs a non-empty \"classes\" list, e.g. {example}")
    names: list[str] = []
    colors: list[list[int]] = []
    for i, entry in enumerate(data["classes"]):
        if not isinstance(entry, dict) or "name" not in entry or "color" not in entry:
            raise ConfigError(f"{path}: classes[{i}] needs \"name\" and \"color\", e.g. {example}")
        names.append(str(entry["name"]))
        colors.append(_color(entry["color"], path, f"classes[{i}].color"))
    ignore = [_color(c, path, f"ignore[{i}]") for i, c in enumerate(data.get("ignore", []))]
    binarize = data.get("binarize")
    if binarize is not None:
        if not isinstance(binarize, int) or not 1 <= binarize <= 255:
            raise ConfigError(f"{path}: \"binarize\" must be an integer 1..255 (the per-channel threshold), got {binarize!r}")
        bad = [c for c in colors + ignore if any(v not in (0, 255) for v in c)]
        if bad:
            raise ConfigError(f"{path}: with \"binarize\" every colour must have channels 0 or 255, got {tuple(bad[0])}")
    if len(names) > 255 or len(names) > ignore_index:
        raise ConfigError(f"{path}: {len(names)} classes do not fit below ignore_index {ignore_index}")
    seen: dict[tuple[int, ...], str] = {}
    for label, c in [(n, c) for n, c in zip(names, colors)] + [("ignore", c) for c in ignore]:
        if tuple(c) in seen:
            raise ConfigError(f"{path}: colour {tuple(c)} is listed twice ({seen[tuple(c)]} and {label}); keep one")
        seen[tuple(c)] = label
    entries = [[*c, i] for i, c in enumerate(colors)] + [[*c, ignore_index] for c in ignore]
    return Palette(path=path.resolve(), names=names, colors=colors, entries=entries, binarize=binarize)


def detect_layout(source: Path, palette_given: bool = False) -> str:
    """The layout of `source` from its folder names (see the module docstring)."""
    if all(_subdir(source, d) for d in _SECOND_DIRS):
        return "second"
    if _change_dirs(source):
        return "change"
    if _pair_dirs(source) or _nested_pair_dirs(source):
        return "palette" if palette_given else "pairs"
    found = sorted(p.name + "/" for p in source.iterdir() if p.is_dir())
    raise DataError(f"{source}: no recognised dataset layout (found {', '.join(found) or 'no folders'}); {_LAYOUT_HELP}")


def collect_scenes(source: Path, layout: str) -> list[Scene]:
    """Match images with masks by file stem, for one layout. Every image needs its mask and vice versa."""
    if layout in ("pairs", "palette"):
        groups: list[tuple[str, Path, Path]] = []
        dirs = _pair_dirs(source)
        if dirs:
            groups.append(("", *dirs))
        else:
            groups += [(f"{sub.name}_", i, m) for sub, i, m in _nested_pair_dirs(source)]
        if not groups:
            raise DataError(f"{source}: layout {layout!r} needs image/+gt/, images/+groundtruth/ or images/+masks/ "
                            "(or tile_N/images + tile_N/masks); " + _LAYOUT_HELP)
        scenes = []
        for prefix, img_dir, mask_dir in groups:
            for stem, (img, mask) in _match([img_dir, mask_dir]).items():
                scenes.append(Scene(prefix + stem, img, mask))
    elif layout == "change":
        dirs = _change_dirs(source)
        if not dirs:
            raise DataError(f"{source}: layout 'change' needs folders A/, B/ and label/ (or a/, b/, label/); " + _LAYOUT_HELP)
        scenes = [Scene(stem, a, lab, image_b=b) for stem, (a, b, lab) in _match(list(dirs)).items()]
    elif layout == "second":
        missing = [d + "/" for d in _SECOND_DIRS if not _subdir(source, d)]
        if missing:
            raise DataError(f"{source}: layout 'second' needs im1/, im2/, label1/, label2/ (missing {', '.join(missing)})")
        dirs = [_subdir(source, d) for d in _SECOND_DIRS]
        scenes = [Scene(stem, i1, l1, image_b=i2, mask_b=l2)
                  for stem, (i1, i2, l1, l2) in _match(dirs).items()]  # type: ignore[arg-type]
    else:
        raise ConfigError(f"layout {layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    names = [s.name for s in scenes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"{source}: scene name {dupes[0]!r} occurs twice; rename one of the files")
    return sorted(scenes, key=lambda s: s.name)


# --------------------------------------------------------------------------------------------- folder layout


def _subdir(folder: Path, name: str) -> Path | None:
    """Child folder `name`, exact case first, then any case (LEVIR copies use a/ b/)."""
    exact = folder / name
    if exact.is_dir():
        return exact
    matches = [p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name.lower()]
    return matches[0] if len(matches) == 1 else None


def _pair_dirs(folder: Path) -> tuple[Path, Path] | None:
    for img, mask in _PAIR_DIRS:
        i, m = _subdir(folder, img), _subdir(folder, mask)
        if i and m:
            return i, m
    return None


def _nested_pair_dirs(folder: Path) -> list[tuple[Path, Path, Path]]:
    found = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        dirs = _pair_dirs(sub)
        if dirs:
            found.append((sub, *dirs))
    return found


def _change_dirs(folder: Path) -> tuple[Path, Path, Path] | None:
    dirs = [_subdir(folder, d) for d in _CHANGE_DIRS]
    return (dirs[0], dirs[1], dirs[2]) if all(dirs) else None  # type: ignore[return-value]


def _by_stem(folder: Path) -> dict[str, Path]:
    try:
        entries = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror}); check its permissions") from None
    files = [f for f in entries if not f.name.startswith(".")]  # skip ._x.png (macOS) and the like
    for f in files:
        what = not_a_file(f)
        if what:  # not silently skipped: its pair would then be reported as missing a mask
            raise DataError(f"{f}: named like an image but is {what}; replace it with the image file or "
                            "remove it")
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}); put the files there or fix the path")
    by_stem: dict[str, Path] = {}
    for f in files:
        if f.stem in by_stem:
            raise DataError(f"{f}: same name as {by_stem[f.stem].name} in {folder}; keep one file per scene")
        by_stem[f.stem] = f
    return by_stem


def _match(dirs: list[Path]) -> dict[str, tuple[Path, ...]]:
    """{stem: (file in dirs[0], file in dirs[1], ...)}; a stem missing from any folder is an error."""
    listed = [_by_stem(d) for d in dirs]
    stems = set().union(*listed)
    for d, files in zip(dirs, listed):
        missing = sorted(stems - set(files))
        if missing:
            stem = missing[0]
            have = next(lst[stem] for lst in listed if stem in lst)
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(
                f"{have}: no file named {stem}.* in {d}{more}; add the matching file or remove this one"
            )
    return {stem: tuple(lst[stem] for lst in listed) for stem in sorted(stems)}


# ------------------------------------------------------------------------------------------------ checking


def _check_params(
    layout: str, task: str | None, tile_size: int, overlap: int, folds: int, val_fraction: float,
    unknown_colors: str, mask_threshold: int | None, ignore_index: int, classes: list[str] | None,
) -> None:
    if layout != "auto" and layout not in LAYOUTS:
        raise ConfigError(f"--layout {layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    if task is not None and task not in TASKS:
        raise ConfigError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    if tile_size < 1:
        raise ConfigError(f"--tile-size must be positive, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ConfigError(f"--overlap must be in [0, tile size {tile_size}), got {overlap}")
    if tile_size % 32:
        log.warning("tile size %d is not a multiple of 32; most models need multiples of their stride (32)", tile_size)
    if folds < 1:
        raise ConfigError(f"--folds must be >= 1, got {folds}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if unknown_colors not in ("error", "ignore"):
        raise ConfigError(f"--unknown-colors must be 'error' or 'ignore', got {unknown_colors!r}")
    if mask_threshold is not None and not 1 <= mask_threshold <= 65535:
        raise ConfigError(f"--mask-threshold must be in 1..65535, got {mask_threshold}")
    if not 0 <= ignore_index <= 255:
        raise ConfigError(f"--ignore-index must be in 0..255 (masks decode to uint8), got {ignore_index}")
    if classes is not None and (len(classes) == 0 or len(set(classes)) != len(classes)):
        raise ConfigError(f"--classes must be distinct names, got {classes}")


def _check_source(source: Path, out: Path) -> None:
    if source.exists() and not source.is_dir():
        raise DataError(f"{source}: is a file, not a folder; give the folder that holds the images and masks")
    if not source.is_dir():
        raise DataError(f"{source}: dataset folder not found; give the folder that holds the images and masks")
    try:
        empty = not any(source.iterdir())
    except OSError as exc:
        raise DataError(f"{source}: cannot list the dataset folder ({exc.strerror}); check its permissions") from None
    if empty:
        raise DataError(f"{source}: dataset folder is empty; {_LAYOUT_HELP}")
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents:
        raise ConfigError(f"{out}: the output folder must not be the dataset folder or contain it (it is replaced)")


def _read_marker(source: Path) -> dict[str, Any] | None:
    path = source / GENERATED_MARKER
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        data = {}
    return data if isinstance(data, dict) else {}


def _dataset_name(name: str | None, marker: dict[str, Any] | None, source: Path) -> str:
    default = source.resolve().name
    if marker is None:
        return name or default
    # Generated data always says so in its name, so its results are never mistaken for real ones.
    chosen = name or marker.get("name") or default
    return chosen if chosen.startswith("generated-") else f"generated-{chosen}"


def _resolve_task(layout: str, task: str | None, classes: list[str] | None, pal: Palette | None, source: Path) -> str:
    if layout in ("change", "second"):
        if task not in (None, "change"):
            raise ConfigError(f"{source}: layout {layout!r} holds change pairs; use --task change (or leave it out)")
        return "change"
    if task == "change":
        raise ConfigError(f"{source}: --task change needs A/+B/+label/ or im1/+im2/+label1/+label2/ folders; "
                          f"this is a {layout!r} layout")
    if task is not None:
        return task
    n = len(pal.names) if pal is not None else len(classes or [])
    return "multiclass" if n > 2 else "binary"


def _open_error(path: Path, exc: BaseException) -> DataError:
    return DataError(f"{path}: cannot read as a raster ({gdal_cause(exc)}); check the file is a complete image")


def _info(path: Path) -> RasterInfo:
    try:
        return raster_info(path)
    except UserError:
        raise
    except (RasterioError, OSError) as exc:
        raise _open_error(path, exc) from None


def _check_rasters(
    scenes: list[Scene], tile_size: int, overlap: int, bands: list[int] | None, pal: Palette | None
) -> dict[Path, RasterInfo]:
    """Header checks of every file (cheap): readable, dtypes, band counts, sizes, tile fits."""
    infos: dict[Path, RasterInfo] = {}
    first: RasterInfo | None = None
    for scene in scenes:
        for img in scene.images:
            info = infos[img] = _info(img)
            if info.dtype not in DTYPES:
                raise DataError(f"{img}: pixel type {info.dtype} is not supported; convert the images to uint8 or "
                                "uint16 (e.g. gdal_translate -ot UInt16 -scale)")
            if first is None:
                first = info
                if bands:
                    bad = [b for b in bands if not 1 <= b <= info.count]
                    if bad:
                        raise ConfigError(f"--bands {bands}: band {bad[0]} does not exist; {img} has bands 1..{info.count}")
            elif info.count != first.count:
                raise DataError(f"{img}: {info.count} bands but {first.path} has {first.count}; all images of a "
                                "dataset need the same bands")
            elif info.dtype != first.dtype:
                raise DataError(f"{img}: pixel type {info.dtype} but {first.path} is {first.dtype}; convert the "
                                "images to one type")
        a = infos[scene.image]
        if scene.image_b is not None:
            b = infos[scene.image_b]
            if (b.height, b.width) != (a.height, a.width):
                raise DataError(f"{scene.image_b}: {b.width}x{b.height} px but its pair {scene.image} is "
                                f"{a.width}x{a.height}; both dates of a change pair need the same size")
        for mask in scene.masks:
            info = infos[mask] = _info(mask)
            if (info.height, info.width) != (a.height, a.width):
                raise DataError(f"{mask}: mask is {info.width}x{info.height} px but its image {scene.image} is "
                                f"{a.width}x{a.height}; masks must match their image pixel for pixel")
            if pal is not None and info.count < 3 and not _has_colormap(mask):
                raise DataError(f"{mask}: {info.count} band(s) without a colour table, but the palette "
                                f"{pal.path.name} decodes RGB colour masks; drop --palette for index or binary masks")
            if not np.issubdtype(np.dtype(info.dtype), np.integer):
                raise DataError(f"{mask}: mask pixel type {info.dtype}; masks must hold integer class values")
        scene.height, scene.width = a.height, a.width
    smallest = min(scenes, key=lambda s: min(s.height, s.width))
    side = min(smallest.height, smallest.width)
    if side < tile_size:
        fit = side // 32 * 32 or side
        hint = f" (and --overlap below {fit})" if overlap >= fit else ""
        raise DataError(f"{smallest.image}: image is {smallest.width}x{smallest.height} px, smaller than the tile size "
                        f"{tile_size}; use --tile-size {fit}{hint}")
    return infos


# -------------------------------------------------------------------------------------------------- reading


def _has_colormap(path: Path) -> bool:
    try:
        with rasterio.open(path) as src:
            return colormap_lut(src) is not None
    except (RasterioError, OSError) as exc:
        raise _open_error(path, exc) from None


def _blocks(height: int, width: int, block: int | None = None) -> Iterator[RioWindow]:
    block = block or _BLOCK
    for row in range(0, height, block):
        for col in range(0, width, block):
            yield RioWindow(col, row, min(block, width - col), min(block, height - row))


@dataclass
class _MaskValues:
    """Distinct raw values of one mask with their pixel counts (grey/index masks)."""

    values: np.ndarray
    counts: np.ndarray

    def as_dict(self) -> dict[int, int]:
        return {int(v): int(c) for v, c in zip(self.values, self.counts)}


@dataclass
class _Scan:
    band_hist: np.ndarray  # (bands, 256 | 65536) pixel counts per value
    mask_values: dict[Path, _MaskValues] = field(default_factory=dict)  # grey/index masks
    palette_counts: dict[Path, np.ndarray] = field(default_factory=dict)  # colour masks: decoded class bincount
    unknown_colors: dict[int, int] = field(default_factory=dict)  # packed rgb -> pixels
    ignore_colors: dict[int, int] = field(default_factory=dict)  # palette "ignore" colours (packed) -> pixels
    second_mismatch: int = 0  # pixels unchanged in one date's map but not the other's


def _hist(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if values.dtype in (np.uint8, np.uint16):
        counts = np.bincount(values.ravel(), minlength=256)
        nz = np.flatnonzero(counts)
        return nz, counts[nz]
    return np.unique(values, return_counts=True)


def _merge(acc: dict[int, int], values: np.ndarray, counts: np.ndarray) -> None:
    for v, c in zip(values.tolist(), counts.tolist()):
        acc[v] = acc.get(v, 0) + c


def _scan(
    scenes: list[Scene], infos: dict[Path, RasterInfo], bands: list[int], dtype: str, pal: Palette | None,
    unknown_colors: str, ignore_index: int, nodata: int | None, progress: bool,
) -> _Scan:
    """Read every image and mask once, block by block: band histograms, mask values, palette decoding."""
    nvalues = 256 if dtype == "uint8" else 65536
    scan = _Scan(band_hist=np.zeros((len(bands), nvalues), dtype=np.int64))
    with rasterio.Env(**_STRICT_READS):
        for scene in tqdm(scenes, desc="prepare", unit="scene", disable=not progress, file=sys.stderr):
            for img in scene.images:
                for data, _win in _read_blocks(img, bands, scene):
                    for i in range(len(bands)):
                        scan.band_hist[i] += np.bincount(data[i].ravel(), minlength=nvalues)
            _scan_masks(scene, infos, pal, unknown_colors, ignore_index, scan)
            faults.point("prepare-scanning")
    if nodata is not None and 0 <= nodata < nvalues:
        scan.band_hist[:, nodata] = 0  # nodata pixels are not part of the imagery's statistics
    return scan


def _read_blocks(path: Path, bands: list[int], scene: Scene) -> Iterator[tuple[np.ndarray, RioWindow]]:
    try:
        with rasterio.open(path) as src:
            for win in _blocks(scene.height, scene.width):
                yield src.read(bands, window=win), win
    except (RasterioError, OSError) as exc:
        raise _open_error(path, exc) from None


def _scan_masks(
    scene: Scene, infos: dict[Path, RasterInfo], pal: Palette | None, unknown_colors: str, ignore_index: int,
    scan: _Scan,
) -> None:
    masks = scene.masks
    acc: list[dict[int, int]] = [{} for _ in masks]
    pal_counts = [np.zeros(256, dtype=np.int64) for _ in masks]
    unknown = [0 for _ in masks]
    unknown_example: list[int | None] = [None for _ in masks]
    with ExitStack() as stack:
        srcs = []
        for m in masks:
            try:
                srcs.append(stack.enter_context(rasterio.open(m)))
            except (RasterioError, OSError) as exc:
                raise _open_error(m, exc) from None
        # Colour-table masks are expanded to RGB for the palette (as `read_mask` does at training time).
        luts = [colormap_lut(src) if pal is not None else None for src in srcs]
        ignore_keys = [int(pack_rgb(np.array(e[:3]))) for e in pal.entries if e[3] == ignore_index] if pal else []
        for win in _blocks(scene.height, scene.width):
            zero_maps = []
            for k, (mask, src) in enumerate(zip(masks, srcs)):
                count = infos[mask].count
                try:
                    data = src.read([1, 2, 3] if count >= 3 else [1], window=win)
                except (RasterioError, OSError) as exc:
                    raise _open_error(mask, exc) from None
                if pal is not None:
                    lut = luts[k]
                    rgb_all = lut[data[0]] if lut is not None else np.moveaxis(data, 0, -1)
                    classes, unk = decode_palette(rgb_all, pal.entries, ignore_index, pal.binarize)
                    pal_counts[k] += np.bincount(classes.ravel(), minlength=256)
                    if ignore_keys:
                        packed_all = pack_rgb(binarize_rgb(rgb_all, pal.binarize) if pal.binarize else rgb_all)
                        for key in ignore_keys:
                            scan.ignore_colors[key] = scan.ignore_colors.get(key, 0) + int(
                                np.count_nonzero(packed_all == key))
                    n_unk = int(unk.sum())
                    if n_unk:
                        rgb = rgb_all[unk]
                        packed = (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2]
                        vals, cnts = np.unique(packed, return_counts=True)
                        _merge(scan.unknown_colors, vals, cnts)
                        unknown[k] += n_unk
                        if unknown_example[k] is None:
                            unknown_example[k] = int(vals[np.argmax(cnts)])
                    zero_maps.append(classes == 0)
                else:
                    if count >= 3 and not (np.array_equal(data[0], data[1]) and np.array_equal(data[0], data[2])):
                        raise DataError(f"{mask}: colour mask (its RGB bands differ); give --palette FILE to decode "
                                        f"colours to classes (shipped: {', '.join(shipped_palettes())})")
                    _merge(acc[k], *_hist(data[0]))
                    zero_maps.append(data[0] == 0)
            if len(zero_maps) == 2 and scene.mask_b is not None:
                scan.second_mismatch += int(np.count_nonzero(zero_maps[0] != zero_maps[1]))
    for k, mask in enumerate(masks):
        if pal is not None:
            scan.palette_counts[mask] = pal_counts[k]
            if unknown[k] and unknown_colors == "error":
                r, g, b = unpack_rgb(unknown_example[k] or 0)
                raise DataError(
                    f"{mask}: {unknown[k]} pixels have colours not in the palette {pal.path.name} (e.g. ({r}, {g}, {b})); "
                    "add the colour to the palette (under \"classes\" or \"ignore\") or give --unknown-colors ignore"
                )
        else:
            items = sorted(acc[k].items())
            scan.mask_values[mask] = _MaskValues(
                np.array([v for v, _ in items], dtype=np.int64), np.array([c for _, c in items], dtype=np.int64)
            )


# ------------------------------------------------------------------------------------------------- classes


def _fmt_values(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:8])
    return shown + (f", ... ({len(values)} distinct values)" if len(values) > 8 else "")


def _binary_encoding(
    masks: list[Path], scan: _Scan, mask_threshold: int | None, ignore_index: int, target: str
) -> str:
    """binary255 (values in {0, 255}), index (values in {0, 1} or ignore) or threshold (grey masks, when given)."""
    if mask_threshold is not None:
        return "threshold"
    sets = {m: set(scan.mask_values[m].values.tolist()) for m in masks}
    union: set[int] = set().union(*sets.values())
    if union <= {0, 255}:
        return "binary255"
    if union <= {0, 1, ignore_index}:
        if ignore_index in union:
            log.warning("masks hold 0, 1 and %d: reading them as class indexes with %d = ignore", ignore_index,
                        ignore_index)
        return "index"
    for m in masks:
        bad = sorted(sets[m] - {0, 255}) if not sets[m] <= {0, 1, ignore_index} else []
        if bad:
            raise DataError(
                f"{m}: mask values {_fmt_values(bad)} are not binary (0/255 or 0/1); for grey or anti-aliased masks "
                f"give --mask-threshold 128 (value >= 128 -> {target}); for multiclass index masks give --classes "
                "with one name per value"
            )
    a = next(m for m in masks if 255 in sets[m])
    b = next(m for m in masks if 1 in sets[m])
    raise DataError(f"{a}: 0/255 mask while {b} is 0/1; make all masks use one encoding")


def _check_index(masks: list[Path], scan: _Scan, k: int, ignore_index: int, what: str) -> None:
    for m in masks:
        vals = scan.mask_values[m].values.tolist()
        bad = [v for v in vals if not (0 <= v < k or v == ignore_index)]
        if bad:
            raise DataError(
                f"{m}: mask values {_fmt_values(bad)} are outside the {k} {what} (0..{k - 1}) and ignore_index "
                f"{ignore_index}; give --classes with one name per value, or fix the mask"
            )


def _sum_index_counts(masks: list[Path], scan: _Scan) -> dict[int, int]:
    acc: dict[int, int] = {}
    for m in masks:
        _merge(acc, scan.mask_values[m].values, scan.mask_values[m].counts)
    return acc


def _decode_counts(
    masks: list[Path], scan: _Scan, encoding: str, threshold: int | None, pal: Palette | None, ignore_index: int
) -> np.ndarray:
    """Pixels per decoded class index (256 bins), exactly what `decode_mask` gives, from the scan."""
    counts = np.zeros(256, dtype=np.int64)
    if pal is not None:
        for m in masks:
            counts += scan.palette_counts[m]
        return counts
    for v, c in _sum_index_counts(masks, scan).items():
        if encoding == "threshold":
            counts[int(v >= (threshold or 0))] += c
        elif encoding == "binary255":
            counts[1 if v == 255 else 0 if v == 0 else ignore_index] += c
        else:
            counts[v if 0 <= v <= 255 else ignore_index] += c
    return counts


def _named(counts: np.ndarray, names: list[str]) -> dict[str, int]:
    return {n: int(counts[i]) for i, n in enumerate(names)}


def _decide_classes(
    scenes: list[Scene], layout: str, task: str, classes: list[str] | None, pal: Palette | None, scan: _Scan,
    mask_threshold: int | None, ignore_index: int, marker: dict[str, Any] | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Spec fields about classes and the class statistics, for the layout and the masks' values."""
    masks_a = [s.mask for s in scenes]
    kw: dict[str, Any] = {}
    st: dict[str, Any] = {}
    marker_classes = (marker or {}).get("classes")

    if layout == "second":
        masks_b = [s.mask_b for s in scenes if s.mask_b is not None]
        if pal is not None:
            names = _override_names(pal.names, classes, pal.path)
            colors = pal.colors
            kw.update(mask_encoding="palette", palette=pal.entries, mask_threshold=pal.binarize)
        else:
            union = set(_sum_index_counts(masks_a + masks_b, scan)) - {ignore_index}
            k = len(classes) if classes else (max(union) + 1 if union else 2)
            if k < 2:
                raise ConfigError(f"--classes {classes}: semantic change needs 'unchanged' plus at least one class")
            _check_index(masks_a + masks_b, scan, k, ignore_index, "semantic classes")
            if classes:
                names = list(classes)
            elif marker_classes and len(marker_classes) == k:
                names = list(marker_classes)
            else:
                names = ["unchanged"] + [f"class_{i}" for i in range(1, k)]
            colors = default_colors(k)
            kw.update(mask_encoding="index")
        kw.update(classes=["no_change", "change"], colors=default_colors(2), semantic_classes=names,
                  semantic_colors=colors)
        ca = _decode_counts(masks_a, scan, kw["mask_encoding"], None, pal, ignore_index)
        cb = _decode_counts(masks_b, scan, kw["mask_encoding"], None, pal, ignore_index)
        st["class_pixels"] = {"no_change": int(ca[0]), "change": int(ca[1:len(names)].sum())}
        st["ignored_pixels"] = int(ca[ignore_index])
        # Semantic heads learn on changed pixels only: counts of classes 1..K-1 of each date.
        st["semantic_a_pixels"] = {n: int(ca[i]) for i, n in enumerate(names) if i > 0}
        st["semantic_b_pixels"] = {n: int(cb[i]) for i, n in enumerate(names) if i > 0}
        st["semantic_b_ignored_pixels"] = int(cb[ignore_index])
        st["unchanged_mismatch_pixels"] = scan.second_mismatch
        if scan.second_mismatch:
            log.warning("%d pixels are unchanged (0) in one date's label map but not the other's; change follows "
                        "label1", scan.second_mismatch)
        return kw, st

    if pal is not None:
        names = _override_names(pal.names, classes, pal.path)
        if task == "binary" and len(names) != 2:
            raise ConfigError(f"{pal.path}: --task binary needs 2 palette classes, the palette has {len(names)}")
        kw.update(classes=names, colors=pal.colors, mask_encoding="palette", palette=pal.entries,
                  mask_threshold=pal.binarize)
        counts = _decode_counts(masks_a, scan, "palette", None, pal, ignore_index)
        st["class_pixels"] = _named(counts, names)
        st["ignored_pixels"] = int(counts[ignore_index])
        st["ignored_pixels_by_color"] = {
            ",".join(str(c) for c in unpack_rgb(k)): n for k, n in sorted(scan.ignore_colors.items())
        }
        unknown = sorted(scan.unknown_colors.items(), key=lambda kv: -kv[1])
        st["unknown_color_pixels"] = int(sum(c for _, c in unknown))
        st["unknown_colors"] = [[list(unpack_rgb(v)), int(c)] for v, c in unknown[:20]]
        if unknown:
            log.warning("%d pixels have colours not in the palette (mapped to ignore); most common: %s",
                        st["unknown_color_pixels"], ", ".join(str(unpack_rgb(v)) for v, _ in unknown[:5]))
        return kw, st

    if layout == "change":
        names = _binary_names(classes, ["no_change", "change"], None)
        enc = _binary_encoding(masks_a, scan, mask_threshold, ignore_index, names[1])
    elif task == "binary":
        names = _binary_names(classes, ["background", "target"], marker_classes)
        enc = _binary_encoding(masks_a, scan, mask_threshold, ignore_index, names[1])
    else:  # multiclass index masks
        if mask_threshold is not None:
            raise ConfigError("--mask-threshold is for binary grey masks; multiclass masks hold class indices")
        union = set(_sum_index_counts(masks_a, scan)) - {ignore_index}
        k = len(classes) if classes else (max(union) + 1 if union else 2)
        _check_index(masks_a, scan, k, ignore_index, "classes")
        if classes:
            names = list(classes)
        elif marker_classes and len(marker_classes) == k:
            names = list(marker_classes)
        else:
            names = [f"class_{i}" for i in range(k)]
        enc = "index"
    if enc == "index":
        _check_index(masks_a, scan, len(names), ignore_index, "classes")
    kw.update(classes=names, colors=default_colors(len(names)), mask_encoding=enc,
              mask_threshold=mask_threshold if enc == "threshold" else None)
    counts = _decode_counts(masks_a, scan, enc, mask_threshold, None, ignore_index)
    st["class_pixels"] = _named(counts, names)
    st["ignored_pixels"] = int(counts[ignore_index])
    st["mask_values"] = {str(v): c for v, c in sorted(_sum_index_counts(masks_a, scan).items())[:300]}
    return kw, st


def _binary_names(classes: list[str] | None, default: list[str], marker_classes: list[str] | None) -> list[str]:
    if classes is None:
        return list(marker_classes) if marker_classes and len(marker_classes) == 2 else list(default)
    if len(classes) == 1:  # just the target's name
        return [default[0], classes[0]]
    if len(classes) == 2:
        return list(classes)
    raise ConfigError(f"--classes {classes}: binary masks need 2 names (background, target); for more classes "
                      "use index masks with --task multiclass")


def _override_names(names: list[str], classes: list[str] | None, path: Path) -> list[str]:
    if classes is None:
        return list(names)
    if len(classes) != len(names):
        raise ConfigError(f"--classes gives {len(classes)} names but the palette {path} has {len(names)} classes")
    return list(classes)


# ------------------------------------------------------------------------------------------------ manifest


def _manifest(
    scenes: list[Scene], tile_size: int, overlap: int, folds: int, val_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scene-level folds and split (no scene's tiles on both sides), then the tile windows of each scene."""
    n = len(scenes)
    rng = np.random.default_rng(seed)
    fold = np.empty(n, dtype=np.int64)
    fold[rng.permutation(n)] = np.arange(n) % folds  # round-robin over a seeded shuffle
    n_val = 0
    if n >= 2 and val_fraction > 0:
        n_val = min(n - 1, max(1, round(n * val_fraction)))
    split = np.full(n, "train", dtype=object)
    split[rng.permutation(n)[:n_val]] = "val"
    if n_val == 0:
        log.warning("no validation scene (%d scene(s), val fraction %s): validate on the folds or add scenes",
                    n, val_fraction)
    if n < folds:
        log.warning("%d scenes for %d folds: some folds are empty", n, folds)
    scene_rows = []
    tile_rows = []
    for i, s in enumerate(scenes):
        scene_rows.append({
            "scene": s.name,
            "image": str(s.image.resolve()),
            "mask": str(s.mask.resolve()),
            "image_b": str(s.image_b.resolve()) if s.image_b else "",
            "mask_b": str(s.mask_b.resolve()) if s.mask_b else "",
            "height": s.height,
            "width": s.width,
            "fold": int(fold[i]),
            "split": split[i],
        })
        for w in grid_windows(s.height, s.width, tile_size, overlap):
            tile_rows.append((s.name, w.row, w.col, tile_size, int(fold[i]), split[i]))
    return pd.DataFrame(scene_rows, columns=SCENE_COLUMNS), pd.DataFrame(tile_rows, columns=TILE_COLUMNS)


def _band_stats(hist: np.ndarray) -> dict[str, list[float | int | None]]:
    values = np.arange(hist.shape[1], dtype=np.float64)
    out: dict[str, list[Any]] = {k: [] for k in ("mean", "std", "min", "max", "p1", "p99", "pixels")}
    for h in hist:
        n = int(h.sum())
        out["pixels"].append(n)
        if n == 0:
            for k in ("mean", "std", "min", "max", "p1", "p99"):
                out[k].append(None)
            continue
        hf = h.astype(np.float64)
        mean = float((hf * values).sum() / n)
        var = float((hf * (values - mean) ** 2).sum() / n)
        nz = np.flatnonzero(h)
        cdf = np.cumsum(h)
        out["mean"].append(round(mean, 4))
        out["std"].append(round(var**0.5, 4))
        out["min"].append(int(nz[0]))
        out["max"].append(int(nz[-1]))
        out["p1"].append(int(np.searchsorted(cdf, 0.01 * n)))
        out["p99"].append(int(np.searchsorted(cdf, 0.99 * n)))
    return out


def _stats(
    spec: DatasetSpec, layout: str, source: Path, scene_df: pd.DataFrame, tile_df: pd.DataFrame, folds: int,
    tile_size: int, overlap: int, scan: _Scan, class_stats: dict[str, Any],
) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "name": spec.name,
        "layout": layout,
        "source": str(source.resolve()),
        "task": spec.task,
        "tile_size": tile_size,
        "overlap": overlap,
        **class_stats,
        "bands": {"index": spec.bands, **_band_stats(scan.band_hist)},
        "scenes": {"total": len(scene_df), **{s: int((scene_df["split"] == s).sum()) for s in ("train", "val")}},
        "tiles": {"total": len(tile_df), **{s: int((tile_df["split"] == s).sum()) for s in ("train", "val")}},
        "folds": {
            str(f): {"scenes": int((scene_df["fold"] == f).sum()), "tiles": int((tile_df["fold"] == f).sum())}
            for f in range(folds)
        },
    }
    return stats


def _write_output(
    out: Path, spec: DatasetSpec, scene_df: pd.DataFrame, tile_df: pd.DataFrame, stats: dict[str, Any],
    overwrite: bool,
) -> Path:
    """Write into a temp folder beside `out`, then swap it in: `out` is never half-written."""

    def fill(tmp: Path) -> None:
        scene_df.to_csv(tmp / "scenes.csv", index=False)
        tile_df.to_csv(tmp / "tiles.csv", index=False)
        spec.save(tmp / "dataset_spec.json")
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        faults.point("prepare-filled")

    try:
        return replace_output_dir(out, fill, command="prepare", overwrite=overwrite, legacy=LEGACY_OUTPUT)
    except OSError as exc:  # disk full, a folder made read-only meanwhile: the temp folder is already gone
        raise DataError(f"{out}: cannot write the manifest ({exc.strerror or exc}); check free space and "
                        "permissions, or give another --out (nothing was changed)") from None


def _color(value: Any, path: Path, where: str) -> list[int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(v, int) and 0 <= v <= 255 for v in value)
    ):
        raise ConfigError(f"{path}: {where} must be [r, g, b] with integers 0..255, got {value!r}")
    return [int(v) for v in value]
