"""`audit`: where does a model disagree most with a dataset's labels? The land-cover seed removed training
samples whose predicted mIoU was very poor, because their labels were noisy. Each scene of the chosen split
goes through the served tiling (as `evaluate` scores it); every prepared tile of the scene is then scored on
its own (the task's headline metric over the tile's pixels), and so is the scene. The audit writes, in `out`:

- tiles.csv: every tile (scene, row, col, size, split), its metric, its labelled share, and whether it is
  excluded, worst first;
- scenes.csv: the same per scene;
- worst_tiles.png: the worst tiles as image / label / prediction;
- exclude.csv: the tiles to leave out (the worst `exclude_share`, or those below `exclude_below`), the file
  `train -P exclude=` reads.

Tiles whose metric is undefined (nothing to find in the label nor in the prediction) are never excluded.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rsseg import tracking
from rsseg.config import AuditConfig
from rsseg.data.datasets import PreparedData
from rsseg.data.exclusions import KEY as TILE_KEY
from rsseg.data.raster import read_window
from rsseg.data.tiling import Window
from rsseg.errors import ConfigError
from rsseg.evaluation import Evaluator, scene_targets, served_predictor
from rsseg.outputs import replace_output_dir
from rsseg.plots import Overlay, overlays_figure
from rsseg.scoring import check_data, data_root, onnx_ensemble, split_scenes
from rsseg.spec import ModelSpec, member_label

log = logging.getLogger(__name__)



@dataclass
class WorstTiles:
    """The `keep` worst-scoring tiles seen so far, with their pixels for the figure."""

    keep: int
    tiles: list[tuple[float, str, Overlay]] = field(default_factory=list)

    def offer(self, value: float, title: str, overlay: Any) -> None:
        """Keep the tile if it is among the worst; `overlay` (a callable) reads its pixels only then."""
        if self.keep <= 0 or not math.isfinite(value):
            return
        if len(self.tiles) >= self.keep and value >= self.tiles[-1][0]:
            return
        self.tiles.append((value, title, overlay() if callable(overlay) else overlay))
        self.tiles.sort(key=lambda t: t[0])
        del self.tiles[self.keep:]


def audit(config: AuditConfig) -> dict[str, Any]:
    """Audit `config.data` with `config.model`; returns the summary (also logged as a run)."""
    if not config.model:
        raise ConfigError("audit: name the model (model=models:/NAME/VERSION, @ALIAS, a list, or runs:/RUN_ID)")
    members = [tracking.load_model_uri(uri, what="model") for uri in tracking.expand_model_uris(config.model)]
    return audit_loaded(members, config)


def audit_loaded(members: list[tuple[Any, ModelSpec]], config: AuditConfig) -> dict[str, Any]:
    """audit() with the model(s) already loaded; `config.model` is only recorded."""
    if not 0.0 <= config.exclude_share <= 1.0:
        raise ConfigError(f"audit: exclude_share must be in [0, 1], got {config.exclude_share}")
    specs = [spec for _, spec in members]
    data = PreparedData.load(data_root(config.data, specs))
    out = Path(config.out or Path("audits") / data.spec.name)
    with tempfile.TemporaryDirectory(prefix="rsseg-audit-") as tmp:
        model = onnx_ensemble(members, Path(tmp), tta=config.tta)
        check_data(data, model.spec)
        tiles, scenes, worst = score_tiles(model, data, config)
    headline = model.spec.dataset.headline_metric
    tiles = mark_exclusions(tiles, headline, config.exclude_share, config.exclude_below)

    def fill(folder: Path) -> None:
        tiles.to_csv(folder / "tiles.csv", index=False)
        scenes.to_csv(folder / "scenes.csv", index=False)
        tiles.loc[tiles["excluded"], TILE_KEY].to_csv(folder / "exclude.csv", index=False)
        if worst.tiles:
            figure = overlays_figure([o for _, _, o in worst.tiles], model.spec.dataset.colors if
                                     model.spec.dataset.task != "change" else [[0, 0, 0], [255, 255, 255]],
                                     titles=[t for _, t, _ in worst.tiles])
            figure.savefig(folder / "worst_tiles.png", dpi=80)

    replace_output_dir(out, fill, command="audit", overwrite=config.overwrite, flag="out=")
    scored = tiles[np.isfinite(tiles[headline])]
    summary = {"model": config.model, "members": [member_label(s) for s in specs], "data": str(data.root),
               "split": config.split, "out": str(out), "headline_metric": headline, "tiles": len(tiles),
               "scored_tiles": len(scored), "excluded_tiles": int(tiles["excluded"].sum()),
               "exclude_share": config.exclude_share, "exclude_below": config.exclude_below,
               "worst_tile": scored.iloc[0][TILE_KEY + [headline]].to_dict() if len(scored) else None,
               "median_tile": float(scored[headline].median()) if len(scored) else math.nan}
    summary["run_id"] = tracking.log_audit(summary, out)
    log.info("audit of %s: %d tiles, %d excluded (%s up to %s); worst %s", data.root, len(tiles),
             summary["excluded_tiles"], headline, _cut(tiles, headline), summary["worst_tile"])
    return summary


def score_tiles(model: Any, data: PreparedData, config: AuditConfig) -> tuple[pd.DataFrame, pd.DataFrame, WorstTiles]:
    """Every tile and scene of `config.split` scored (worst first), and the worst tiles' pixels."""
    spec: ModelSpec = model.spec
    headline = spec.dataset.headline_metric
    scenes = split_scenes(data, config.split)
    predict = served_predictor(model, data, batch=config.batch)
    worst = WorstTiles(config.figure_tiles)
    tile_rows, scene_rows = [], []
    by_scene = dict(tuple(data.tiles.groupby("scene")))
    for i, scene in enumerate(scenes):
        maps, targets = predict(scene), scene_targets(scene, data)
        whole = Evaluator(spec)
        whole.update_maps(maps, targets)
        scene_rows.append({"scene": scene.name, headline: whole.compute().get(headline, math.nan)})
        main = whole.main_group
        for _, tile in by_scene.get(scene.name, pd.DataFrame(columns=data.tiles.columns)).iterrows():
            r, c, size = int(tile["row"]), int(tile["col"]), int(tile["size"])
            window = (slice(r, r + size), slice(c, c + size))
            own = Evaluator(spec)
            own.update_maps({k: v[window] for k, v in maps.items()}, {k: v[window] for k, v in targets.items()})
            value = float(own.compute().get(headline, math.nan))
            labelled = float((targets[main][window] != spec.dataset.ignore_index).mean())
            tile_rows.append({"scene": scene.name, "row": r, "col": c, "size": size, "split": tile["split"],
                              headline: value, "labelled": round(labelled, 4)})
            worst.offer(value, f"{scene.name} ({r}, {c}): {headline} {value:.3f}",
                        lambda: Overlay(_picture(scene.image, Window(r, c, size, size), data),
                                        targets[main][window].copy(), maps[main][window].copy()))
        log.info("audited scene %d/%d %s: %s %.4f", i + 1, len(scenes), scene.name, headline,
                 scene_rows[-1][headline])
    return _worst_first(pd.DataFrame(tile_rows), headline), _worst_first(pd.DataFrame(scene_rows), headline), worst


