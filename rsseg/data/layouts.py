"""Dataset folder layouts: which one a folder is (from its folder names) and its scenes (images matched with
masks by file stem).

Layouts (auto-detected from folder names):
  pairs    image/ + gt/ (Gaofen sea ice), images/ + groundtruth/ (roads), images/ + masks/; also nested one
           level (tile_N/images + tile_N/masks). Binary (0/255, 0/1, or grey with a threshold) or index masks.
  palette  the same folders with colour masks, decoded by a palette JSON (Dubai, DeepGlobe).
  change   A/ + B/ + label/ (LEVIR-CD; a/ b/ accepted): binary change masks.
  second   im1/ + im2/ + label1/ + label2/ (SECOND / SenseEarth): semantic maps of both dates, 0 = unchanged.
           An optional change/ folder holds explicit change masks (0 unchanged, 1 or 255 changed): then the
           semantic maps may label unchanged pixels too (pseudo labels of unchanged areas, `pseudo_label`).

A layout is a collector in `_COLLECTORS` (and a rule in `detect_layout`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rsseg.data.raster import IMAGE_SUFFIXES, not_a_file
from rsseg.errors import ConfigError, DataError

_PAIR_DIRS = (("image", "gt"), ("images", "groundtruth"), ("images", "masks"))
_CHANGE_DIRS = ("A", "B", "label")
_SECOND_DIRS = ("im1", "im2", "label1", "label2")
LAYOUT_HELP = (
    "accepted layouts: image/+gt/, images/+groundtruth/ or images/+masks/ (pairs; colour masks with --palette), "
    "the same nested one level (tile_N/images + tile_N/masks), A/+B/+label/ (change, LEVIR-CD), "
    "im1/+im2/+label1/+label2/ (second, SECOND/SenseEarth)"
)


@dataclass
class Scene:
    name: str
    image: Path
    mask: Path
    image_b: Path | None = None
    mask_b: Path | None = None
    mask_change: Path | None = None  # second layout with change/: the change mask, apart from the semantic maps
    height: int = 0
    width: int = 0

    @property
    def images(self) -> list[Path]:
        return [p for p in (self.image, self.image_b) if p is not None]

    @property
    def masks(self) -> list[Path]:
        return [p for p in (self.mask, self.mask_b) if p is not None]


# ------------------------------------------------------------------------------------------------ collectors


def _pairs(source: Path, layout: str) -> list[Scene]:
    """pairs and palette: image and mask folders, at the top or nested one level (scenes named sub_stem)."""
    groups: list[tuple[str, Path, Path]] = []
    dirs = _pair_dirs(source)
    if dirs:
        groups.append(("", *dirs))
    else:
        groups += [(f"{sub.name}_", i, m) for sub, i, m in _nested_pair_dirs(source)]
    if not groups:
        raise DataError(f"{source}: layout {layout!r} needs image/+gt/, images/+groundtruth/ or images/+masks/ "
                        "(or tile_N/images + tile_N/masks); " + LAYOUT_HELP)
    scenes = []
    for prefix, img_dir, mask_dir in groups:
        for stem, (img, mask) in _match([img_dir, mask_dir]).items():
            scenes.append(Scene(prefix + stem, img, mask))
    return scenes


def _change(source: Path, layout: str) -> list[Scene]:
    dirs = _change_dirs(source)
    if not dirs:
        raise DataError(f"{source}: layout 'change' needs folders A/, B/ and label/ (or a/, b/, label/); " + LAYOUT_HELP)
    return [Scene(stem, a, lab, image_b=b) for stem, (a, b, lab) in _match(list(dirs)).items()]


def _second(source: Path, layout: str) -> list[Scene]:
    missing = [d + "/" for d in _SECOND_DIRS if not _subdir(source, d)]
    if missing:
        raise DataError(f"{source}: layout 'second' needs im1/, im2/, label1/, label2/ (missing {', '.join(missing)})")
    dirs = [_subdir(source, d) for d in _SECOND_DIRS]
    change = _subdir(source, "change")
    if change is None:
        return [Scene(stem, i1, l1, image_b=i2, mask_b=l2)
                for stem, (i1, i2, l1, l2) in _match(dirs).items()]  # type: ignore[arg-type]
    return [Scene(stem, i1, l1, image_b=i2, mask_b=l2, mask_change=c)
            for stem, (i1, i2, l1, l2, c) in _match([*dirs, change]).items()]  # type: ignore[arg-type]


# The scenes of a source folder, per layout name.
_COLLECTORS: dict[str, Callable[[Path, str], list[Scene]]] = {
    "pairs": _pairs,
    "palette": _pairs,
    "change": _change,
    "second": _second,
}
LAYOUTS = tuple(_COLLECTORS)


# ------------------------------------------------------------------------------------------------ public API


def detect_layout(source: Path, palette_given: bool = False) -> str:
    """The layout of `source` from its folder names (see the module docstring)."""
    if all(_subdir(source, d) for d in _SECOND_DIRS):
        return "second"
    if _change_dirs(source):
        return "change"
    if _pair_dirs(source) or _nested_pair_dirs(source):
        return "palette" if palette_given else "pairs"
    found = sorted(p.name + "/" for p in source.iterdir() if p.is_dir())
    raise DataError(f"{source}: no recognised dataset layout (found {', '.join(found) or 'no folders'}); {LAYOUT_HELP}")


def collect_scenes(source: Path, layout: str) -> list[Scene]:
    """Match images with masks by file stem, for one layout. Every image needs its mask and vice versa."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout {layout!r} is not one of auto, {', '.join(LAYOUTS)}")
    scenes = _COLLECTORS[layout](source, layout)
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
