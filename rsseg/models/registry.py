"""Model registry (timm-style) and the contract every registered model fulfils.

A builder is registered with `@register_model("name")` and called by `create_model`, which checks the
arguments once so builders can trust them. Every model is a `SegmentationModel`: one input tensor in,
one logits tensor out at input resolution, channels laid out as the `outputs` groups say.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from rsseg.errors import ConfigError
from rsseg.spec import DEFAULT_ENCODER, TASKS, OutputGroup

log = logging.getLogger(__name__)

Builder = Callable[..., "SegmentationModel"]

_MODELS: dict[str, Builder] = {}
_TASKS: dict[str, tuple[str, ...]] = {}
_OPTIONS: dict[str, type] = {}  # builders that take their options as one dataclass, `options=`
_ENCODERS: dict[str, str] = {}  # the encoder each architecture is built with when none is named

# Arguments create_model passes to every builder itself; everything else is an architecture kwarg.
_COMMON_ARGS = ("encoder", "in_channels", "outputs", "pretrained_path")


class SegmentationModel(nn.Module):
    """Base class: holds `stride`, `outputs`, `in_channels` and checks the input before `forward_logits`.

    Subclasses set `encoder` (the timm feature extractor) and implement `forward_logits`. A model with
    auxiliary heads for deep supervision (trained with them, served without) also implements
    `forward_train` and lists each auxiliary output's loss weight in `aux_weights`.
    """

    def __init__(self, in_channels: int, outputs: Sequence[OutputGroup], stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.outputs = list(outputs)
        self.stride = int(stride)
        self.aux_weights: list[float] = []
        # Set by training only: a train-mode forward then returns (logits, aux logits...). Everything else
        # (validation, export, serving) gets the one logits tensor, so the auxiliary heads never ship.
        self.emit_aux = False

    @property
    def out_channels(self) -> int:
        return sum(g.channels for g in self.outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        self.check_input(x)
        if self.training and self.emit_aux and self.aux_weights:
            logits, aux = self.forward_train(x)
            return (logits, *aux)
        return self.forward_logits(x)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the auxiliary logits (same channel layout, any resolution), one per `aux_weights`."""
        return self.forward_logits(x), []

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ConfigError with the fix when `x` cannot go through the model; no-op while exporting."""
        # Python-side checks would be baked into (or break) traced/exported graphs.
        if (
            torch.jit.is_tracing()
            or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export()
            or torch.compiler.is_compiling()
        ):
            return
        if x.ndim != 4:
            raise ConfigError(f"model input must be (N, C, H, W); got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ConfigError(
                f"model input has {x.shape[1]} channels but the model was built for {self.in_channels}; "
                "give the bands the model was trained on (change models take both dates concatenated)"
            )
        for what, size in (("height", int(x.shape[2])), ("width", int(x.shape[3]))):
            if size % self.stride:
                lower = size // self.stride * self.stride
                upper = lower + self.stride
                fix = f"pad or crop to {lower} or {upper}" if lower else f"pad to {upper}"
                raise ConfigError(f"input {what} {size} is not a multiple of {self.stride}; {fix}")


def register_model(name: str, tasks: Sequence[str] = ("binary", "multiclass"), options: type | None = None,
                   default_encoder: str = DEFAULT_ENCODER) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under `name`, for the dataset tasks it can serve. With `options` (a
    dataclass) the builder takes the architecture options as one `options=` instance of it, so several
    builders share one definition of their options; otherwise its keyword arguments are the options.
    `default_encoder`: the timm encoder it is built with when the user names none (the paper's)."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"register_model({name!r}): unknown task(s) {unknown}; known: {TASKS}")

    def decorator(fn: Builder) -> Builder:
        if name in _MODELS and _MODELS[name] is not fn:
            raise ValueError(f"model {name!r} is registered twice ({_MODELS[name].__module__} and {fn.__module__})")
        _MODELS[name] = fn
        _TASKS[name] = tuple(tasks)
        _ENCODERS[name] = default_encoder
        if options is not None:
            _OPTIONS[name] = options
        return fn

    return decorator


def list_models() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(_MODELS)


def model_tasks(architecture: str) -> tuple[str, ...]:
    """Dataset tasks an architecture serves (e.g. ("change",) for siamese_unet)."""
    _builder(architecture)
    return _TASKS[architecture]


def default_encoder(architecture: str) -> str:
    """The timm encoder an architecture is built with when none is named."""
    _builder(architecture)
    return _ENCODERS[architecture]


def model_kwargs(architecture: str) -> dict[str, Any]:
    """Architecture kwargs a builder accepts, with their defaults."""
    builder = _builder(architecture)
    if architecture in _OPTIONS:
        return {f.name: _field_default(f) for f in dataclasses.fields(_OPTIONS[architecture])}
    sig = inspect.signature(builder)
    return {
        n: (None if p.default is inspect.Parameter.empty else p.default)
        for n, p in sig.parameters.items()
        if n not in _COMMON_ARGS and p.kind is not inspect.Parameter.VAR_KEYWORD
    }


def create_model(
    architecture: str,
    encoder: str,
    in_channels: int,
    outputs: Sequence[OutputGroup | dict[str, Any]],
    pretrained_path: str | None = None,
    **arch_kwargs: Any,
) -> SegmentationModel:
    """Build a registered model.

    Args:
        architecture: registry name (see `list_models()`).
        encoder: timm model name supporting `features_only`.
        in_channels: input bands (change models: 2 * bands, date A first).
        outputs: output groups; logits channels are their concatenation, in order.
        pretrained_path: local encoder weights (.pth/.safetensors); None or "" = random init.
        **arch_kwargs: architecture options (None values are dropped, so defaults apply).

    Returns:
        The model, in train mode, on CPU.
    """
    builder = _builder(architecture)
    if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
        raise ConfigError(f"in_channels must be a positive integer, got {in_channels!r}")
    groups = normalize_outputs(outputs)
    if pretrained_path is not None and not str(pretrained_path).strip():
        pretrained_path = None  # "" is how CLIs and MLflow params say "not set"
    kwargs = {k: v for k, v in arch_kwargs.items() if v is not None}
    accepted = model_kwargs(architecture)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"architecture {architecture!r} does not take {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(accepted)) or 'no options'}"
        )
    if architecture in _OPTIONS:
        kwargs = {"options": _OPTIONS[architecture](**kwargs)}
    model = builder(encoder=encoder, in_channels=in_channels, outputs=groups, pretrained_path=pretrained_path, **kwargs)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "built %s/%s: %d input channels, outputs %s, stride %d, %.2f M parameters",
        architecture, encoder, in_channels, [(g.name, g.channels) for g in groups], model.stride, n_params / 1e6,
    )
    return model


def normalize_outputs(outputs: Sequence[OutputGroup | dict[str, Any]]) -> list[OutputGroup]:
    """OutputGroups from groups or dicts; non-empty, unique names, positive channel counts."""
    if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence) or not outputs:
        raise ConfigError(f"outputs must be a non-empty list of OutputGroup(name, channels), got {outputs!r}")
    groups: list[OutputGroup] = []
    for g in outputs:
        if isinstance(g, dict):
            try:
                g = OutputGroup(**g)
            except TypeError:
                raise ConfigError(f"output group {g!r} must have exactly the keys name and channels") from None
        if not isinstance(g, OutputGroup):
            raise ConfigError(f"output group {g!r} is not an OutputGroup(name, channels)")
        if not isinstance(g.channels, int) or g.channels < 1:
            raise ConfigError(f"output group {g.name!r} has {g.channels!r} channels; it needs at least 1")
        groups.append(g)
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ConfigError(f"output group names must be unique, got {names}")
    return groups


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _builder(architecture: str) -> Builder:
    try:
        return _MODELS[architecture]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown architecture {architecture!r}; valid names: {', '.join(list_models())}"
        ) from None
