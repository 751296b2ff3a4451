"""The Triton model repository: configs generated from the model spec, numbered versions, rollback.

For a promoted model NAME the repository holds Python-backend models NAME-preprocess (DALI),
NAME-segmenter (ONNX Runtime or OpenVINO) and NAME-postprocess, tied by the ensemble NAME; for 3-band uint8 models
also NAME-decode and the ensemble NAME-files, which take encoded image files. Every change is made on a
staged copy and swapped in whole (rsseg.serving.transaction): `triton_repo/` is never half-written.

The staged copy shares nothing that it rewrites with the live repository: files inside version folders
(model code, ONNX files, specs) are never written again once staged, so they are hard-linked; every
other file (configs, history, README) is copied, and rewritten in the copy by rename.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from rsseg import averaging as averaging_module
from rsseg import contract, faults
from rsseg import heads as heads_module
from rsseg import runtimes as runtimes_module
from rsseg.atomic import write_text_atomically
from rsseg.errors import ConfigError
from rsseg.spec import ModelSpec

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).resolve().parent / "triton_models"
HISTORY_FILE = "history.json"
SPEC_FILE = "model_spec.json"
ONNX_FILE = "model.onnx"
KEEP_VERSIONS = 3  # the served version and two to roll back to


@dataclass(frozen=True)
class ServingOptions:
    instance_kind: str = "cpu"  # "cpu" or "gpu": KIND_CPU / KIND_GPU for preprocess and segmenter
    max_batch_size: int = 8
    instances: int = 1
    tta: str = "none"
    queue_delay_us: int = 2000
    intra_op_threads: int = 0  # the segmenter's runtime's intra-op threads (0: the runtime's default)
    runtime: str = "onnxruntime"  # what computes the segmenter's ONNX files (rsseg.runtimes)

    def __post_init__(self) -> None:
        if self.instance_kind not in ("cpu", "gpu"):
            raise ConfigError(f"instance kind must be cpu or gpu, got {self.instance_kind!r}")
        if self.max_batch_size < 1:
            raise ConfigError(f"max batch size must be at least 1, got {self.max_batch_size}")
        if self.intra_op_threads < 0:
            raise ConfigError(f"intra-op threads must be 0 (the runtime's default) or more, got {self.intra_op_threads}")
        try:
            runtimes_module.check_runtime(self.runtime, self.instance_kind == "gpu")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


step_names = contract.step_names


def onnx_files(spec: ModelSpec) -> list[str]:
    """The ONNX files of a version's segmenter: model.onnx, or one per ensemble member, in member order."""
    return [f"member{i}.onnx" for i in range(len(spec.members))] if spec.members else [ONNX_FILE]


def served_onnx(segmenter_version: Path) -> list[Path]:
    """The ONNX files a staged or served segmenter version folder runs (read from its spec)."""
    return [segmenter_version / f for f in onnx_files(ModelSpec.load(segmenter_version / SPEC_FILE))]


def accepts_files(spec: ModelSpec) -> bool:
    """Encoded image files decode to 8-bit RGB: only such models get the NAME-files ensemble."""
    return spec.dataset.task != "change" and spec.dataset.dtype == "uint8" and spec.in_channels == 3


def max_message_bytes(spec: ModelSpec, options: ServingOptions) -> int:
    """The largest request or response a client may send or get: a full batch of the largest tile,
    raw input or fp16 probabilities, whichever is bigger (plus headroom for framing)."""
    side = max(spec.tile_sizes)
    pixels = options.max_batch_size * side * side
    request = pixels * spec.in_channels * np.dtype(spec.dataset.dtype).itemsize
    response = pixels * (spec.num_output_channels * 2 + len(spec.outputs))
    return max(request, response) + (1 << 20)


