"""Preprocess: a DALI pipeline from raw tiles (or encoded image files) to normalised NCHW float32.

Config parameters: `mean`, `std` (JSON lists, one per input channel), `source` ("tiles": raw
uint8/uint16 HWC tiles in input TILES; "encoded": the bytes of PNG/JPEG/TIFF files as uint8 rows in
input IMAGES, decoded by DALI),
`dtype` of the raw tiles. CPU operators on a KIND_CPU instance, GPU operators on KIND_GPU.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # triton_io.py, contract.py sit beside model.py

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from contract import IMAGES, NORMALISED, TILES  # noqa: E402
from nvidia.dali import fn, pipeline_def, types  # noqa: E402
from triton_io import (  # noqa: E402
    error_response,
    input_array,
    output_tensor,
    parameter,
    quiet_dlpack_noise,
)

_DALI_TYPES = {"uint8": types.UINT8, "uint16": types.UINT16}


def build_pipeline(mean, std, source, dtype, batch_size, device_id):
    """(x - mean) / std per channel, HWC -> CHW; device_id None runs every operator on the CPU."""
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)

    @pipeline_def(batch_size=batch_size, num_threads=1, device_id=device_id, prefetch_queue_depth=1,
                  exec_dynamic=True)
    def pipeline():
        if source == "encoded":
            data = fn.external_source(name="data", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(data, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        else:
            images = fn.external_source(name="data", dtype=_DALI_TYPES[dtype], layout="HWC", ndim=3)
            if device_id is not None:
                images = images.gpu()
        images = fn.cast(images, dtype=types.FLOAT)
        images = (images - types.Constant(mean)) / types.Constant(std)
        return fn.transpose(images, perm=[2, 0, 1])

    pipe = pipeline()
    pipe.build()
    return pipe


def run_pipeline(pipe, samples):
    pipe.feed_input("data", samples)
    (out,) = pipe.run()
    if hasattr(out, "as_cpu"):
        out = out.as_cpu()
    return np.stack([np.asarray(out[i]) for i in range(len(samples))])


class TritonPythonModel:
    def initialize(self, args):
        quiet_dlpack_noise()
        config = json.loads(args["model_config"])
        self.source = parameter(config, "source", "tiles")
        self.dtype = parameter(config, "dtype", "uint8")
        self.mean = json.loads(parameter(config, "mean"))
        self.std = json.loads(parameter(config, "std"))
        self.channels = len(self.mean)
        self.input_name = IMAGES if self.source == "encoded" else TILES
        gpu = args["model_instance_kind"] == "GPU"
        device_id = int(args["model_instance_device_id"]) if gpu else None
        self.batch_size = max(int(config.get("max_batch_size", 1)), 1)
        self.pipe = build_pipeline(self.mean, self.std, self.source, self.dtype, self.batch_size, device_id)
        pb_utils.Logger.log_info(
            f"preprocess: DALI {'GPU' if gpu else 'CPU'} pipeline, source {self.source}, {self.channels} channels"
        )

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                samples = self._samples(input_array(request, self.input_name))
                chunks = [run_pipeline(self.pipe, samples[i : i + self.batch_size])
                          for i in range(0, len(samples), self.batch_size)]
                out = output_tensor(NORMALISED, np.concatenate(chunks).astype(np.float32, copy=False))
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as exc:  # noqa: BLE001 - a failing request must not take the model down
                responses.append(error_response("preprocess", exc))
        return responses

    def _samples(self, batch):
        if len(batch) == 0:
            raise ValueError("empty batch")
        if self.source == "encoded":
            # One encoded file per row: uint8 bytes (DLPack cannot carry BYTES tensors).
            return [np.array(row, dtype=np.uint8) for row in batch]
        if batch.ndim != 4 or batch.shape[-1] != self.channels:
            raise ValueError(f"expected tiles of shape [N, H, W, {self.channels}], got {list(batch.shape)}")
        if batch.shape[1] == 0 or batch.shape[2] == 0:
            raise ValueError(f"empty tile of shape {list(batch.shape[1:])}")
        return [np.ascontiguousarray(tile) for tile in batch]
