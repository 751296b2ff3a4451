"""Palette files: JSON that maps mask colours to class indexes (shipped ones under palettes/)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsseg.errors import ConfigError

PALETTE_DIR = Path(__file__).parent / "palettes"


@dataclass
class Palette:
    path: Path
    names: list[str]
    colors: list[list[int]]
    entries: list[list[int]]  # [[r, g, b, class_index], ...], ignore colours -> ignore_index
    binarize: int | None = None


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


def _color(value: Any, path: Path, where: str) -> list[int]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(v, int) and 0 <= v <= 255 for v in value)
    ):
        raise ConfigError(f"{path}: {where} must be [r, g, b] with integers 0..255, got {value!r}")
    return [int(v) for v in value]
