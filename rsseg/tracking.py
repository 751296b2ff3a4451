"""The only MLflow touchpoint: runs, params, metrics, artifacts, logged models and the registry."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient

import rsseg
from rsseg import faults, pyfunc
from rsseg.errors import ConfigError, first_line
from rsseg.plots import confusion_matrix_figure, overlays_figure
from rsseg.spec import DEFAULT_MODEL_NAMES, ModelSpec
from rsseg.training import TrainResult

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "rsseg"
# Aggregate validation metrics worth a line in a summary (per-class ones stay in the registry).
_SUMMARY_METRICS = ("val_miou", "val_fwiou", "val_oa", "val_kappa", "val_mean_f1", "val_f1_target",
                    "val_change_iou", "val_change_f1", "val_sek", "val_score", "val_loss")
SPEC_FILE = "model_spec.json"


@contextmanager
def start_run(run_name: str, experiment: str = DEFAULT_EXPERIMENT) -> Iterator[mlflow.ActiveRun]:
    """A run; under `mlflow run` the project's run (MLFLOW_RUN_ID) is reused."""
    if not os.environ.get("MLFLOW_RUN_ID") and mlflow.active_run() is None:
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment))
    with mlflow.start_run(run_name=None if os.environ.get("MLFLOW_RUN_ID") else run_name) as run:
        yield run


def log_config(config: Any, name: str) -> None:
    """A resolved dataclass config: every field as a param and the whole as a JSON artifact."""
    values = dataclasses.asdict(config)
    run = mlflow.active_run()
    # Under `mlflow run` the project's -P parameters are already params of this run (MLflow logs them
    # quoted); params cannot change, so only the rest is added. The JSON artifact is the resolved truth.
    logged = set(MlflowClient().get_run(run.info.run_id).data.params) if run else set()
    mlflow.log_params({k: _param(v) for k, v in values.items() if k not in logged})
    mlflow.log_dict(values, f"config/{name}.json")


def epoch_logger(step_offset: int = 0):
    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        mlflow.log_metrics(finite, step=epoch + step_offset)

    return on_epoch_end


def log_dataset(prepared_root: Path) -> None:
    """The dataset spec and statistics travel with the run."""
    for name in ("dataset_spec.json", "stats.json"):
        path = prepared_root / name
        if path.is_file():
            mlflow.log_artifact(str(path), artifact_path="dataset")


def log_training_result(result: TrainResult, model_name: str | None, register: bool,
                        lineage: dict[str, str] | None = None) -> dict[str, Any]:
    """Log the best epoch's model (pytorch flavour + spec), its figures, and register a version.
    `lineage`: tags saying where the weights came from (init_from), on the run and the version.

    Returns a summary: run id, model uri, registered name/version, best epoch and metrics.
    """
    spec = result.spec
    run = mlflow.active_run()
    assert run is not None, "log_training_result needs an active run"
    spec.run_id = run.info.run_id
    best = {k: v for k, v in result.best_metrics.items() if _finite(v)}
    mlflow.log_metrics({f"best_{k}": v for k, v in best.items()})
    mlflow.log_param("best_epoch", result.best_epoch)
    if lineage:
        mlflow.set_tags(lineage)
    mlflow.log_dict(result.augmentation, "config/augmentation.json")
    _log_figure(confusion_matrix_figure(result.confusion, result.class_names), "figures/confusion_matrix.png")
    if result.overlays:
        colors = spec.dataset.colors if spec.dataset.task != "change" else [[0, 0, 0], [255, 255, 255]]
        _log_figure(overlays_figure(result.overlays, colors), "figures/predictions.png")

    name = model_name or DEFAULT_MODEL_NAMES[spec.dataset.task]
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / SPEC_FILE
        spec.model_name = name if register else None
        spec.save(spec_path)
        mlflow.log_artifact(str(spec_path))
        info = _log_model(result.model, spec, spec_path, "model")
        snapshots = [(shot, _log_model(shot["model"], spec, spec_path, f"snapshot{shot['cycle']}"))
                     for shot in result.snapshots]
    summary: dict[str, Any] = {
        "run_id": spec.run_id, "model_uri": info.model_uri, "best_epoch": result.best_epoch, "metrics": best,
    }
    if register:
        # Tags go in with the version, so no version exists without its metrics.
        version = mlflow.register_model(info.model_uri, name, tags={**version_tags(spec, best), **(lineage or {})})
        spec.model_version = str(version.version)
        summary.update(model_name=name, model_version=str(version.version))
        log.info("registered %s version %s (best epoch %d)", name, version.version, result.best_epoch)
    for shot, logged in snapshots:
        metrics = {k: v for k, v in shot["metrics"].items() if _finite(v)}
        mlflow.log_metrics({f"snapshot{shot['cycle']}_{k}": v for k, v in metrics.items()})
        if register:
            tags = {**version_tags(spec, metrics), **(lineage or {}), "snapshot": f"{shot['cycle'] + 1}/{len(snapshots)}"}
            snap = mlflow.register_model(logged.model_uri, name, tags=tags)
            summary.setdefault("snapshot_versions", []).append(str(snap.version))
    if snapshots and register:
        log.info("registered snapshots of %s as versions %s: promote them with -P ensemble=%s", name,
                 ", ".join(summary["snapshot_versions"]), ",".join(summary["snapshot_versions"]))
    return summary