def mark_exclusions(tiles: pd.DataFrame, metric: str, share: float, below: float) -> pd.DataFrame:
    """`excluded`: the tiles scoring below `below` when it is >= 0, else the worst `share` of the scored tiles
    (rounded up); `tiles` is sorted worst first, undefined metrics last."""
    values = tiles[metric].to_numpy(dtype=np.float64)
    finite = np.isfinite(values)
    if below >= 0:
        excluded = finite & (values < below)
    else:
        excluded = np.zeros(len(tiles), dtype=bool)
        excluded[: math.ceil(share * int(finite.sum()))] = True
        excluded &= finite
    return tiles.assign(excluded=excluded)


def _worst_first(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame.sort_values(metric, na_position="last", kind="stable").reset_index(drop=True)


def _cut(tiles: pd.DataFrame, metric: str) -> str:
    excluded = tiles.loc[tiles["excluded"], metric]
    return "nothing" if excluded.empty else f"{excluded.max():.3f}"


def _picture(path: str, window: Window, data: PreparedData) -> np.ndarray:
    """The tile's first three bands (one band: grey) stretched to uint8 for the figure."""
    pixels = read_window(path, window, data.spec.bands).astype(np.float32)
    pixels = pixels[..., :3] if pixels.shape[-1] >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
    low, high = np.percentile(pixels, (2, 98))
    return (np.clip((pixels - low) / max(high - low, 1e-6), 0, 1) * 255).astype(np.uint8)
