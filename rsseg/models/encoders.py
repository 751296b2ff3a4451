"""timm feature extractors as encoders: level discovery, construction, local weight loading.

Decoders size themselves from `encoder.feature_info.channels()` / `.reduction()`; nothing here knows a
channel count. Weights never come from the network: `pretrained_path` is a local file or nothing.
"""

from __future__ import annotations

import difflib
import logging
import socket
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from torch import nn

from rsseg.errors import ConfigError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Level:
    """One feature level timm offers: its out_index, channels and reduction (stride w.r.t. input)."""

    index: int
    channels: int
    reduction: int


PRETRAINED_TAGS = ("imagenet", "pretrained")  # encoder_weights values meaning "timm's pretrained weights"
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm publishes per model on the Hugging Face hub


def resolve_encoder_weights(value: str | None, encoder: str) -> str | None:
    """The local weights file that `encoder_weights` names: None for "" (random init), the file for a path,
    and for "imagenet" timm's pretrained weights of `encoder` from the Hugging Face cache, downloading
    them when the hub is reachable. Offline and not cached: ConfigError saying so, before any training."""
    if value is None or not str(value).strip():
        return None
    if str(value).strip().lower() not in PRETRAINED_TAGS:
        return str(value)
    check_encoder_name(encoder)
    cfg = timm.models.get_pretrained_cfg(encoder)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise ConfigError(f"encoder_weights={value}: timm publishes no pretrained weights for {encoder!r}; "
                          "give a local weights file or leave encoder_weights empty")
    import huggingface_hub  # timm's own dependency; imported here so the models load without touching it
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    for filename in HUB_FILES:
        try:
            return huggingface_hub.hf_hub_download(repo, filename, local_files_only=True)
        except (LocalEntryNotFoundError, OSError, ValueError):
            pass
    problem = "the hub is marked offline (HF_HUB_OFFLINE)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
    # huggingface_hub retries a dead network for about 25 s per file: ask the socket once, quickly, first
    problem = problem or _unreachable(huggingface_hub.constants.ENDPOINT)
    if not problem:
        for filename in HUB_FILES:
            try:
                return huggingface_hub.hf_hub_download(repo, filename, etag_timeout=10)
            except (HfHubHTTPError, OSError, ValueError) as exc:
                problem = f"the download failed ({type(exc).__name__}: {first_line(str(exc))})"
    raise ConfigError(
        f"encoder_weights={value}: timm's weights for {encoder} ({repo}) are not in the local Hugging Face cache "
        f"and {problem or 'could not be downloaded'}; on a machine online run `python -c \"import timm; "
        f"timm.create_model('{encoder}', pretrained=True)\"` and copy its cache (HF_HOME), or give a local file"
    )


def _unreachable(endpoint: str, timeout: float = 3.0) -> str:
    """"" when a TCP connection to the endpoint's host opens within `timeout`, else why not."""
    url = urllib.parse.urlparse(endpoint)
    host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host} is unreachable from this machine ({type(exc).__name__})"
    return ""


def check_encoder_name(name: str) -> None:
    """ConfigError naming `name` (and close matches) when timm has no such model."""
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise ConfigError(f"unknown timm encoder {name!r}{hint}")


def feature_levels(name: str, in_channels: int, encoder_kwargs: dict[str, Any] | None = None) -> list[Level]:
    """The feature levels timm's `features_only` offers for `name` by default, shallow to deep.

    Built on the meta device: no memory, next to no time.
    """
    with torch.device("meta"):
        probe = _timm_features(name, in_channels, None, encoder_kwargs)
    info = probe.feature_info
    return [Level(i, c, r) for i, c, r in zip(info.out_indices, info.channels(), info.reduction())]


