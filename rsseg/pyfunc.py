"""A registered version as MLflow's own tools use it: a pyfunc model on raw tiles, weights without pickle.

`mlflow.pyfunc.load_model("models:/NAME@champion").predict(tiles)` takes what the served ensemble takes, raw
tiles [N, H, W, C] in the spec's dtype and bands (H and W multiples of the model's stride), and returns the
class maps [N, G, H, W] uint8 (one per output group); params `probabilities=True` returns
{"class_map": ..., "probabilities": fp16 [N, K, H, W]} and `tta` (none, flips, d4) averages views. The
normalisation, the heads and the view averaging are the code the server ships (rsseg.data.transforms,
rsseg.heads, rsseg.averaging). The logged model holds a state dict (loaded with weights_only=True) and the
model spec; the architecture is rebuilt by name from the spec, so nothing is unpickled. MLflow loads it from
code (rsseg/pyfunc_model.py), not from a pickled object.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch

from rsseg import averaging, heads
from rsseg.data.transforms import normalize
from rsseg.errors import ConfigError
from rsseg.spec import ModelSpec

WEIGHTS = "weights"  # artifact keys of the logged model
SPEC = "model_spec"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")


def model_from_weights(spec: ModelSpec, weights: str | Path) -> torch.nn.Module:
    """The architecture `spec` names, random init, then the state dict at `weights` (weights_only: no code
    runs while loading); eval mode, CPU."""
    from rsseg.models.registry import create_model

    model = create_model(spec.architecture, spec.encoder, spec.in_channels, spec.outputs, **spec.options)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()


def save_weights(model: torch.nn.Module, path: Path) -> Path:
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return path


def signature(spec: ModelSpec) -> Any:
    """Dynamic N, H, W in the spec's dtype and bands; class maps out; params tta and probabilities."""
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(spec.dataset.dtype), (-1, -1, -1, spec.in_channels))]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, len(spec.outputs), -1, -1))]),
        params=ParamSchema([ParamSpec("tta", "string", "none"), ParamSpec("probabilities", "boolean", False)]),
    )


def input_example(spec: ModelSpec) -> np.ndarray:
    side = spec.stride * 2  # small: MLflow stores the example as JSON
    return np.zeros((1, side, side, spec.in_channels), dtype=spec.dataset.dtype)


def predict_tiles(model: torch.nn.Module, spec: ModelSpec, tiles: np.ndarray, tta: str = "none",
                  probabilities: bool = False) -> np.ndarray | dict[str, np.ndarray]:
    """Raw [N, H, W, C] tiles -> class maps [N, G, H, W] uint8 (and fp16 probabilities on request), computed as
    the served ensemble computes them."""
    tiles = np.asarray(tiles)
    if tiles.ndim == 3:
        tiles = tiles[None]
    if tiles.ndim != 4 or tiles.shape[-1] != spec.in_channels:
        raise ConfigError(f"tiles must be [N, H, W, {spec.in_channels}] raw {spec.dataset.dtype} pixels (the model's "
                          f"bands, channels last), got shape {list(tiles.shape)}")
    batch = np.stack([normalize(t, spec.dataset) for t in tiles])

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).float().numpy()

    averaged = averaging.average_logits([logits], batch, tta)
    groups = [(g.name, g.channels) for g in spec.outputs]
    maps = heads.class_maps(averaged, groups)
    if not probabilities:
        return maps
    return {"class_map": maps, "probabilities": heads.probabilities(averaged, groups)}


class TileSegmenter(mlflow.pyfunc.PythonModel):
    """The pyfunc model; MLflow builds it from code (pyfunc_model.py) and calls load_context with the logged
    artifacts."""

    # The logged signature is the schema: MLflow's type-hint validation (and its warning that predict has no
    # hints) would infer another one.
    _skip_type_hint_validation = True

    def load_context(self, context):
        self.spec = ModelSpec.load(context.artifacts[SPEC])
        self.model = model_from_weights(self.spec, context.artifacts[WEIGHTS])

    def predict(self, context, model_input, params=None):
        params = params or {}
        tta = str(params.get("tta") or "none")
        wanted = params.get("probabilities", False)
        return predict_tiles(self.model, self.spec, model_input, tta=tta,
                             probabilities=wanted in (True, "true", "True", 1))
