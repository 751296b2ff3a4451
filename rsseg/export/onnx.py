"""ONNX export of rsseg models, stamped with their ModelSpec, and a parity check against PyTorch.

The graph: float32 NCHW "input" -> "logits" [N, sum(outputs.channels), H, W], batch, height and width
dynamic (H and W must be multiples of spec.stride, as for the PyTorch model). The spec JSON rides in the
file's metadata_props under "rsseg.model_spec", so an .onnx file is self-describing.

Exporter choice (measured with torch 2.14.1 on 2 shared CPU cores):

- The default torch.export-based exporter (`dynamo=True`) with dynamic H/W spends its time in symbolic
  shape reasoning during decomposition: 17 s for the tiny test UNet (5 s with static shapes) and 36 s for
  the seed UNet (tf_efficientnet_lite3). It also emits opset 18 at least: the down-conversion to 17 fails
  on ReduceMean (axes input -> attribute) and silently leaves opset 18.
- The TorchScript exporter (`dynamo=False`, `dynamic_axes`) exports the same models in 0.3 s / 0.8 s at
  opset 17, with the same parity (ONNX Runtime vs eager differ at fp32 rounding level either way).
  torch 2.14 still ships it, with a DeprecationWarning (silenced below).

So the TorchScript exporter is the default; `dynamo=True` selects the torch.export path (opset >= 18),
kept working and tested (slow) for when the TorchScript exporter is removed from torch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch

from rsseg import averaging, runtimes
from rsseg.errors import ConfigError, ExportError, first_line
from rsseg.heads import CHANGE, SEMANTIC
from rsseg.inference import class_maps, split_outputs
from rsseg.spec import ModelSpec, OutputGroup

if TYPE_CHECKING:
    import onnxruntime

log = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 17
MIN_OPSET = 17
MIN_DYNAMO_OPSET = 18  # the torch.export-based exporter cannot produce opset 17 (see module docstring)
SPEC_KEY = "rsseg.model_spec"
EXPORT_SHAPE_KEY = "rsseg.export_shape"  # the dummy input shape traced; parity checks use other shapes
DYNAMIC_DIMS = {0: "batch", 2: "height", 3: "width"}
CPU_PROVIDER = "CPUExecutionProvider"


def export_onnx(
    model: torch.nn.Module,
    spec: ModelSpec,
    path: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    export_size: int | None = None,
    dynamo: bool = False,
) -> Path:
    """Export `model` (a copy, in eval mode, float32, on CPU) to `path` as described in the module docstring.

    Args:
        model: the trained model; left untouched (a copy is exported).
        spec: its ModelSpec; in_channels and output channels must match the model. Stored in the file.
        path: destination .onnx; written under a temp name and renamed, so readers never see half a file.
        opset: ONNX opset, >= 17 (>= 18 with dynamo=True).
        export_size: H = W of the traced dummy input, a multiple of spec.stride. Default 4 * stride: the
            graph is fully convolutional and dynamic, and tracing at the tile size only costs time
            (seed UNet: 0.7 s at 64 vs 1.8 s at 512).
        dynamo: use the torch.export-based exporter instead of the TorchScript one (slower, opset >= 18).

    Returns:
        The path written. Raises ConfigError for bad arguments, ExportError when export or the ONNX checker fails.
    """
    path = Path(path)
    min_opset = MIN_DYNAMO_OPSET if dynamo else MIN_OPSET
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < min_opset:
        which = "the torch.export-based exporter (dynamo=True)" if dynamo else "export"
        raise ConfigError(f"opset {opset!r} is too old for {which}; use opset >= {min_opset}")
    stride = int(spec.stride)
    size = 4 * stride if export_size is None else export_size
    if not isinstance(size, int) or isinstance(size, bool) or size < stride or size % stride:
        raise ConfigError(f"export_size {export_size!r} must be a positive multiple of the model stride {stride}")
    _check_model_matches_spec(model, spec)

    net = copy.deepcopy(model).float().cpu().eval()
    # Batch 1 for TorchScript, so the default parity check (batch 2) also proves the batch is dynamic;
    # torch.export specialises size-1 dims, so it gets 2.
    dummy = torch.zeros(2 if dynamo else 1, spec.in_channels, size, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    start = time.perf_counter()
    try:
        if dynamo:
            _export_dynamo(net, dummy, tmp, opset, stride)
        else:
            _export_torchscript(net, dummy, tmp, opset)
        proto = onnx.load(str(tmp))
        _set_metadata(proto, {SPEC_KEY: spec.to_json(), EXPORT_SHAPE_KEY: json.dumps(list(dummy.shape))})
        onnx.save(proto, str(tmp))
        _check_onnx(tmp, spec, label=path)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "exported %s to %s (%s exporter, opset %d, traced at %s) in %.1f s, %.1f MB",
        type(model).__name__, path, "torch.export" if dynamo else "TorchScript", opset,
        "x".join(map(str, dummy.shape)), time.perf_counter() - start, path.stat().st_size / 1e6,
    )
    return path


def _check_model_matches_spec(model: torch.nn.Module, spec: ModelSpec) -> None:
    in_ch = getattr(model, "in_channels", None)
    if in_ch is not None and in_ch != spec.in_channels:
        raise ConfigError(
            f"model takes {in_ch} input channels but spec.in_channels is {spec.in_channels}; "
            "export with the model's own spec"
        )
    out_ch = getattr(model, "out_channels", None)
    if out_ch is not None and out_ch != spec.num_output_channels:
        raise ConfigError(
            f"model returns {out_ch} channels but spec.outputs sum to {spec.num_output_channels}; "
            "export with the model's own spec"
        )
    m_stride = getattr(model, "stride", None)
    if m_stride is not None and spec.stride % int(m_stride):
        raise ConfigError(f"spec.stride {spec.stride} is not a multiple of the model stride {m_stride}")


def _export_torchscript(net: torch.nn.Module, dummy: torch.Tensor, dest: Path, opset: int) -> None:
    axes = {INPUT_NAME: DYNAMIC_DIMS, OUTPUT_NAME: DYNAMIC_DIMS}
    with warnings.catch_warnings():
        # Chosen on purpose (module docstring). The Slice warning is F.pad's reversed pads in
        # StaticSameConv2d: a few unfolded constant ops that ONNX Runtime folds at load, harmless.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")  # its own internals
        warnings.filterwarnings("ignore", message=".*Only steps=1 can be constant folded.*", category=UserWarning)
        try:
            torch.onnx.export(
                net, (dummy,), str(dest), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many types; the user needs the op that failed
            raise ExportError(
                f"ONNX export (TorchScript, opset {opset}) failed: {type(exc).__name__}: {first_line(exc)}"
            ) from exc


def _export_dynamo(net: torch.nn.Module, dummy: torch.Tensor, dest: Path, opset: int, stride: int) -> None:
    from torch.export import Dim

    # H and W as stride * k: the same fact the model's input check enforces; plain Dims make
    # torch.export fail on the floor() of the strided convs.
    shapes = ({0: Dim("batch", min=1), 2: stride * Dim("h_blocks", min=1), 3: stride * Dim("w_blocks", min=1)},)
    try:
        program = torch.onnx.export(
            net, (dummy,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_shapes=shapes, optimize=True, verbose=False,
        )
        if program is None:
            raise ExportError("torch.onnx.export(dynamo=True) returned no program")
        program.save(str(dest))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(
            f"ONNX export (torch.export, opset {opset}) failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc


def _set_metadata(proto: onnx.ModelProto, values: dict[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=value)


def _check_onnx(path: Path, spec: ModelSpec, label: Path) -> None:
    """ONNX checker (full: with strict shape inference) plus the I/O contract; ExportError otherwise."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{label}: the ONNX checker rejects the exported model: {first_line(exc)}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    names = ([i.name for i in graph.input], [o.name for o in graph.output])
    if names != ([INPUT_NAME], [OUTPUT_NAME]):
        raise ExportError(
            f"{label}: exported graph has inputs/outputs {names}; expected {INPUT_NAME!r} -> {OUTPUT_NAME!r}"
        )
    for value, channels in ((graph.input[0], spec.in_channels), (graph.output[0], spec.num_output_channels)):
        dims = value.type.tensor_type.shape.dim
        static = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if len(dims) != 4 or static[1] != channels or any(static[i] is not None for i in DYNAMIC_DIMS):
            shape = [d.dim_param or d.dim_value for d in dims]
            raise ExportError(
                f"{label}: {value.name!r} has shape {shape}; "
                f"expected [batch, {channels}, height, width] with dynamic batch/H/W"
            )


