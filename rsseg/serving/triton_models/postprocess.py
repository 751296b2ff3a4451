"""Postprocess: logits -> uint8 class map per output group, and fp16 class probabilities on request.

Config parameter `outputs`: JSON list of [name, channels] groups in channel order (the model spec's).
For change models the semantic maps are 0 ("unchanged") where no change is predicted, as in training
(rsseg.inference.class_maps; tests check the two agree).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # triton_io.py sits beside model.py

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from triton_io import (  # noqa: E402
    error_response,
    input_array,
    output_tensor,
    parameter,
    quiet_dlpack_noise,
)


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def split(logits, groups):
    parts, start = {}, 0
    for name, channels in groups:
        parts[name] = logits[:, start : start + channels]
        start += channels
    return parts


def class_maps(logits, groups):
    """[N, K, H, W] logits -> [N, G, H, W] uint8, one class map per group, in group order."""
    parts = split(logits, groups)
    maps = {name: part.argmax(axis=1) for name, part in parts.items()}
    if "change" in parts:
        changed = maps["change"] == 1
        for name in ("semantic_a", "semantic_b"):
            if name in parts:
                maps[name] = np.where(changed, parts[name][:, 1:].argmax(axis=1) + 1, 0)
    return np.stack([maps[name] for name, _ in groups], axis=1).astype(np.uint8)


def probabilities(logits, groups):
    return np.concatenate([softmax(p) for p in split(logits, groups).values()], axis=1).astype(np.float16)


class TritonPythonModel:
    def initialize(self, args):
        quiet_dlpack_noise()
        config = json.loads(args["model_config"])
        self.groups = [tuple(g) for g in json.loads(parameter(config, "outputs"))]
        self.channels = sum(c for _, c in self.groups)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                logits = input_array(request, "LOGITS")
                if logits.ndim != 4 or logits.shape[1] != self.channels:
                    raise ValueError(f"expected logits [N, {self.channels}, H, W], got {list(logits.shape)}")
                outputs = [output_tensor("CLASS_MAP", class_maps(logits, self.groups))]
                if "PROBABILITIES" in request.requested_output_names():
                    outputs.append(output_tensor("PROBABILITIES", probabilities(logits, self.groups)))
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # noqa: BLE001 - a failing request must not take the model down
                responses.append(error_response("postprocess", exc))
        return responses
