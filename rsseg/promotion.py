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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rsseg import faults, tracking
from rsseg.config import EvaluateConfig, PromoteConfig, split_list
from rsseg.errors import ConfigError, PromotionRefused
from rsseg.export.onnx import assert_parity, check_parity, export_onnx
from rsseg.models.ensemble import LogitAverage
from rsseg.precision import reduce_precision
from rsseg.served_check import served_check
from rsseg.serving.repository import (
    ServingOptions,
    onnx_files,
    read_history,
    served_onnx,
    stage_promotion,
    stage_rollback,
    step_names,
)
from rsseg.serving.transaction import RepositoryChange
from rsseg.spec import ModelSpec, ensemble_spec

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
        # Ensembles are scored on eval_ tags, single versions on val_ ones: without a common `metric` an
        # ensemble competes only when named.
        ensembles = {str(v.version) for v in versions if tracking.ENSEMBLE_TAG in v.tags and not config.metric}
        ranked = [c for c in scored if not math.isnan(c.value) and c.version not in ensembles]
        if not ranked:
            raise PromotionRefused(f"no version of {config.model_name!r} has a value for its metric "
                                   f"({scored[0].metric}); nothing to compare")
        best = max(ranked, key=lambda c: (c.value, int(c.version)))
    champion_version = tracking.alias_version(config.model_name, CHAMPION)
    champion = next((c for c in scored if c.version == champion_version), None)
    if config.min_value >= 0 and not best.value >= config.min_value:
        raise PromotionRefused(f"{config.model_name} v{best.version}: {best.metric} {best.value:.4f} is below the "
                               f"minimum {config.min_value:.4f}; nothing changed")
    if champion is not None and champion.metric != best.metric:
        raise PromotionRefused(
            f"{config.model_name} v{best.version} is scored on {best.metric} but champion v{champion.version} on "
            f"{champion.metric}; score both the same way (mlflow run . -e evaluate -P model=models:/"
            f"{config.model_name}/{best.version}) and promote with metric={champion.metric}; nothing changed")
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


def choose_ensemble(config: PromoteConfig) -> tuple[Candidate, Candidate | None, str]:
    """Register the ensemble of `config.ensemble` (or the best `ensemble_top` versions) as a new version if,
    scored through the served tiling (rsseg.scoring, the validation split of the members' data), it beats
    the champion scored the same way; returns it as the candidate. Refuses (one line, nothing changed) a
    version that does not exist, members that disagree on bands, classes, heads or normalisation, and an
    ensemble that does not win."""
    from rsseg.scoring import evaluate_loaded

    name = config.model_name
    versions = {str(v.version): v for v in tracking.model_versions(name)}
    if not versions:
        raise ConfigError(f"model {name!r} has no registered versions; train some first (mlflow run . -e train)")
    singles = [v for v in versions.values() if tracking.ENSEMBLE_TAG not in v.tags]
    if config.ensemble:
        members = split_list(config.ensemble)
        unknown = [m for m in members if m not in versions]
        if unknown:
            raise ConfigError(f"ensemble: {name} has no version {', '.join(unknown)}; versions: "
                              f"{', '.join(sorted(versions, key=int))}")
        nested = [m for m in members if tracking.ENSEMBLE_TAG in versions[m].tags]
        if nested:
            raise ConfigError(f"ensemble: {name} v{nested[0]} is itself an ensemble (of versions "
                              f"{versions[nested[0]].tags[tracking.ENSEMBLE_TAG]}); list single versions")
    else:
        ranked = sorted((c for c in (_score(v, config.metric) for v in singles) if not math.isnan(c.value)),
                        key=lambda c: (c.value, int(c.version)), reverse=True)
        members = [c.version for c in ranked[:config.ensemble_top]]
    if len(members) < 2:
        raise ConfigError(f"ensemble: {len(members)} member(s) ({', '.join(members) or 'none'}); an ensemble needs "
                          "at least 2 versions (ensemble=3,5,7 or ensemble_top=K with K >= 2 ranked versions)")
    loaded = [tracking.load_registered(name, m) for m in members]
    spec = ensemble_spec([s for _, s in loaded])  # ConfigError naming the first mismatch
    headline = spec.dataset.headline_metric
    label = f"models:/{name}/{','.join(members)}"
    scored = evaluate_loaded(loaded, EvaluateConfig(model=label, tag=False))
    value = float(scored["metrics"].get(headline, math.nan))
    metric = f"eval_{headline}"
    champion_version = tracking.alias_version(name, CHAMPION)
    champion = None
    if champion_version is not None:
        champion_model = tracking.load_registered(name, champion_version)
        theirs = evaluate_loaded([champion_model], EvaluateConfig(model=f"models:/{name}/{champion_version}",
                                                                  data=scored["data"], tag=False))
        champion = Candidate(champion_version, metric, float(theirs["metrics"].get(headline, math.nan)))
    if config.min_value >= 0 and not value >= config.min_value:
        raise PromotionRefused(f"ensemble of {name} v{', v'.join(members)}: {metric} {value:.4f} is below the "
                               f"minimum {config.min_value:.4f}; nothing changed")
    if champion is not None and not value > champion.value + config.margin:
        raise PromotionRefused(
            f"ensemble of {name} v{', v'.join(members)}: {metric} {value:.4f} does not beat champion "
            f"v{champion.version} ({champion.value:.4f}, scored the same way) by more than {config.margin:g}; "
            "nothing changed")
    reason = (f"ensemble of v{', v'.join(members)}: {metric} {value:.4f} on {scored['data']} ({scored['split']})"
              + (f" beats champion v{champion.version} ({champion.value:.4f})" if champion else "; no champion yet"))
    tags = {"headline_metric": metric, **{f"eval_{k}": f"{v:.6g}" for k, v in scored["metrics"].items()
                                          if isinstance(v, float) and math.isfinite(v)},
            "eval_run_id": scored["run_id"], "eval_data": scored["data"], "eval_split": scored["split"]}
    version = tracking.register_ensemble(name, members, spec, tags)
    return Candidate(version, metric, value), champion, reason