def _log_model(model: torch.nn.Module, spec: ModelSpec, spec_path: Path, name: str) -> Any:
    """One model of the run: the pyfunc model on raw tiles (rsseg.pyfunc), holding a state dict and the spec,
    built from code (nothing pickled), with the package code beside it."""
    with tempfile.TemporaryDirectory() as tmp:
        weights = pyfunc.save_weights(model, Path(tmp) / "weights.pt")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(pyfunc.MODEL_CODE),
            artifacts={pyfunc.WEIGHTS: str(weights), pyfunc.SPEC: str(spec_path)},
            code_paths=[str(Path(rsseg.__file__).parent)],
            signature=pyfunc.signature(spec),
            input_example=pyfunc.input_example(spec),
            metadata={"model_spec": spec.to_dict()},
            pip_requirements=_pip_requirements(),
        )


def load_logged_model(model_uri: str) -> torch.nn.Module:
    """The PyTorch model of a logged model (eval, CPU): rebuilt from its state dict and spec (weights_only),
    or, for models logged before the pyfunc model existed, MLflow's pytorch flavour."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
        weights = local / "artifacts" / "weights.pt"
        if not weights.is_file():
            return mlflow.pytorch.load_model(str(local), map_location="cpu").eval()
        return pyfunc.model_from_weights(ModelSpec.load(local / "artifacts" / SPEC_FILE), weights)


def version_tags(spec: ModelSpec, metrics: dict[str, float]) -> dict[str, str]:
    """Validation metrics and the spec's key fields as version tags: promotion compares on these."""
    tags = {k: f"{v:.6g}" for k, v in metrics.items() if k.startswith("val_")}
    tags.update({
        "headline_metric": f"val_{spec.dataset.headline_metric}",
        "run_id": spec.run_id or "",
        "spec.task": spec.dataset.task,
        "spec.dataset": spec.dataset.name,
        "spec.classes": json.dumps(spec.dataset.classes),
        "spec.bands": json.dumps(spec.dataset.bands),
        "spec.dtype": spec.dataset.dtype,
        "spec.architecture": spec.architecture,
        "spec.encoder": spec.encoder,
        "spec.in_channels": str(spec.in_channels),
        "spec.tile_size": str(spec.tile_size),
    })
    return tags


def _log_figure(figure, path: str) -> None:
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, path)
    plt.close(figure)


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _pip_requirements() -> list[str]:
    """What loading the logged model needs (the package itself rides along in code_paths)."""
    import albumentations
    import timm

    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}", f"numpy=={np.__version__}",
            f"albumentations=={albumentations.__version__}", f"mlflow=={mlflow.__version__}"]


def describe_version(name: str, version: str) -> str:
    """A registered version as the registry reports it: name, version, run, headline and metrics."""
    client = MlflowClient()
    mv = client.get_model_version(name, version)
    tags = dict(mv.tags)
    headline = tags.get("headline_metric", "")
    lines = [f"registered model {name} version {version} (run {mv.run_id}, tracking {mlflow.get_tracking_uri()})"]
    if headline in tags:
        lines.append(f"  {headline} = {tags[headline]}")
    lines += [f"  {k} = {tags[k]}" for k in _SUMMARY_METRICS if k in tags and k != headline]
    return "\n".join(lines)


