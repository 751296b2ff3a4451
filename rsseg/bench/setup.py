"""What the serving and scene benchmarks share: a random-init seed model, its ONNX export run in process,
and a temporary repository written by the promotion code and served by a real tritonserver (no registry
needed; speed does not depend on the weights)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from rsseg.config import TrainConfig
from rsseg.data.transforms import normalize
from rsseg.model_setup import build_model
from rsseg.runtimes import load_runner
from rsseg.serving.repository import ServingOptions, stage_promotion
from rsseg.serving.server import TritonServer
from rsseg.spec import DatasetSpec, ModelSpec, default_colors

BENCH_MODEL = "bench"  # the served ensemble's name in the benchmarks' repositories


def random_model(tile: int, encoder: str, classes: tuple[str, str] = ("background", "target")
                 ) -> tuple[torch.nn.Module, ModelSpec]:
    """The default architecture on 3-band uint8 tiles, random init, in eval mode."""
    dataset = DatasetSpec(name="benchmark", task="binary", classes=list(classes), colors=default_colors(2),
                          bands=[1, 2, 3])
    model, spec = build_model(TrainConfig(encoder=encoder), dataset, tile)
    return model.eval(), spec


def in_process_logits(onnx_path: Path, spec: ModelSpec, runtime: str = "onnxruntime"
                      ) -> Callable[[np.ndarray], np.ndarray]:
    """Raw [N, H, W, C] tiles -> logits through `runtime` (rsseg.runtimes) in this process, normalised as served."""
    run, _ = load_runner(onnx_path, runtime)
    return lambda tiles: run(np.stack([normalize(t, spec.dataset) for t in tiles]))


@contextmanager
def served(tmp: Path, spec: ModelSpec, onnx_path: Path, max_batch_size: int, instances: int = 1,
           intra_op_threads: int = 0, runtime: str = "onnxruntime") -> Iterator[TritonServer]:
    """A repository staged under `tmp` holding BENCH_MODEL, served by tritonserver on loopback."""
    repo = tmp / "repo"
    stage_promotion(tmp / "none", repo, BENCH_MODEL, spec, onnx_path,
                    ServingOptions(max_batch_size=max_batch_size, instances=instances,
                                   intra_op_threads=intra_op_threads, runtime=runtime), {"benchmark": True})
    with TritonServer(repo) as server:
        server.wait_model_ready(BENCH_MODEL)
        yield server
