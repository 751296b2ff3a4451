"""One-off questions to a served ensemble, for promotion checks, benchmarks, tests and the main job:
a connected gRPC client, the served spec, one batch of tiles."""

from __future__ import annotations

from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from rsseg import contract
from rsseg.client.triton import TritonSegmenter, make_client, served_spec_dict


def connect(url: str, max_message_bytes: int = contract.BOOTSTRAP_MESSAGE_BYTES) -> Any:
    """A gRPC client whose message limits are raised deliberately (gRPC's 4 MB default bites)."""
    return make_client(grpcclient, "grpc", url, max_message_bytes)


def served_spec(client: Any, model: str) -> dict[str, Any]:
    """The model spec a promoted ensemble carries in its config parameters (plus a `triton` section)."""
    return served_spec_dict(client, model)


def infer_tiles(url: str, model: str, tiles: np.ndarray, *, probabilities: bool = False,
                tta: str | None = None) -> Any:
    """[N, H, W, C] raw tiles -> [N, G, H, W] uint8 class maps (and [N, K, H, W] fp16 probabilities)."""
    with TritonSegmenter([url], model, retries=0, max_in_flight=1) as segmenter:
        names = (contract.CLASS_MAP, contract.PROBABILITIES) if probabilities else (contract.CLASS_MAP,)
        out = segmenter.infer(tiles, names, tta)
    return (out[contract.CLASS_MAP], out[contract.PROBABILITIES]) if probabilities else out[contract.CLASS_MAP]
