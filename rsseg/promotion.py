"""Promotion: pick the winning registered version, export and check it, serve it, then move `champion`.

Order matters: nothing a user relies on changes until every check has passed. The ONNX export is
parity-checked against PyTorch, the new repository is built in a staging copy, loaded by a real Triton
server and asked for one tile, and only then swapped in for `triton_repo/`; the aliases move last.
A failure at any step leaves the repository and the aliases as they were.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from rsseg import tracking
from rsseg.config import PromoteConfig
from rsseg.data.transforms import normalize
from rsseg.errors import ConfigError, ExportError, PromotionRefused
from rsseg.export.onnx import assert_parity, check_parity, export_onnx, onnx_session
from rsseg.serving.repository import (
    ServingOptions,
    commit_staging,
    read_history,
    stage_promotion,
    stage_rollback,
    step_names,
)
from rsseg.spec import ModelSpec

log = logging.getLogger(__name__)

CHAMPION, PREVIOUS = "champion", "previous"


@dataclass
class Candidate:
    version: str
    metric: str
    value: float


def choose(config: PromoteConfig) -> tuple[Candidate, Candidate | None, str]:
    """The version to promote, the current champion (if any) and why; raises PromotionRefused."""
    versions = tracking.model_versions(config.model_name)
    if not versions:
        raise ConfigError(f"model {config.model_name!r} has no registered versions; train one first "
                          "(mlflow run . -e train)")
    scored = [_score(v, config.metric) for v in versions]
    if config.version:
        chosen = [c for c in scored if c.version == config.version]
        if not chosen:
            raise ConfigError(f"model {config.model_name!r} has no version {config.version}; "
                              f"versions: {', '.join(c.version for c in scored)}")
        best = chosen[0]
    else:
        ranked = [c for c in scored if not math.isnan(c.value)]
        if not ranked:
            raise PromotionRefused(f"no version of {config.model_name!r} has a value for its metric "
                                   f"({scored[0].metric}); nothing to compare")
        best = max(ranked, key=lambda c: (c.value, int(c.version)))
    champion_version = tracking.alias_version(config.model_name, CHAMPION)
    champion = next((c for c in scored if c.version == champion_version), None)
    if config.min_value >= 0 and not best.value >= config.min_value:
        raise PromotionRefused(f"{config.model_name} v{best.version}: {best.metric} {best.value:.4f} is below the "
                               f"minimum {config.min_value:.4f}; nothing changed")
    if champion is not None:
        if champion.version == best.version:
            raise PromotionRefused(f"{config.model_name} v{best.version} is already the champion "
                                   f"({best.metric} {best.value:.4f}); nothing changed")
        if not best.value > champion.value + config.margin:
            raise PromotionRefused(
                f"{config.model_name} v{best.version}: {best.metric} {best.value:.4f} does not beat champion "
                f"v{champion.version} ({champion.value:.4f}) by more than {config.margin:g}; nothing changed")
        reason = (f"{best.metric} {best.value:.4f} beats champion v{champion.version} "
                  f"({champion.value:.4f}) by more than {config.margin:g}")
    else:
        reason = f"best {best.metric} {best.value:.4f} of {len(scored)} version(s); no champion yet"
    return best, champion, reason


def promote(config: PromoteConfig) -> dict[str, Any]:
    candidate, champion, reason = choose(config)
    name, repo = config.model_name, Path(config.repo)
    options = ServingOptions(instance_kind=_instance_kind(config.instance_kind),
                             max_batch_size=config.max_batch_size, tta=config.tta)
    log.info("promoting %s v%s: %s", name, candidate.version, reason)
    model, spec = tracking.load_registered(name, candidate.version)
    with tempfile.TemporaryDirectory(prefix="rsseg-promote-") as tmp:
        onnx_path = export_onnx(model, spec, Path(tmp) / "model.onnx", opset=config.opset)
        parity = check_parity(model, onnx_path, spec, atol=config.atol)
        assert_parity(parity, config.atol, rtol=1e-5)  # float32 rounding grows with the logits
        log.info("ONNX parity: max |logit diff| %.2e over shapes %s, class maps equal", parity.max_abs_diff,
                 parity.shapes)
        record = {"mlflow_name": name, "mlflow_version": candidate.version, "metric": candidate.metric,
                  "value": candidate.value, "reason": reason, "parity": parity.to_dict()}
        served = _stage_check_commit(
            repo, lambda staging: stage_promotion(repo, staging, name, spec, onnx_path, options, record),
            name, spec, onnx_path)
    tracking.set_champion(name, candidate.version, champion.version if champion else None, {
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "triton_version": str(served["triton_version"]),
        "onnx_sha256": read_history(repo, name)["versions"][str(served["triton_version"])]["onnx_sha256"],
    })
    summary = {"action": "promote", "model_name": name, "version": candidate.version, "metric": candidate.metric,
               "value": candidate.value, "previous_champion": champion.version if champion else None,
               "reason": reason, "parity": parity.to_dict(), "served_check": served, "repo": str(repo)}
    tracking.log_promotion(summary, repo / name / "history.json")
    return summary


def rollback(config: PromoteConfig) -> dict[str, Any]:
    """Serve the previously promoted version again and move the aliases back with it."""
    name, repo = config.model_name, Path(config.repo)
    history = read_history(repo, name)
    if history["served"] is None:
        raise ConfigError(f"{repo / name}: nothing promoted yet, so nothing to roll back")
    previous = history["stack"][-2] if len(history["stack"]) >= 2 else None
    if previous is None:
        raise ConfigError(f"{repo / name}: no earlier version to roll back to")
    spec_path = repo / step_names(name)["segmenter"] / str(previous) / "model_spec.json"
    spec = ModelSpec.load(spec_path)
    onnx_path = spec_path.with_name("model.onnx")
    served = _stage_check_commit(repo, lambda staging: stage_rollback(repo, staging, name), name, spec, onnx_path)
    restored = history["versions"][str(previous)]["mlflow_version"]
    before = history["stack"][-3] if len(history["stack"]) >= 3 else None
    tracking.set_champion(name, restored, history["versions"][str(before)]["mlflow_version"] if before else None,
                          {"rolled_back_at": datetime.now(UTC).isoformat(timespec="seconds")})
    summary = {"action": "rollback", "model_name": name, "version": restored, "triton_version": previous,
               "served_check": served, "repo": str(repo)}
    tracking.log_promotion(summary, repo / name / "history.json")
    return summary


def _stage_check_commit(repo: Path, stage, name: str, spec: ModelSpec, onnx_path: Path) -> dict[str, Any]:
    """Build the new repository beside `repo`, prove a real Triton serves it, then swap it in."""
    repo.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{repo.name}.staging-", dir=repo.parent))
    try:
        version = stage(staging)
        check = served_check(staging, name, spec, onnx_path)
        commit_staging(staging, repo)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"triton_version": version, **check}


def served_check(repo: Path, name: str, spec: ModelSpec, onnx_path: Path) -> dict[str, Any]:
    """Start Triton on `repo`, send one tile through the ensemble, compare with ONNX Runtime."""
    from rsseg.serving.client import infer_tiles
    from rsseg.serving.server import TritonServer

    tile = sample_tile(spec)
    with TritonServer(repo) as server:
        server.wait_model_ready(name)
        served = infer_tiles(server.grpc_url, name, tile[None])[0]
    expected = onnx_class_maps(onnx_path, spec, tile[None])[0]
    agree = float((served == expected).mean())
    if agree < 1.0:
        raise ExportError(f"Triton's class map for a test tile differs from ONNX Runtime's on "
                          f"{(1 - agree) * 100:.3f} % of pixels; the repository was not changed")
    histogram = np.bincount(served[0].ravel(), minlength=spec.outputs[0].channels).tolist()
    return {"tile_shape": list(tile.shape), "pixels_agree": agree, "class_histogram": histogram}


def sample_tile(spec: ModelSpec, size: int | None = None, seed: int = 0) -> np.ndarray:
    """A deterministic raw tile in the spec's dtype and bands (smooth noise around the band means)."""
    rng = np.random.default_rng(seed)
    size = size or min(spec.tile_sizes)
    top = 255 if spec.dataset.dtype == "uint8" else 65535
    mean = np.asarray([*spec.dataset.mean] * (spec.in_channels // spec.dataset.num_bands))
    std = np.asarray([*spec.dataset.std] * (spec.in_channels // spec.dataset.num_bands))
    tile = mean + std * rng.standard_normal((size, size, spec.in_channels))
    return np.clip(tile, 0, top).astype(spec.dataset.dtype)


def onnx_class_maps(onnx_path: Path, spec: ModelSpec, tiles: np.ndarray) -> np.ndarray:
    """[N, H, W, C] raw tiles -> [N, G, H, W] uint8 class maps through ONNX Runtime (the reference)."""
    import torch

    from rsseg.inference import class_maps

    batch = np.stack([normalize(t, spec.dataset) for t in tiles])
    session = onnx_session(onnx_path)
    logits = session.run(None, {session.get_inputs()[0].name: batch})[0]
    maps = class_maps(torch.from_numpy(logits), spec.outputs)
    return np.stack([maps[g.name].numpy() for g in spec.outputs], axis=1).astype(np.uint8)


def _score(version: Any, metric: str) -> Candidate:
    key = metric or version.tags.get("headline_metric", "")
    if key and not key.startswith("val_"):
        key = f"val_{key}"
    try:
        value = float(version.tags[key])
    except (KeyError, ValueError):
        value = math.nan
    return Candidate(str(version.version), key, value)


def _instance_kind(kind: str) -> str:
    if kind != "auto":
        return kind
    try:
        import onnxruntime
        import torch

        cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        cuda = False
    return "gpu" if cuda else "cpu"
