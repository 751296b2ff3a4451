"""Training checkpoints (`last.pt`): written atomically, read back with torch's weights-only unpickler so a
checkpoint never runs code, with the best-so-far figures and every RNG state a resumed run needs to repeat."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsseg.errors import ConfigError, first_line
from rsseg.plots import Overlay

# Checkpoints hold only what torch.load(weights_only=True) accepts (tensors, numbers, strings, lists,
# tuples, dicts), so loading one never runs code: numpy state travels as lists and tensors.
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "best_value", "best_epoch", "best_state", "best",
                    "history", "rng")


def state_on_cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of `module`'s weights on the CPU that later training steps do not change."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def rng_state() -> dict[str, Any]:
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {"python": random.getstate(), "numpy": (name, key.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])


def best_to_checkpoint(best: dict[str, Any]) -> dict[str, Any]:
    if not best:
        return {}
    return {"metrics": best["metrics"], "confusion": torch.from_numpy(np.asarray(best["confusion"])),
            "overlays": [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in vars(o).items()}
                         for o in best["overlays"]]}


def best_from_checkpoint(saved: dict[str, Any]) -> dict[str, Any]:
    if not saved:
        return {}
    return {"metrics": saved["metrics"], "confusion": saved["confusion"].numpy(),
            "overlays": [Overlay(**{k: v.numpy() for k, v in o.items()}) for o in saved["overlays"]]}


def _unpickling_reason(exc: Exception) -> str:
    """The one line of torch's weights-only refusal that says what was refused (its other lines are advice)."""
    lines = [line.strip() for line in str(exc).splitlines()[1:]]
    useful = [line for line in lines if line and not line.startswith(("Please file an issue", "Check the documentation"))]
    return (useful[0] if useful else str(exc).splitlines()[0])[:200]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a run killed mid-save keeps the previous checkpoint


def load_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint's contents, unpickled with weights_only=True: a file that would run code or build any
    other object is refused in one line, before anything in it is executed."""
    if not Path(path).is_file():
        raise ConfigError(f"resume: checkpoint {path} not found; give the last.pt of an earlier run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _unpickling_reason(exc)
        if "GLOBAL" in reason:  # a class or function to import and call
            raise ConfigError(f"resume: {path} holds objects other than tensors and plain values ({reason}); it was "
                              "not loaded (it could run code): resume only from last.pt files this version of "
                              "rsseg wrote") from None
        raise ConfigError(f"resume: {path} is not a readable checkpoint ({reason}); give the last.pt of an "
                          "earlier run") from None
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise ConfigError(f"resume: {path} is not a readable checkpoint ({first_line(exc)}); "
                          "give the last.pt of an earlier run") from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ConfigError(f"resume: {path} is not an rsseg training checkpoint (no {', '.join(missing)}); give "
                          "the last.pt of an earlier run")
    return state