def log_benchmark(row: dict[str, Any]) -> None:
    mlflow.log_dict(row, "benchmark.json")


# ---------------------------------------------------------------------------------------- the registry


def model_versions(name: str) -> list[Any]:
    return MlflowClient().search_model_versions(f"name='{name}'")


def alias_version(name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias (or the model) does not exist."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def load_model_uri(uri: str, what: str = "init_from") -> tuple[torch.nn.Module, ModelSpec]:
    """A logged model named by `models:/NAME/VERSION`, `models:/NAME@ALIAS` (see load_registered) or
    `runs:/RUN_ID` (a training run's model); ConfigError naming `what` and the URI when it is malformed or
    names nothing."""
    text = uri.strip()
    if text.startswith("runs:/"):
        return _load_run(text, what)
    body = text.removeprefix("models:/")
    name, at, alias = body.partition("@")
    if not at:
        name, _, alias = body.rpartition("/")
    if not text.startswith("models:/") or not name or not alias:
        raise ConfigError(f"{what} {uri!r}: give models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID "
                          "(e.g. models:/rsseg-binary/1)")
    version = alias_version(name, alias) if at else alias
    if not version:
        raise ConfigError(f"{what} {uri}: no such alias in {mlflow.get_tracking_uri()}; give a version number")
    try:
        return load_registered(name, str(version))
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"{what} {uri}: no such registered version in {mlflow.get_tracking_uri()} "
                          f"({first_line(exc)}); list them with `mlflow models` or the MLflow UI") from None


def expand_model_uris(text: str) -> list[str]:
    """"models:/NAME/3,5,7" -> one URI per version; "models:/A/1,models:/B@champion,runs:/ID" -> as listed
    (a bare number after a models:/ URI is another version of that model)."""
    uris: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.isdigit() and uris and uris[-1].startswith("models:/") and "@" not in uris[-1]:
            uris.append(f"{uris[-1].rpartition('/')[0]}/{part}")
        else:
            uris.append(part)
    return uris


def _load_run(uri: str, what: str) -> tuple[torch.nn.Module, ModelSpec]:
    run_id = uri.removeprefix("runs:/").strip("/").split("/")[0]
    try:
        model = load_logged_model(f"runs:/{run_id}/model")
        spec = _run_spec(run_id)
    except (mlflow.exceptions.MlflowException, OSError) as exc:
        raise ConfigError(f"{what} {uri}: no trained model in that run in {mlflow.get_tracking_uri()} "
                          f"({first_line(exc)}); give runs:/RUN_ID of a train run") from None
    spec.run_id = run_id
    return model, spec


def run_param(run_id: str, key: str) -> str | None:
    """A param of a run (e.g. the `data` a version was trained on), or None."""
    try:
        value = MlflowClient().get_run(run_id).data.params.get(key)
    except mlflow.exceptions.MlflowException:
        return None
    return value.strip("'\"") if value is not None else None  # `mlflow run` logs -P values shell-quoted


ENSEMBLE_TAG = "ensemble_members"  # on a registered ensemble version: its member versions, in order


def load_registered(name: str, version: str) -> tuple[torch.nn.Module, ModelSpec]:
    """A registered version's PyTorch model (eval, CPU) and its model spec (name/version filled in). An
    ensemble version gives the LogitAverage of its members (holding their specs) and the ensemble's spec."""
    registered = MlflowClient().get_model_version(name, version)
    members = split_members(registered.tags.get(ENSEMBLE_TAG, ""))
    if members:
        from rsseg.models.ensemble import LogitAverage
        from rsseg.spec import ensemble_spec

        loaded = [load_registered(name, m) for m in members]
        spec = ensemble_spec([s for _, s in loaded])
        spec.model_name, spec.model_version, spec.run_id = name, str(version), registered.run_id
        return LogitAverage([m for m, _ in loaded], [s for _, s in loaded]).eval(), spec
    model = load_logged_model(f"models:/{name}/{version}")
    spec = _run_spec(registered.run_id)
    spec.model_name, spec.model_version, spec.run_id = name, str(version), registered.run_id
    return model, spec


def _run_spec(run_id: str) -> ModelSpec:
    """The model spec a training run logged beside its model."""
    with tempfile.TemporaryDirectory() as tmp:
        return ModelSpec.load(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=SPEC_FILE, dst_path=tmp))


