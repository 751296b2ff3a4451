"""Promotion: pick the winning registered version, export and check it, serve it, then move `champion`.

Order matters: nothing a user relies on changes until every check has passed. The ONNX export is
parity-checked against PyTorch, the new repository is built in a staging copy, loaded by a real Triton
server and asked for one tile, and only then swapped in for `triton_repo/` in one atomic exchange
(rsseg.serving.transaction); the aliases move last. A failure, a signal or a SIGKILL at any step
leaves a repository that serves the old champion or the new one, never a mix. The registry follows
the repository: every promotion and rollback first moves `champion`/`previous` to what the repository
serves, so an interrupted one is made consistent by the next.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from rsseg import faults, tracking
from rsseg.config import PromoteConfig
from rsseg.data.transforms import normalize
from rsseg.errors import ConfigError, ExportError, PromotionRefused
from rsseg.export.onnx import assert_parity, check_parity, export_onnx, onnx_session
from rsseg.serving.repository import (
    ServingOptions,
    read_history,
    stage_promotion,
    stage_rollback,
    step_names,
)
from rsseg.serving.transaction import RepositoryChange
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
    name = config.model_name
    options = ServingOptions(instance_kind=_instance_kind(config.instance_kind),
                             max_batch_size=config.max_batch_size, tta=config.tta)
    with RepositoryChange(config.repo) as change:
        repo = change.repo
        reconcile_aliases(name, repo)
        candidate, champion, reason = choose(config)
        log.info("promoting %s v%s: %s", name, candidate.version, reason)
        model, spec = tracking.load_registered(name, candidate.version)
        onnx_path = export_onnx(model, spec, change.work / "model.onnx", opset=config.opset)
        faults.point("exported")
        parity = check_parity(model, onnx_path, spec, atol=config.atol)
        assert_parity(parity, config.atol, rtol=1e-5)  # float32 rounding grows with the logits
        log.info("ONNX parity: max |logit diff| %.2e over shapes %s, class maps equal", parity.max_abs_diff,
                 parity.shapes)
        faults.point("parity-checked")
        record = {"mlflow_name": name, "mlflow_version": candidate.version, "metric": candidate.metric,
                  "value": candidate.value, "reason": reason, "parity": parity.to_dict()}
        version = stage_promotion(repo, change.staging, name, spec, onnx_path, options, record)
        served = {"triton_version": version, **_check_and_commit(change, name, spec, onnx_path)}
        tracking.set_champion(name, candidate.version, champion.version if champion else None, {
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "triton_version": str(version),
            "onnx_sha256": read_history(repo, name)["versions"][str(version)]["onnx_sha256"],
        })
        faults.point("aliases-moved")
    summary = {"action": "promote", "model_name": name, "version": candidate.version, "metric": candidate.metric,
               "value": candidate.value, "previous_champion": champion.version if champion else None,
               "reason": reason, "parity": parity.to_dict(), "served_check": served, "repo": str(repo)}
    tracking.log_promotion(summary, repo / name / "history.json")
    faults.point("logged")
    return summary


def rollback(config: PromoteConfig) -> dict[str, Any]:
    """Serve the previously promoted version again and move the aliases back with it."""
    name = config.model_name
    with RepositoryChange(config.repo) as change:
        repo = change.repo
        reconcile_aliases(name, repo)
        history = read_history(repo, name)
        if history["served"] is None:
            raise ConfigError(f"{repo / name}: nothing promoted yet, so nothing to roll back")
        previous = history["stack"][-2] if len(history["stack"]) >= 2 else None
        if previous is None:
            raise ConfigError(f"{repo / name}: no earlier version to roll back to")
        stage_rollback(repo, change.staging, name)
        segmenter = change.staging / step_names(name)["segmenter"] / str(previous)
        spec = ModelSpec.load(segmenter / "model_spec.json")
        served = {"triton_version": previous,
                  **_check_and_commit(change, name, spec, segmenter / "model.onnx")}
        restored = history["versions"][str(previous)]["mlflow_version"]
        before = history["stack"][-3] if len(history["stack"]) >= 3 else None
        tracking.set_champion(name, restored, history["versions"][str(before)]["mlflow_version"] if before else None,
                              {"rolled_back_at": datetime.now(UTC).isoformat(timespec="seconds")})
    summary = {"action": "rollback", "model_name": name, "version": restored, "triton_version": previous,
               "served_check": served, "repo": str(repo)}
    tracking.log_promotion(summary, repo / name / "history.json")
    return summary


def reconcile_aliases(name: str, repo: Path) -> None:
    """Point `champion` (and `previous`) at what `repo` serves, if they differ: a promotion killed
    between swapping the repository in and moving the aliases leaves them behind."""
    history = read_history(repo, name)
    if history["served"] is None:
        return
    versions = history["versions"]
    champion = str(versions[str(history["served"])]["mlflow_version"])
    previous = str(versions[str(history["stack"][-2])]["mlflow_version"]) if len(history["stack"]) >= 2 else None
    if (tracking.alias_version(name, CHAMPION), tracking.alias_version(name, PREVIOUS)) == (champion, previous):
        return
    log.warning("%s: the registry's aliases do not match what %s serves (an interrupted promotion?); "
                "champion -> v%s, previous -> %s", name, repo, champion, f"v{previous}" if previous else "none")
    tracking.set_champion(name, champion, previous, {})


def _check_and_commit(change: RepositoryChange, name: str, spec: ModelSpec, onnx_path: Path) -> dict[str, Any]:
    """Prove a real Triton serves the staged repository, then swap it in."""
    faults.point("staged")
    check = served_check(change.staging, name, spec, onnx_path, on_spawn=change.record_server,
                         log_path=change.work / "tritonserver.log")
    faults.point("served-checked")
    change.commit()
    return check


def served_check(repo: Path, name: str, spec: ModelSpec, onnx_path: Path, *,
                 on_spawn: Callable[[int], None] | None = None, log_path: Path | None = None) -> dict[str, Any]:
    """Start Triton on `repo`, send one tile through the ensemble, compare with ONNX Runtime."""
    from rsseg.client.oneshot import infer_tiles
    from rsseg.serving.server import TritonServer

    tile = sample_tile(spec)
    with TritonServer(repo, on_spawn=on_spawn, log_path=log_path) as server:
        faults.point("server-started")
        server.wait_model_ready(name)
        served = infer_tiles(server.grpc_url, name, tile[None])[0]
    expected = onnx_class_maps(onnx_path, spec, tile[None])[0]
    agree = float((served == expected).mean())
    if agree < 1.0:
        raise ExportError(f"Triton's class map for a test tile differs from ONNX Runtime's on "
                          f"{(1 - agree) * 100:.3f} % of pixels; the repository was not changed")
    histogram = np.bincount(served[0].ravel(), minlength=spec.outputs[0].channels).tolist()
    return {"tile_shape": list(tile.shape), "pixels_agree": agree, "class_histogram": histogram}


def ask_server_once(repo: Path, model: str, tile: np.ndarray) -> str:
    """Start tritonserver on `repo` (loopback), segment one raw tile, stop; the answer as text."""
    from rsseg.client.oneshot import connect, infer_tiles, served_spec
    from rsseg.serving.server import TritonServer

    with TritonServer(repo) as server:
        server.wait_model_ready(model)
        with connect(server.grpc_url) as client:
            served = served_spec(client, model)
        maps = infer_tiles(server.grpc_url, model, tile[None])[0]
    lines = [f"tritonserver {server.grpc_url} served {model} v{served['model_version']} "
             f"(Triton version {served['triton']['version']}) for one {tile.shape[0]}x{tile.shape[1]} tile:"]
    names = served["dataset"]["classes"] if served["dataset"]["task"] != "change" else ["unchanged", "changed"]
    counts = np.bincount(maps[0].ravel(), minlength=len(names))
    total = int(counts.sum())
    lines += [f"  {name:<12} {int(n):>8} px  {100 * n / total:5.1f} %" for name, n in zip(names, counts, strict=False)]
    return "\n".join(lines)


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