def read_spec(path: str | Path) -> ModelSpec:
    """The ModelSpec stored in an exported .onnx file (ExportError when it has none)."""
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    if SPEC_KEY not in meta:
        raise ExportError(f"{path}: no {SPEC_KEY!r} in the ONNX metadata; export it with rsseg.export.export_onnx")
    return ModelSpec.from_dict(json.loads(meta[SPEC_KEY]))


def onnx_session(path: str | Path, providers: Sequence[str] | None = None) -> onnxruntime.InferenceSession:
    """An onnxruntime.InferenceSession with all graph optimisations on and default intra-op threads.

    `providers` in order of preference (default CPU only); ones this onnxruntime build lacks are dropped
    with a warning, and the CPU provider is always the last fallback. Logs the providers in use.
    """
    import onnxruntime as ort

    wanted = list(providers) if providers else [CPU_PROVIDER]
    available = set(ort.get_available_providers())
    missing = [p for p in wanted if p not in available]
    if missing:
        log.warning(
            "ONNX Runtime providers not available here, skipped: %s (available: %s)", missing, sorted(available)
        )
    chosen = [p for p in wanted if p in available]
    if CPU_PROVIDER not in chosen:
        chosen.append(CPU_PROVIDER)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
    log.info("ONNX Runtime session for %s on %s", path, session.get_providers())
    return session


