"""Talking to a served ensemble: its model spec, and tiles in, class maps (and probabilities) out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from rsseg.errors import UserError

TRITON_DTYPES = {"uint8": "UINT8", "uint16": "UINT16"}
# Large enough to read the config (which carries the spec) before we know the served limit.
_BOOTSTRAP_MESSAGE_BYTES = 64 << 20


def connect(url: str, max_message_bytes: int = _BOOTSTRAP_MESSAGE_BYTES) -> grpcclient.InferenceServerClient:
    # gRPC's default 4 MB limit bites on large tiles: raise it deliberately to what the server announces.
    return grpcclient.InferenceServerClient(url, channel_args=[
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ])


def served_spec(client: grpcclient.InferenceServerClient, model: str) -> dict[str, Any]:
    """The model spec a promoted ensemble carries in its config parameters (plus a `triton` section)."""
    config = client.get_model_config(model, as_json=True)["config"]
    try:
        return json.loads(config["parameters"]["model_spec"]["string_value"])
    except KeyError:
        raise UserError(f"model {model!r} on the server carries no model spec; promote it with rsseg") from None


def infer_tiles(url: str, model: str, tiles: np.ndarray, *, probabilities: bool = False,
                tta: str | None = None) -> Any:
    """[N, H, W, C] raw tiles -> [N, G, H, W] uint8 class maps (and [N, K, H, W] fp16 probabilities)."""
    with connect(url) as probe:
        limit = served_spec(probe, model)["triton"]["max_message_bytes"]
    with connect(url, limit) as client:
        tensor = grpcclient.InferInput("TILES", list(tiles.shape), TRITON_DTYPES[str(tiles.dtype)])
        tensor.set_data_from_numpy(np.ascontiguousarray(tiles))
        names = ["CLASS_MAP", *(["PROBABILITIES"] if probabilities else [])]
        result = client.infer(model, [tensor], outputs=[grpcclient.InferRequestedOutput(n) for n in names],
                              parameters={"tta": tta} if tta else None)
    maps = result.as_numpy("CLASS_MAP")
    return (maps, result.as_numpy("PROBABILITIES")) if probabilities else maps


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