def promote(config: PromoteConfig) -> dict[str, Any]:
    name = config.model_name
    options = ServingOptions(instance_kind=_instance_kind(config.instance_kind),
                             max_batch_size=config.max_batch_size, tta=config.tta,
                             intra_op_threads=config.intra_op_threads, runtime=config.runtime)
    if config.ensemble and config.ensemble_top:
        raise ConfigError("give ensemble=3,5,7 or ensemble_top=K, not both")
    with RepositoryChange(config.repo) as change:
        repo = change.repo
        reconcile_aliases(name, repo)
        candidate, champion, reason = (choose_ensemble(config) if config.ensemble or config.ensemble_top
                                       else choose(config))
        log.info("promoting %s v%s: %s", name, candidate.version, reason)
        model, spec = tracking.load_registered(name, candidate.version)
        parts = list(zip(model.members, model.specs, strict=True)) if isinstance(model, LogitAverage) else [(model, spec)]
        onnx_paths = [export_onnx(m, s, change.work / file, opset=config.opset)
                      for (m, s), file in zip(parts, onnx_files(spec), strict=True)]
        faults.point("exported")
        checks = [(m, p, s) for (m, s), p in zip(parts, onnx_paths, strict=True)]
        if len(parts) > 1:
            checks.append((model, onnx_paths, spec))  # the average, as the segmenter computes it
        for reference, files, checked in checks:
            parity = check_parity(reference, files, checked, atol=config.atol)
            assert_parity(parity, config.atol, rtol=1e-5)  # float32 rounding grows with the logits
        log.info("ONNX parity: max |logit diff| %.2e over shapes %s, class maps equal", parity.max_abs_diff,
                 parity.shapes)
        faults.point("parity-checked")
        served_paths, precision = reduce_precision(config, spec, onnx_paths, change.work / "reduced",
                                                   [s for _, s in parts])
        record = {"mlflow_name": name, "mlflow_version": candidate.version, "metric": candidate.metric,
                  "value": candidate.value, "reason": reason, "parity": parity.to_dict(), "precision": precision}
        if spec.members:
            record["members"] = [m["model_version"] for m in spec.members]
        version = stage_promotion(repo, change.staging, name, spec, served_paths, options, record)
        served = {"triton_version": version, **_check_and_commit(change, name, spec, served_paths, options.runtime)}
        tracking.set_champion(name, candidate.version, champion.version if champion else None, {
            "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "triton_version": str(version),
            "onnx_sha256": read_history(repo, name)["versions"][str(version)]["onnx_sha256"],
            **{f"served_{key}": str(value) for key, value in precision.items() if key != "data"},
        })
        served["onnx_models"] = tracking.log_served_onnx(name, candidate.version, served_paths, spec, version)
        faults.point("aliases-moved")
    summary = {"action": "promote", "model_name": name, "version": candidate.version,
               "members": [m["model_version"] for m in spec.members] if spec.members else None, "metric": candidate.metric,
               "value": candidate.value, "previous_champion": champion.version if champion else None,
               "reason": reason, "parity": parity.to_dict(), "precision": precision, "served_check": served,
               "repo": str(repo)}
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
        runtime = history["versions"][str(previous)]["options"].get("runtime", "onnxruntime")
        served = {"triton_version": previous,
                  **_check_and_commit(change, name, spec, served_onnx(segmenter), runtime)}
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


def _check_and_commit(change: RepositoryChange, name: str, spec: ModelSpec, onnx_path: Path | list[Path],
                      runtime: str) -> dict[str, Any]:
    """Prove a real Triton serves the staged repository (as `runtime` computes its files in process), then
    swap it in."""
    faults.point("staged")
    check = served_check(change.staging, name, spec, onnx_path, runtime=runtime, on_spawn=change.record_server,
                         log_path=change.work / "tritonserver.log")
    faults.point("served-checked")
    change.commit()
    return check


def _score(version: Any, metric: str) -> Candidate:
    key = metric or version.tags.get("headline_metric", "")
    if key and not key.startswith(("val_", "eval_")):
        key = f"val_{key}"  # eval_<metric>: what `evaluate` measured through the served tiling
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