@dataclass
class ParityReport:
    """ONNX Runtime vs PyTorch eager on random inputs (see check_parity)."""

    shapes: list[tuple[int, int, int, int]]  # the input shapes checked
    max_abs_diff: float  # max |logits_onnx - logits_torch| over all checks
    class_maps_equal: bool  # per-group class maps (rsseg.inference.class_maps) identical, near-ties aside
    mismatched_pixels: int  # pixels (summed over groups) whose class differs, near-ties aside
    providers: list[str]  # ONNX Runtime providers the session actually used
    # Pixels whose class flipped where PyTorch's top-2 logit margin is within 2 * max_abs_diff: such a
    # flip is explained by the (accepted) logit difference, not an export fault, so it is not counted
    # as a mismatch. Without this a seeded check could fail one model forever on one near-tie pixel.
    near_tie_flips: int = 0
    # max |logits_torch|: fp32 rounding differences grow with it (measured on CPU: ~3e-6 of it for the
    # tiny test models, ~8e-5 for the random-weight seed UNet, whose own fp32-vs-fp64 error is ~5e-5)
    max_abs_logit: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["shapes"] = [list(s) for s in self.shapes]
        return data


def check_parity(
    model: torch.nn.Module,
    onnx_path: str | Path | Sequence[str | Path],
    spec: ModelSpec,
    *,
    sizes: Sequence[int | tuple[int, int]] | None = None,
    batch: int = 2,
    seed: int = 0,
    atol: float = 1e-3,
    providers: Sequence[str] | None = None,
) -> ParityReport:
    """Run the ONNX model (ONNX Runtime) and `model` (eager, on its device) on the same random inputs.

    Args:
        sizes: input sizes, each an int (square) or (H, W), multiples of spec.stride. Default: two
            non-square sizes, (6, 8) and (5, 7) times the stride, unlike the square traced shape.
        batch: batch size of every check (export traces batch 1, so the default also tests batch).
        seed: seeds the standard-normal inputs (normalised imagery has about that distribution).
        atol: only used to log the verdict; call assert_parity to enforce it.
        providers: ONNX Runtime providers in order of preference (default CPU); the report says which ran.

    Several ONNX files: their logits averaged as the served segmenter averages them (rsseg.averaging),
    against `model` = the members' torch average (rsseg.models.ensemble.LogitAverage).
    The model's train/eval mode is restored afterwards.
    """
    stride = int(spec.stride)
    hw_list = _parity_sizes(sizes, stride)
    if not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"batch must be a positive integer, got {batch!r}")
    paths = [onnx_path] if isinstance(onnx_path, (str, Path)) else list(onnx_path)
    sessions = [onnx_session(p, providers) for p in paths]
    session = sessions[0]
    runners = [runtimes.session_runner(s) for s in sessions]
    meta = session.get_modelmeta().custom_metadata_map
    traced = json.loads(meta[EXPORT_SHAPE_KEY]) if EXPORT_SHAPE_KEY in meta else None
    used = list(session.get_providers())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    shapes: list[tuple[int, int, int, int]] = []
    max_diff, max_logit, mismatched, near_ties = 0.0, 0.0, 0, 0
    try:
        for h, w in hw_list:
            shape = (batch, spec.in_channels, h, w)
            if traced is not None and list(shape) == traced:
                log.warning("parity shape %s is the traced export shape: it does not test dynamic shapes", shape)
            x = torch.randn(shape, generator=gen)
            with torch.no_grad():
                ref = model(x.to(device)).float().cpu()
            out = torch.from_numpy(averaging.average_logits(runners, x.numpy()))
            if out.shape != ref.shape:
                raise ExportError(
                    f"{onnx_path}: ONNX output shape {tuple(out.shape)} != PyTorch {tuple(ref.shape)} for input {shape}"
                )
            diff = float((out - ref).abs().max())
            max_diff = diff if np.isnan(diff) else max(max_diff, diff)
            max_logit = max(max_logit, float(ref.abs().max()))
            flips, ties = _compare_class_maps(ref, out, spec.outputs, diff)
            mismatched += flips
            near_ties += ties
            shapes.append(shape)
    finally:
        model.train(was_training)
    report = ParityReport(
        shapes=shapes, max_abs_diff=max_diff, class_maps_equal=mismatched == 0, mismatched_pixels=mismatched,
        providers=used, near_tie_flips=near_ties, max_abs_logit=max_logit,
    )
    log.info(
        "ONNX parity of %s on %s: max |diff| %.3g (atol %g, max |logit| %.3g), %d mismatched / %d near-tie "
        "class pixels, shapes %s", ", ".join(map(str, paths)), used, max_diff, atol, max_logit, mismatched, near_ties, shapes,
    )
    return report


