"""Deciding the classes and the mask encoding from the layout, the options and the scanned mask values."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from rsseg.data.layouts import Scene
from rsseg.data.masks import unpack_rgb
from rsseg.data.palette import Palette
from rsseg.data.scan import Scan, merge
from rsseg.errors import ConfigError, DataError
from rsseg.spec import default_colors

log = logging.getLogger("rsseg.data.prepare")  # part of the prepare command: its log lines keep that name


def _fmt_values(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:8])
    return shown + (f", ... ({len(values)} distinct values)" if len(values) > 8 else "")


def _binary_encoding(
    masks: list[Path], scan: Scan, mask_threshold: int | None, ignore_index: int, target: str
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


def _check_index(masks: list[Path], scan: Scan, k: int, ignore_index: int, what: str) -> None:
    for m in masks:
        vals = scan.mask_values[m].values.tolist()
        bad = [v for v in vals if not (0 <= v < k or v == ignore_index)]
        if bad:
            raise DataError(
                f"{m}: mask values {_fmt_values(bad)} are outside the {k} {what} (0..{k - 1}) and ignore_index "
                f"{ignore_index}; give --classes with one name per value, or fix the mask"
            )


def _sum_index_counts(masks: list[Path], scan: Scan) -> dict[int, int]:
    acc: dict[int, int] = {}
    for m in masks:
        merge(acc, scan.mask_values[m].values, scan.mask_values[m].counts)
    return acc


def _decode_counts(
    masks: list[Path], scan: Scan, encoding: str, threshold: int | None, pal: Palette | None, ignore_index: int
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


def decide_classes(
    scenes: list[Scene], layout: str, task: str, classes: list[str] | None, pal: Palette | None, scan: Scan,
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
