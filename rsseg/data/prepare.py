"""From a labelled dataset's folder layout to a manifest: scenes.csv, tiles.csv, dataset_spec.json, stats.json.

No pixels are copied: the manifest points at the source files by absolute path and tiles are windows
(`rsseg.data.tiling`) read at training time. Every image and mask is read once here, block by block, to
check it and to count classes and band statistics.

The steps, one module each: the folder layout and its scenes (`rsseg.data.layouts`, which lists the layouts),
palettes (`rsseg.data.palette`), reading the rasters (`rsseg.data.scan`), classes and mask encodings
(`rsseg.data.classes`), the manifest and its output folder (`rsseg.data.manifest`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsseg.data.classes import decide_classes
from rsseg.data.layouts import LAYOUT_HELP, LAYOUTS, collect_scenes, detect_layout
from rsseg.data.manifest import LEGACY_OUTPUT, manifest, stats, write_output
from rsseg.data.palette import Palette, load_palette, shipped_palettes
from rsseg.data.scan import check_rasters, scan
from rsseg.data.synthetic import GENERATED_MARKER
from rsseg.errors import ConfigError, DataError
from rsseg.outputs import check_output_dir
from rsseg.spec import TASKS, DatasetSpec

log = logging.getLogger(__name__)


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
    infos = check_rasters(scenes, tile_size, overlap, bands, pal)
    first = infos[scenes[0].image]
    band_list = list(bands) if bands else list(range(1, first.count + 1))
    if nodata is None and first.nodata is not None and float(first.nodata).is_integer():
        nodata = int(first.nodata)  # the file's own nodata, so stats and training skip it

    scanned = scan(scenes, infos, band_list, first.dtype, pal, unknown_colors, ignore_index, nodata, progress)

    spec_kwargs, class_stats = decide_classes(
        scenes, layout, task, classes, pal, scanned, mask_threshold, ignore_index, marker
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
        tile_size=tile_size,
        overlap=overlap,
        **spec_kwargs,
    )

    scene_df, tile_df = manifest(scenes, tile_size, overlap, folds, val_fraction, seed)
    summary = stats(spec, layout, source, scene_df, tile_df, folds, tile_size, overlap, scanned, class_stats)
    empty = [c for c, n in summary["class_pixels"].items() if n == 0]
    if empty:
        log.warning("%s: no pixel of class(es) %s in any mask; check the classes, threshold or palette",
                    source, ", ".join(empty))
    written = write_output(out, spec, scene_df, tile_df, summary, overwrite)
    log.info(
        "prepared %s: %d scenes, %d tiles of %d px (%s) -> %s",
        spec.name, len(scene_df), len(tile_df), tile_size, ", ".join(f"{k} {v}" for k, v in summary["tiles"].items()),
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
        stats=summary,
    )


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
        raise DataError(f"{source}: dataset folder is empty; {LAYOUT_HELP}")
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