def dilated_encoder_kwargs(name: str, in_channels: int, output_stride: int | None,
                           encoder_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """`encoder_kwargs` plus timm's `output_stride` (dilated last stages) for the models that want dense deep
    features (PSPNet, DANet): `output_stride` if the encoder supports it, else 16, else the encoder's own
    strides (HRNet keeps a high-resolution branch its own way). None = the encoder's own strides."""
    kwargs = dict(encoder_kwargs or {})
    if output_stride is None or "output_stride" in kwargs:
        return kwargs
    if output_stride not in (8, 16, 32):
        raise ConfigError(f"output_stride must be 8, 16 or 32, got {output_stride!r}")
    for stride in sorted({output_stride, 16, 32}):
        if stride < output_stride:
            continue
        try:
            feature_levels(name, in_channels, {**kwargs, "output_stride": stride})
        except ConfigError:
            continue
        if stride != output_stride:
            log.info("encoder %s cannot dilate to output stride %d; using %d", name, output_stride, stride)
        return {**kwargs, "output_stride": stride} if stride != 32 else kwargs
    log.info("encoder %s takes no output_stride; using its own strides", name)
    return kwargs


def branch_features_kwargs(name: str, encoder_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """For timm HRNets, the raw branch outputs (18, 36, 72, 144 channels for w18 at strides 4..32, as the
    segmentation HRNets use them) instead of timm's default classification "incre" features (128..1024
    channels); other encoders unchanged."""
    kwargs = dict(encoder_kwargs or {})
    if name.startswith("hrnet_"):
        kwargs.setdefault("feature_location", "")
    return kwargs


def create_encoder(
    name: str,
    in_channels: int,
    out_indices: Sequence[int],
    pretrained_path: str | Path | None = None,
    trim: bool = True,
    encoder_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """A timm `features_only` module returning the features at `out_indices` (indices from `feature_levels`).

    Args:
        name: timm model name.
        in_channels: input bands.
        out_indices: which levels to return.
        pretrained_path: local weights to load (strict=False, counts logged); None = random init.
        trim: drop trailing blocks that no returned level needs (timm's EfficientNet/MobileNetV3
            feature classes keep and run them otherwise).
        encoder_kwargs: extra timm.create_model kwargs (e.g. drop_path_rate).

    TF "SAME" convs get static padding (see StaticSameConv2d): exact for inputs that are multiples of
    the model stride, which SegmentationModel enforces.
    """
    encoder = _timm_features(name, in_channels, tuple(out_indices), encoder_kwargs)
    if trim:
        trim_unused_blocks(encoder)
    fix_same_padding(encoder)
    if pretrained_path is not None:
        load_encoder_weights(encoder, pretrained_path)
    return encoder


class StaticSameConv2d(nn.Conv2d):
    """TF "SAME" conv with its padding fixed for inputs that are a multiple of its stride.

    timm's Conv2dSame (tf_* models) computes the padding from the input size at every call: exact, but
    torch.export / the dynamo ONNX exporter must reason about ceil() on symbolic sizes (about 4 min for
    tf_efficientnet_lite3 on a laptop CPU, and shape arithmetic in the graph). For sizes that are a
    multiple of the stride (which the model's stride check guarantees) the padding is a constant.
    """

    same_pad: tuple[int, int, int, int]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.same_pad), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def fix_same_padding(module: nn.Module) -> int:
    """Turn every timm Conv2dSame in `module` into a StaticSameConv2d (same parameters); returns the count."""
    n = 0
    for m in module.modules():
        if isinstance(m, (Conv2dSame, Conv2dSameExport)):
            (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
            ph, pw = max((kh - 1) * dh + 1 - sh, 0), max((kw - 1) * dw + 1 - sw, 0)
            # Swapping the class keeps parameter names, so checkpoints load either way.
            m.__class__ = StaticSameConv2d
            m.same_pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
            n += 1
    return n


def trim_unused_blocks(encoder: nn.Module) -> int:
    """Drop encoder blocks after the deepest returned level; returns the parameters removed.

    timm's EfficientNet/MobileNetV3 feature classes run every block and keep the outputs they need, so
    blocks past the deepest requested level are dead compute and parameters without gradients (DDP
    rejects those unless find_unused_parameters=True; torch.export adds size guards for them). Lossless
    on a trained model too: call it before export. FeatureListNet-style extractors already stop there.
    """
    blocks = getattr(encoder, "blocks", None)
    stage_idx = getattr(encoder, "_stage_out_idx", None)
    if not isinstance(blocks, nn.Sequential) or not stage_idx or getattr(encoder, "feature_hooks", None) is not None:
        return 0
    keep = max(stage_idx)  # stage s is the output of blocks[s - 1]
    if keep >= len(blocks):
        return 0
    dropped = sum(p.numel() for b in list(blocks)[keep:] for p in b.parameters())
    encoder.blocks = blocks[:keep]
    log.debug("encoder: dropped %d unused trailing blocks (%d parameters)", len(blocks) - keep, dropped)
    return dropped


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local timm checkpoint into a feature extractor, tolerating the usual key differences.

    Handles classification checkpoints (head keys ignored), timm's flattened FeatureListNet names
    ("stages.0" -> "stages_0"), FeatureGetterNet's "model." prefix, rsseg checkpoints ("encoder." prefix)
    and a stem conv with another band count (timm's adapt_input_conv). Raises ConfigError when the file is
    missing/unreadable or none of its tensors fits.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"pretrained_path {path}: file not found; give a local timm state dict (.pth/.safetensors) "
            "or leave it empty for random init"
        )
    try:
        state = timm.models.load_state_dict(str(path), device="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a bad file
        raise ConfigError(f"pretrained_path {path}: cannot read it as a state dict ({type(exc).__name__}: {exc})") from None

    target = encoder.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in state.items():
        dest = next((k for k in _candidate_keys(key) if k in target), None)
        if dest is None or not isinstance(value, torch.Tensor):
            unexpected.append(key)
            continue
        want = target[dest].shape
        if value.shape != want:
            value = _adapt_shape(value, want)
            if value is None:
                mismatched.append(f"{key} {tuple(state[key].shape)} vs {tuple(want)}")
                continue
        loaded[dest] = value
    if not loaded:
        raise ConfigError(
            f"pretrained_path {path}: none of its {len(state)} tensors fits the encoder "
            f"(first key {next(iter(state), None)!r}); is it a checkpoint of this encoder?"
        )
    encoder.load_state_dict(loaded, strict=False)
    missing = [k for k in target if k not in loaded and not k.endswith("num_batches_tracked")]
    log.info(
        "encoder weights from %s: %d tensors loaded, %d missing (random init), %d unexpected (ignored), "
        "%d shape mismatches (skipped)", path, len(loaded), len(missing), len(unexpected), len(mismatched),
    )
    if missing:
        log.warning("encoder tensors not in %s (kept random): %s", path, _preview(missing))
    if mismatched:
        log.warning("tensors of %s skipped for shape: %s", path, _preview(mismatched))


def _timm_features(
    name: str, in_channels: int, out_indices: tuple[int, ...] | None, encoder_kwargs: dict[str, Any] | None
) -> nn.Module:
    check_encoder_name(name)
    kwargs: dict[str, Any] = {
        "features_only": True,
        "in_chans": in_channels,
        "pretrained": False,  # never download; local weights go through load_encoder_weights
        # ONNX-friendly layer choices (plain activations, no fused attention).
        "exportable": True,
    }
    if out_indices is not None:
        kwargs["out_indices"] = out_indices
    if encoder_kwargs is not None and not isinstance(encoder_kwargs, dict):
        raise ConfigError(f"encoder_kwargs must be a dict of timm.create_model options, got {encoder_kwargs!r}")
    extra = dict(encoder_kwargs or {})
    clash = sorted(set(extra) & {"features_only", "in_chans", "pretrained", "out_indices"})
    if clash:
        raise ConfigError(f"encoder_kwargs may not set {', '.join(clash)}; the model sets them")
    kwargs.update(extra)
    try:
        return timm.create_model(name, **kwargs)
    except (RuntimeError, TypeError, ValueError, AssertionError, NotImplementedError) as exc:
        raise ConfigError(f"timm encoder {name!r} cannot be built as a feature extractor: {exc}") from None


def _candidate_keys(key: str) -> Iterator[str]:
    bases = [key]
    if key.startswith("encoder."):
        bases.append(key[len("encoder."):])
    for base in bases:
        yield base
        yield base.replace(".", "_", 1)  # FeatureListNet flattens top-level Sequentials: stages.0 -> stages_0
        yield "model." + base  # FeatureGetterNet wraps the whole model


def _adapt_shape(value: torch.Tensor, want: torch.Size) -> torch.Tensor | None:
    # Only the stem conv legitimately differs: same kernels, other band count.
    if value.ndim == 4 and len(want) == 4 and value.shape[0] == want[0] and value.shape[2:] == want[2:]:
        try:
            # repeat the checkpoint's bands and rescale (or sum them for one band), as timm does
            adapted = timm.models.adapt_input_conv(int(want[1]), value.float(), base_chans=int(value.shape[1]))
        except (NotImplementedError, AssertionError, RuntimeError, ValueError):
            return None
        return adapted.to(value.dtype) if adapted.shape == want else None
    return None


def _preview(items: Sequence[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
