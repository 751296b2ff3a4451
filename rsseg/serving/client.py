"""Small conveniences over rsseg.client.triton for promotion checks, tests and the main job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from rsseg.client.triton import TritonSegmenter, make_client, served_spec_dict

# Large enough to read the config (which carries the spec) before we know the served limit.
_BOOTSTRAP_MESSAGE_BYTES = 64 << 20


def connect(url: str, max_message_bytes: int = _BOOTSTRAP_MESSAGE_BYTES) -> Any:
    """A gRPC client whose message limits are raised deliberately (gRPC's 4 MB default bites)."""
    return make_client(grpcclient, "grpc", url, max_message_bytes)


def served_spec(client: Any, model: str) -> dict[str, Any]:
    """The model spec a promoted ensemble carries in its config parameters (plus a `triton` section)."""
    return served_spec_dict(client, model)


def infer_tiles(url: str, model: str, tiles: np.ndarray, *, probabilities: bool = False,
                tta: str | None = None) -> Any:
    """[N, H, W, C] raw tiles -> [N, G, H, W] uint8 class maps (and [N, K, H, W] fp16 probabilities)."""
    with TritonSegmenter([url], model, retries=0, max_in_flight=1) as segmenter:
        names = ("CLASS_MAP", "PROBABILITIES") if probabilities else ("CLASS_MAP",)
        out = segmenter.infer(tiles, names, tta)
    return (out["CLASS_MAP"], out["PROBABILITIES"]) if probabilities else out["CLASS_MAP"]


def ask_server_once(repo: Path, model: str, tile: np.ndarray) -> str:
    """Start tritonserver on `repo` (loopback), segment one raw tile, stop; the answer as text."""
    from rsseg.serving.server import TritonServer

    with TritonServer(repo) as server:
        server.wait_model_ready(model)
        with connect(server.grpc_url) as client:
            spec = served_spec(client, model)
        maps = infer_tiles(server.grpc_url, model, tile[None])[0]
    lines = [f"tritonserver {server.grpc_url} served {model} v{spec['model_version']} "
             f"(Triton version {spec['triton']['version']}) for one {tile.shape[0]}x{tile.shape[1]} tile:"]
    names = spec["dataset"]["classes"] if spec["dataset"]["task"] != "change" else ["unchanged", "changed"]
    counts = np.bincount(maps[0].ravel(), minlength=len(names))
    total = int(counts.sum())
    lines += [f"  {name:<12} {int(n):>8} px  {100 * n / total:5.1f} %" for name, n in zip(names, counts, strict=False)]
    return "\n".join(lines)
