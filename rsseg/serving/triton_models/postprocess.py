"""Postprocess: logits -> uint8 class map per output group, and fp16 class probabilities on request.

Config parameter `outputs`: JSON list of [name, channels] groups in channel order (the model spec's).
The head math lives in heads.py (copied beside this file), shared with the scene client.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # heads.py, triton_io.py, contract.py sit beside model.py

import triton_python_backend_utils as pb_utils  # noqa: E402
from contract import CLASS_MAP, LOGITS, PROBABILITIES  # noqa: E402
from heads import class_maps, probabilities  # noqa: E402
from triton_io import (  # noqa: E402
    error_response,
    input_array,
    output_tensor,
    parameter,
    quiet_dlpack_noise,
)


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
                logits = input_array(request, LOGITS)
                if logits.ndim != 4 or logits.shape[1] != self.channels:
                    raise ValueError(f"expected logits [N, {self.channels}, H, W], got {list(logits.shape)}")
                outputs = [output_tensor(CLASS_MAP, class_maps(logits, self.groups))]
                if PROBABILITIES in request.requested_output_names():
                    outputs.append(output_tensor(PROBABILITIES, probabilities(logits, self.groups)))
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # noqa: BLE001 - a failing request must not take the model down
                responses.append(error_response("postprocess", exc))
        return responses