def check_exportable(model: torch.nn.Module, spec: ModelSpec) -> None:
    """ExportError unless `model` exports and its graph runs at a shape other than the traced one, giving
    the right output shape. Values are not compared: `train` calls this on the new, untrained model, so that
    a model promotion could never ship fails before training rather than after it."""
    import tempfile

    stride = int(spec.stride)
    with tempfile.TemporaryDirectory(prefix="rsseg-export-check-") as tmp:
        path = export_onnx(model, spec, Path(tmp) / "model.onnx", export_size=2 * stride)
        check_parity(model, path, spec, sizes=[(3 * stride, stride)], batch=1)


def assert_parity(report: ParityReport, atol: float = 1e-3, *, rtol: float = 0.0) -> None:
    """ExportError (one line with the figures) unless the class maps agree and
    max_abs_diff <= atol + rtol * max_abs_logit (rtol: for models whose logits are large, where fp32
    rounding alone exceeds a fixed atol)."""
    bound = atol + rtol * report.max_abs_logit
    if report.max_abs_diff <= bound and report.class_maps_equal:  # also False for a NaN diff
        return
    tol = f"atol {atol:g}" + (f" + rtol {rtol:g} * max |logit| {report.max_abs_logit:.3g}" if rtol else "")
    raise ExportError(
        f"ONNX parity failed: max |onnx - torch| logits diff {report.max_abs_diff:.3g} ({tol}), "
        f"{report.mismatched_pixels} class-map pixels differ, at input shapes {report.shapes} on {report.providers}"
    )


def _parity_sizes(sizes: Sequence[int | tuple[int, int]] | None, stride: int) -> list[tuple[int, int]]:
    if sizes is None:
        return [(6 * stride, 8 * stride), (5 * stride, 7 * stride)]
    if isinstance(sizes, (int, str)) or not sizes:
        raise ConfigError(f"sizes must be a non-empty list of sizes or (H, W) pairs, got {sizes!r}")
    out = []
    for s in sizes:
        hw = (s, s) if isinstance(s, int) else tuple(s)
        if len(hw) != 2 or any(not isinstance(v, int) or v < stride or v % stride for v in hw):
            raise ConfigError(f"parity size {s!r}: H and W must be positive multiples of the model stride {stride}")
        out.append((int(hw[0]), int(hw[1])))
    return out


def _compare_class_maps(
    ref: torch.Tensor, out: torch.Tensor, groups: list[OutputGroup], diff: float
) -> tuple[int, int]:
    """(flips not explained by `diff`, flips at near-ties) over all groups."""
    ref_maps, out_maps = class_maps(ref, groups), class_maps(out, groups)
    margins = _decision_margins(ref, groups)
    flips = ties = 0
    for name, ref_map in ref_maps.items():
        differs = ref_map != out_maps[name]
        # two logits moving by up to `diff` each can swap a top-2 pair closer than 2 * diff
        tie = differs & (margins[name] <= 2 * diff)
        ties += int(tie.sum())
        flips += int((differs & ~tie).sum())
    return flips, ties


def _decision_margins(logits: torch.Tensor, groups: list[OutputGroup]) -> dict[str, torch.Tensor]:
    """Per group and pixel, the top-1 minus top-2 logit of the argmax(es) deciding its class map."""
    parts = split_outputs(logits, groups)
    margins = {name: _top2_gap(part) for name, part in parts.items()}
    if CHANGE in parts:  # semantic maps depend on the change decision and argmax over classes >= 1
        for name in SEMANTIC:
            if name in parts:
                margins[name] = torch.minimum(margins[CHANGE], _top2_gap(parts[name][:, 1:]))
    return margins


def _top2_gap(part: torch.Tensor) -> torch.Tensor:
    if part.shape[1] < 2:
        return torch.full(part[:, 0].shape, float("inf"))
    top = part.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]