def split_members(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register_ensemble(name: str, members: list[str], spec: ModelSpec, tags: dict[str, str]) -> str:
    """A registered version that is the logit-averaging ensemble of `members` (versions of `name`): a run
    of its own holding the ensemble's spec and member list, registered with the members in the
    `ensemble_members` tag (load_registered rebuilds it from them). Returns the new version."""
    client = MlflowClient()
    run = client.get_run(_side_run(DEFAULT_EXPERIMENT, f"ensemble-{name}-v{'-v'.join(members)}", {}))
    client.log_dict(run.info.run_id, spec.to_dict(), f"ensemble/{SPEC_FILE}")
    client.log_dict(run.info.run_id, {"model_name": name, "members": members, "tags": tags}, "ensemble/ensemble.json")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/ensemble", run_id=run.info.run_id,
        tags={ENSEMBLE_TAG: ",".join(members), "spec.architecture": spec.architecture, "spec.encoder": spec.encoder,
              "spec.task": spec.dataset.task, "spec.dataset": spec.dataset.name, **tags})
    log.info("registered %s version %s: the ensemble of versions %s", name, version.version, ", ".join(members))
    return str(version.version)


def set_champion(name: str, version: str, previous: str | None, tags: dict[str, str]) -> None:
    """Point `champion` at `version` and `previous` at the version it replaces (or remove it)."""
    client = MlflowClient()
    if previous is not None:
        client.set_registered_model_alias(name, "previous", previous)
    elif alias_version(name, "previous") is not None:
        client.delete_registered_model_alias(name, "previous")
    faults.point("previous-alias-moved")
    client.set_registered_model_alias(name, "champion", version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


EVALUATION_EXPERIMENT = "rsseg-evaluations"


def _side_run(experiment: str, name: str, tags: dict[str, str]) -> str:
    """A run of its own in `experiment`, created through the client so it never collides with an enclosing
    project run (`mlflow run . -e main` trains, registers and promotes in one go); nested under that run."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = {"mlflow.runName": name[:250], **tags}
    parent = os.environ.get("MLFLOW_RUN_ID") or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
    if parent:
        tags["mlflow.parentRunId"] = parent
    return client.create_run(experiment_id, tags=tags).info.run_id


def log_evaluation(summary: dict[str, Any], metrics: dict[str, float], scenes: list[dict[str, Any]],
                   confusion: np.ndarray, class_names: list[str], params: dict[str, Any]) -> str:
    """An evaluation is a run of its own in `rsseg-evaluations` (nested under an enclosing project run):
    params, every metric, the confusion-matrix figure, the per-scene table (worst first) and the summary."""
    import pandas as pd

    client = MlflowClient()
    run_id = _side_run(EVALUATION_EXPERIMENT, f"evaluate-{summary['model']}", {})
    for key, value in params.items():
        client.log_param(run_id, key, _param(value))
    for key, value in metrics.items():
        if _finite(value):
            client.log_metric(run_id, key, float(value))
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "per_scene.csv"
        pd.DataFrame(scenes).to_csv(table, index=False)
        client.log_artifact(run_id, str(table))
        client.log_figure(run_id, confusion_matrix_figure(confusion, class_names), "figures/confusion_matrix.png")
    client.log_dict(run_id, {**summary, "metrics": metrics}, "evaluation.json")
    client.set_terminated(run_id)
    return run_id


def log_pseudo_labels(summary: dict[str, Any]) -> str:
    """A pseudo-labelling is a run of its own (experiment `rsseg`): teacher, threshold, the share kept per class."""
    client = MlflowClient()
    run_id = _side_run(DEFAULT_EXPERIMENT, f"pseudo-label-{Path(summary['out']).name}",
                       {"teacher": summary["teacher"], "kind": "pseudo_label"})
    for key in ("teacher", "threshold", "tta", "source", "out", "scenes"):
        client.log_param(run_id, key, _param(summary[key]))
    for name, share in summary["kept_share"].items():
        if _finite(share):
            client.log_metric(run_id, f"kept_share_{name}", float(share))
    client.log_dict(run_id, summary, "pseudo_labels.json")
    client.set_terminated(run_id)
    return run_id


def log_audit(summary: dict[str, Any], folder: Path) -> str:
    """An audit is a run of its own in `rsseg-evaluations` (tag kind=audit): what was audited, how many tiles
    were excluded, and the audit's files (tables, figure, exclusion list) as artifacts."""
    client = MlflowClient()
    run_id = _side_run(EVALUATION_EXPERIMENT, f"audit-{summary['model']}", {"kind": "audit"})
    for key in ("model", "data", "split", "exclude_share", "exclude_below", "out"):
        client.log_param(run_id, key, _param(summary[key]))
    for key in ("tiles", "scored_tiles", "excluded_tiles", "median_tile"):
        if _finite(summary[key]):
            client.log_metric(run_id, key, float(summary[key]))
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            client.log_artifact(run_id, str(path))
    client.log_dict(run_id, summary, "audit.json")
    client.set_terminated(run_id)
    return run_id


def tag_evaluation(name: str, version: str, metrics: dict[str, float], tags: dict[str, str]) -> None:
    """`eval_<metric>` tags (and `tags`) on a registered version: promotion can rank on served-path metrics."""
    client = MlflowClient()
    for key, value in metrics.items():
        if _finite(value):
            client.set_model_version_tag(name, version, f"eval_{key}", f"{float(value):.6g}")
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


SERVED_ONNX_TAG = "served_onnx"  # on a promoted version: the MLflow model URI(s) of the ONNX file(s) served


def log_served_onnx(name: str, version: str, paths: list[Path], spec: ModelSpec, triton_version: int) -> list[str]:
    """The exact ONNX file(s) `triton_repo/` serves for `version` as MLflow models (onnx flavour, the spec in
    their metadata) in the version's run, so the registry holds what is served; tags the version with their
    URIs (`served_onnx`). Returns the URIs (runs:/RUN_ID/served-onnx-vN[-memberI])."""
    import onnx
    import onnxruntime

    client = MlflowClient()
    run_id = client.get_model_version(name, version).run_id
    uris = []
    for i, path in enumerate(paths):
        label = f"served-onnx-v{triton_version}" + (f"-member{i}" if len(paths) > 1 else "")
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.onnx.save_model(onnx.load(str(path)), str(Path(tmp) / label),
                                   metadata={"model_spec": spec.to_dict(), "served_file": path.name},
                                   save_as_external_data=False,
                                   pip_requirements=[f"onnx=={onnx.__version__}",
                                                     f"onnxruntime=={onnxruntime.__version__}"])
            # One file, byte for byte the served one (its sha256 is tagged): MLflow would re-serialise the proto
            # and move the weights to external files.
            shutil.copyfile(path, Path(tmp) / label / "model.onnx")
            client.log_artifacts(run_id, str(Path(tmp) / label), label)
        uris.append(f"runs:/{run_id}/{label}")
    client.set_model_version_tag(name, version, SERVED_ONNX_TAG, ",".join(uris))
    return uris


def log_promotion(summary: dict[str, Any], history: Path) -> str:
    """Each promotion or rollback is a run of its own in `rsseg-promotions` (_side_run): which version, why,
    and the checks' figures."""
    client = MlflowClient()
    run_id = _side_run("rsseg-promotions", f"{summary['action']}-{summary['model_name']}-v{summary['version']}",
                       {"reason": str(summary.get("reason", summary["action"]))})
    for key in ("action", "model_name", "version"):
        client.log_param(run_id, key, _param(summary[key]))
    parity = summary.get("parity") or {}
    if "max_abs_diff" in parity:
        client.log_metric(run_id, "onnx_max_abs_logit_diff", parity["max_abs_diff"])
    client.log_metric(run_id, "served_pixels_agree", summary["served_check"]["pixels_agree"])
    precision = summary.get("precision") or {}
    if "precision" in precision:
        client.log_param(run_id, "precision", precision["precision"])
    for key in ("fp32_metric", "metric_value", "metric_drop", "fp32_bytes", "bytes", "size_ratio"):
        if _finite(precision.get(key)):
            client.log_metric(run_id, f"precision_{key}", float(precision[key]))
    for key in ("runtime", "calibration_tiles", "calibration_method", "quantized_ops", "quant_format",
                "max_metric_drop"):
        if key in precision:
            client.log_param(run_id, key, _param(precision[key]))
    client.log_dict(run_id, summary, "promotion.json")
    if history.is_file():
        client.log_artifact(run_id, str(history))
    client.set_terminated(run_id)
    return run_id
