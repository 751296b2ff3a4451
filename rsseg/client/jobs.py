"""What a client run segments: scenes (files, folders, globs) or change pairs (two files, or two
folders paired by path), each a `Job` with the path of its outputs below --out.

Outputs mirror the inputs' paths below the deepest folder they share (`a/x.tif b/x.tif` give a/x.* and
b/x.*; scenes of one folder give flat names), so two scenes never write the same name silently.
"""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from rsseg.data.raster import IMAGE_SUFFIXES
from rsseg.errors import DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    """One scene, or one change pair (before, after), and its outputs' path below --out, without suffix."""

    inputs: tuple[Path, ...]
    name: Path

    @property
    def label(self) -> str:
        return " + ".join(str(p) for p in self.inputs)

    def output(self, out: Path, kind: str) -> Path:
        return out / self.name.parent / f"{self.name.name}.{kind}"


def expand_scenes(patterns: list[str]) -> list[Path]:
    """Files, folders (their rasters) and glob patterns -> raster paths, in the order given."""
    scenes: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if _is_raster_name(p))
        elif any(c in pattern for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(pattern) if _is_raster_name(Path(p)))
        else:
            found = [path]
        if not found:
            raise DataError(f"{pattern}: no raster found; give GeoTIFF/PNG/JPEG files, a folder or a glob")
        scenes += found
    return scenes


def _is_raster_name(path: Path) -> bool:
    """A raster suffix, not hidden (temp files), not a folder (a folder named 99.png is not an image)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and not path.is_dir()


def plan_jobs(scenes: list[str], before: str | None, after: str | None,
              out: Path) -> tuple[list[Job], list[tuple[str, str]]]:
    """The jobs of a run (scenes, or --before/--after files or folders), and (file, one-line message) for
    files that cannot make one (a change folder's file without a partner): those count as failed."""
    if not before or not after:
        return scene_jobs(expand_scenes(scenes)), []
    before, after = Path(before), Path(after)
    if before.is_dir() and after.is_dir():
        return pair_folder_jobs(before, after, out)
    if before.is_dir() or after.is_dir():
        folder, other = (before, after) if before.is_dir() else (after, before)
        raise DataError(f"{folder} is a folder but {other} is not; give --before and --after two files or two "
                        "folders")
    return [Job((before, after), Path(f"{before.stem}_{after.stem}"))], []


def scene_jobs(scenes: list[Path]) -> list[Job]:
    """One job per distinct scene, named by its path below the deepest folder all scenes share."""
    unique: dict[str, Path] = {}
    for scene in scenes:
        key = os.path.abspath(scene)
        if key in unique:
            log.info("%s: given more than once, segmented once", scene)
        else:
            unique[key] = scene
    if not unique:
        return []
    # abspath, not resolve: a symlinked folder keeps the name the user sees
    common = os.path.commonpath([os.path.dirname(k) for k in unique])
    jobs, owners = [], {}
    for key, scene in unique.items():
        name = Path(os.path.relpath(key, common)).with_suffix("")
        if name in owners:
            raise DataError(f"{owners[name]} and {scene} would both write {name}.*; rename one, or segment them "
                            "into different --out folders")
        owners[name] = scene
        jobs.append(Job((scene,), name))
    return jobs


def pair_folder_jobs(before: Path, after: Path, out: Path) -> tuple[list[Job], list[tuple[str, str]]]:
    """Change pairs of two folders, matched by path below them without suffix (sub/x.tif with
    sub/x.png); files without a partner, or with two, are listed as problems."""
    found, problems = [], []
    for folder in (before, after):
        rasters, dupes = _rasters_by_key(folder, out)
        found.append(rasters)
        problems += [(str(folder / key), f"{folder / key}: {len(paths)} files ({', '.join(p.name for p in paths)}) "
                      "have this name; keep one") for key, paths in dupes.items()]
    (b, a), keys = found, sorted(found[0].keys() & found[1].keys())
    for mine, theirs, other in ((b, a, after), (a, b, before)):
        problems += [(str(mine[k]), f"{mine[k]}: no {k}.* in {other} to pair it with; add its partner or move "
                      "it out") for k in sorted(mine.keys() - theirs.keys())]
    if not keys and not problems:
        raise DataError(f"{before} and {after}: no raster found; give folders of GeoTIFF/PNG/JPEG files")
    return [Job((b[k], a[k]), Path(k)) for k in keys], problems


def _rasters_by_key(folder: Path, out: Path) -> tuple[dict[str, Path], dict[str, list[Path]]]:
    """Rasters under `folder` by path without suffix (outputs under `out` excluded), and names held by
    several files."""
    by_key: dict[str, list[Path]] = {}
    skip = os.path.abspath(out) + os.sep
    for path in sorted(folder.rglob("*")):
        if _is_raster_name(path) and not (os.path.abspath(path) + os.sep).startswith(skip):
            by_key.setdefault(path.relative_to(folder).with_suffix("").as_posix(), []).append(path)
    return ({k: v[0] for k, v in by_key.items() if len(v) == 1},
            {k: v for k, v in by_key.items() if len(v) > 1})