def model_configs(name: str, spec: ModelSpec, version: int, options: ServingOptions) -> dict[str, str]:
    """config.pbtxt text for every model of a promoted NAME, all pinned to `version`."""
    names = step_names(name)
    channels, classes, groups = spec.in_channels, spec.num_output_channels, len(spec.outputs)
    kind = "KIND_GPU" if options.instance_kind == "gpu" else "KIND_CPU"
    dtype = contract.INPUT_TYPES[spec.dataset.dtype]
    mean = [*spec.dataset.mean] * (channels // spec.dataset.num_bands)
    std = [*spec.dataset.std] * (channels // spec.dataset.num_bands)
    common = dict(version=version, max_batch=options.max_batch_size, delay=options.queue_delay_us)

    configs = {
        names["preprocess"]: _python_config(
            names["preprocess"], inputs=[(contract.TILES, dtype, [-1, -1, channels])],
            outputs=[(contract.NORMALISED, "TYPE_FP32", [channels, -1, -1])], kind=kind, count=options.instances,
            parameters={"source": "tiles", "dtype": spec.dataset.dtype, "mean": json.dumps(mean),
                        "std": json.dumps(std)}, **common),
        names["segmenter"]: _python_config(
            names["segmenter"], inputs=[(contract.NORMALISED, "TYPE_FP32", [channels, -1, -1])],
            outputs=[(contract.LOGITS, "TYPE_FP32", [classes, -1, -1])], kind=kind, count=options.instances,
            parameters={"models": json.dumps(onnx_files(spec)), "tta": options.tta,
                        "intra_op_threads": str(options.intra_op_threads), "runtime": options.runtime}, **common),
        names["postprocess"]: _python_config(
            names["postprocess"], inputs=[(contract.LOGITS, "TYPE_FP32", [classes, -1, -1])],
            outputs=_output_tensors(groups, classes), kind="KIND_CPU",
            count=options.instances, parameters={"outputs": json.dumps([[g.name, g.channels] for g in spec.outputs])},
            **common),
    }
    serving_spec = {**spec.to_dict(), "triton": {"version": version, "max_batch_size": options.max_batch_size,
                                                 "max_message_bytes": max_message_bytes(spec, options),
                                                 "instance_kind": options.instance_kind, "tta": options.tta}}
    configs[name] = _ensemble_config(name, names["preprocess"], (contract.TILES, dtype, [-1, -1, channels]),
                                     names, groups, classes, version, options.max_batch_size, serving_spec)
    if accepts_files(spec):
        configs[names["decode"]] = _python_config(
            names["decode"], inputs=[(contract.IMAGES, "TYPE_UINT8", [-1])],
            outputs=[(contract.NORMALISED, "TYPE_FP32", [channels, -1, -1])], kind=kind, count=options.instances,
            parameters={"source": "encoded", "dtype": "uint8", "mean": json.dumps(mean), "std": json.dumps(std)},
            **common)
        configs[names["files"]] = _ensemble_config(names["files"], names["decode"], (contract.IMAGES, "TYPE_UINT8", [-1]),
                                                   names, groups, classes, version, options.max_batch_size,
                                                   serving_spec)
    return configs


def model_files(name: str, spec: ModelSpec) -> dict[str, dict[str, Path | None]]:
    """Per model: files of a version folder (source path to copy; None for files written separately)."""
    names = step_names(name)
    io = {"triton_io.py": MODELS_DIR / "triton_io.py", "contract.py": Path(contract.__file__)}
    heads = {"heads.py": Path(heads_module.__file__)}
    averaging = {"averaging.py": Path(averaging_module.__file__)}
    runtimes = {"runtimes.py": Path(runtimes_module.__file__)}
    files: dict[str, dict[str, Path | None]] = {
        names["preprocess"]: {"model.py": MODELS_DIR / "preprocess.py", **io},
        names["segmenter"]: {"model.py": MODELS_DIR / "segmenter.py", **averaging, **runtimes, **heads, **io,
                               **dict.fromkeys(onnx_files(spec)), SPEC_FILE: None},
        names["postprocess"]: {"model.py": MODELS_DIR / "postprocess.py", **heads, **io},
        name: {},
    }
    if accepts_files(spec):
        files[names["decode"]] = {"model.py": MODELS_DIR / "preprocess.py", **io}
        files[names["files"]] = {}
    return files


def read_history(repo: Path, name: str) -> dict[str, Any]:
    path = repo / name / HISTORY_FILE
    if not path.is_file():
        return {"served": None, "stack": [], "versions": {}}
    return json.loads(path.read_text())


def stage_promotion(repo: Path, staging: Path, name: str, spec: ModelSpec, onnx_path: Path | list[Path],
                    options: ServingOptions, record: dict[str, Any]) -> int:
    """Into `staging` (a fresh folder): a copy of `repo` plus a new version of NAME, served. `onnx_path`: the
    model, or an ensemble's members in the order of `spec.members` (the segmenter averages their logits).

    Returns the new Triton version number. `repo` itself is not touched.
    """
    _copy_repo(repo, staging)
    faults.point("staging-copied")
    history = read_history(staging, name)
    version = max([0, *map(int, history["versions"])]) + 1
    for model, files in model_files(name, spec).items():
        folder = staging / model / str(version)
        folder.mkdir(parents=True, exist_ok=False)
        for target, source in files.items():
            if source is not None:
                shutil.copyfile(source, folder / target)
    segmenter = staging / step_names(name)["segmenter"] / str(version)
    paths = [onnx_path] if isinstance(onnx_path, Path) else list(onnx_path)
    files = onnx_files(spec)
    if len(paths) != len(files):
        raise ConfigError(f"{name}: {len(paths)} ONNX file(s) for a spec with {len(files)} model(s)")
    for path, file in zip(paths, files, strict=True):
        shutil.copyfile(path, segmenter / file)
    spec.save(segmenter / SPEC_FILE)
    history["versions"][str(version)] = {
        **record, "onnx_sha256": ",".join(sha256(p) for p in paths), "options": options.__dict__,
        "staged_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    history["stack"].append(version)
    faults.point("version-staged")
    _serve(staging, name, spec, version, options, history)
    _prune(staging, name, history)
    return version


def stage_rollback(repo: Path, staging: Path, name: str) -> int:
    """Into `staging`: a copy of `repo` serving the version NAME served before the current one."""
    _copy_repo(repo, staging)
    history = read_history(staging, name)
    if len(history["stack"]) < 2:
        raise ConfigError(f"{repo / name}: no earlier version to roll back to (promoted: {history['stack'] or 'none'})")
    history["stack"].pop()
    previous = history["stack"][-1]
    spec = ModelSpec.load(staging / step_names(name)["segmenter"] / str(previous) / SPEC_FILE)
    options = ServingOptions(**history["versions"][str(previous)]["options"])
    _serve(staging, name, spec, previous, options, history)
    return previous


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _serve(repo: Path, name: str, spec: ModelSpec, version: int, options: ServingOptions,
           history: dict[str, Any]) -> None:
    for model, text in model_configs(name, spec, version, options).items():
        (repo / model).mkdir(parents=True, exist_ok=True)
        write_text_atomically(repo / model / "config.pbtxt", text)
    # A files ensemble left from a version that had one would point at the wrong spec: drop it.
    if not accepts_files(spec):
        for model in (step_names(name)["decode"], step_names(name)["files"]):
            shutil.rmtree(repo / model, ignore_errors=True)
    history["served"] = version
    write_text_atomically(repo / name / HISTORY_FILE, json.dumps(history, indent=2) + "\n")


def _prune(repo: Path, name: str, history: dict[str, Any]) -> None:
    keep = set(history["stack"][-KEEP_VERSIONS:])
    for version in list(history["versions"]):
        if int(version) not in keep:
            for model in {*step_names(name).values(), name}:
                shutil.rmtree(repo / model / version, ignore_errors=True)
            del history["versions"][version]
    history["stack"] = [v for v in history["stack"] if v in keep]
    write_text_atomically(repo / name / HISTORY_FILE, json.dumps(history, indent=2) + "\n")


def _copy_repo(repo: Path, staging: Path) -> None:
    if staging.exists() and any(staging.iterdir()):
        raise ConfigError(f"{staging}: staging folder is not empty")
    staging.mkdir(parents=True, exist_ok=True)
    if repo.is_dir():
        _copy_tree(repo, staging, depth=0)


def _copy_tree(source: Path, target: Path, depth: int) -> None:
    """Depth 0 is the repository, 1 a model folder, 2 and below a version folder: only files there are
    hard-linked (never rewritten); everything above is copied."""
    for item in source.iterdir():
        if item.is_dir() and not item.is_symlink():
            (target / item.name).mkdir()
            _copy_tree(item, target / item.name, depth + 1)
        elif depth >= 2:
            _link_or_copy(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name, follow_symlinks=False)


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def _python_config(name: str, *, inputs, outputs, kind: str, count: int, parameters: dict[str, str],
                   version: int, max_batch: int, delay: int) -> str:
    return "\n".join([
        f'name: "{name}"',
        'backend: "python"',
        f"max_batch_size: {max_batch}",
        *(_tensor("input", *t) for t in inputs),
        *(_tensor("output", *t) for t in outputs),
        f"instance_group [{{ kind: {kind} count: {count} }}]",
        f"dynamic_batching {{ max_queue_delay_microseconds: {delay} }}",
        f"version_policy: {{ specific: {{ versions: [{version}] }} }}",
        *(_parameter(k, v) for k, v in parameters.items()),
    ]) + "\n"


def _output_tensors(groups: int, classes: int) -> list[tuple[str, str, list[int]]]:
    """CLASS_MAP [G, H, W] (one map per output group) and PROBABILITIES [K, H, W]."""
    channels = {contract.CLASS_MAP: groups, contract.PROBABILITIES: classes}
    return [(name, config_type, [channels[name], -1, -1]) for name, (config_type, _) in contract.OUTPUT_TYPES.items()]


def _ensemble_config(name: str, first: str, input_tensor: tuple, names: dict[str, str], groups: int, classes: int,
                     version: int, max_batch: int, serving_spec: dict[str, Any]) -> str:
    input_name = input_tensor[0]
    return "\n".join([
        f'name: "{name}"',
        'platform: "ensemble"',
        f"max_batch_size: {max_batch}",
        _tensor("input", *input_tensor),
        *(_tensor("output", *t) for t in _output_tensors(groups, classes)),
        "ensemble_scheduling { step [",
        f'  {{ model_name: "{first}" model_version: -1 input_map {{ key: "{input_name}" value: "{input_name}" }}'
        f' output_map {{ key: "{contract.NORMALISED}" value: "input" }} }},',
        f'  {{ model_name: "{names["segmenter"]}" model_version: -1 input_map {{ key: "{contract.NORMALISED}" value: "input" }}'
        f' output_map {{ key: "{contract.LOGITS}" value: "logits" }} }},',
        f'  {{ model_name: "{names["postprocess"]}" model_version: -1 input_map {{ key: "{contract.LOGITS}" value: "logits" }}'
        f' output_map {{ key: "{contract.CLASS_MAP}" value: "{contract.CLASS_MAP}" }}'
        f' output_map {{ key: "{contract.PROBABILITIES}" value: "{contract.PROBABILITIES}" }} }}',
        "] }",
        f"version_policy: {{ specific: {{ versions: [{version}] }} }}",
        _parameter("model_spec", json.dumps(serving_spec, sort_keys=True)),
    ]) + "\n"


def _tensor(kind: str, name: str, dtype: str, dims: list[int]) -> str:
    return f'{kind} [{{ name: "{name}" data_type: {dtype} dims: {json.dumps(dims)} }}]'


def _parameter(key: str, value: str) -> str:
    # Protobuf text format takes UTF-8 in strings but not JSON's \uXXXX escapes.
    return f"parameters {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(value, ensure_ascii=False)} }} }}"
