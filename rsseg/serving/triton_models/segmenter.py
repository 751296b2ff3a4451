"""Segmenter: ONNX Runtime over the exported model(s), NCHW float32 in, logits out.

Config parameters: `models` (JSON list of ONNX files in the version folder; several are averaged in
logit space, the land-cover seed's ensemble), `tta` ("none", "flips" or "d4": flips/rot90 of the
input, logits mapped back and averaged; a request parameter `tta` overrides it). The CUDA provider is
asked for on KIND_GPU instances; the providers a session really uses are logged, and a GPU instance
that did not get CUDA fails to load instead of silently running on the CPU.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # heads.py, triton_io.py, contract.py sit beside model.py

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from contract import LOGITS, NORMALISED, TTA_MODES  # noqa: E402
from triton_io import (  # noqa: E402
    error_response,
    input_array,
    output_tensor,
    parameter,
    quiet_dlpack_noise,
)


def tta_transforms(mode):
    """(forward, inverse) pairs on NCHW arrays; inverse maps logits back to the input's frame."""
    identity = (lambda x: x, lambda y: y)
    if mode == "none":
        return [identity]
    hflip = (lambda x: x[..., ::-1], lambda y: y[..., ::-1])
    vflip = (lambda x: x[..., ::-1, :], lambda y: y[..., ::-1, :])
    if mode == "flips":
        return [identity, hflip, vflip]
    if mode == "d4":
        out = []
        for k in range(4):
            for flip in (False, True):
                def forward(x, k=k, flip=flip):
                    x = np.rot90(x, k, axes=(2, 3))
                    return x[..., ::-1] if flip else x

                def inverse(y, k=k, flip=flip):
                    y = y[..., ::-1] if flip else y
                    return np.rot90(y, -k, axes=(2, 3))

                out.append((forward, inverse))
        return out
    raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {mode!r}")


def segment(sessions, batch, mode="none"):
    """Average of the logits of every session over every TTA view."""
    total = None
    count = 0
    for session in sessions:
        name = session.get_inputs()[0].name
        for forward, inverse in tta_transforms(mode):
            logits = inverse(session.run(None, {name: np.ascontiguousarray(forward(batch))})[0])
            total = logits if total is None else total + logits
            count += 1
    return (total / count).astype(np.float32, copy=False)


class TritonPythonModel:
    def initialize(self, args):
        quiet_dlpack_noise()
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        gpu = args["model_instance_kind"] == "GPU"
        providers = ["CPUExecutionProvider"]
        if gpu:
            providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}),
                         "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.sessions = [ort.InferenceSession(os.path.join(folder, f), options, providers=providers)
                         for f in json.loads(parameter(config, "models", '["model.onnx"]'))]
        used = self.sessions[0].get_providers()
        pb_utils.Logger.log_info(f"segmenter: {len(self.sessions)} model(s), ONNX Runtime providers {used}")
        if gpu and "CUDAExecutionProvider" not in used:
            raise pb_utils.TritonModelException(
                f"segmenter: KIND_GPU instance but ONNX Runtime uses {used}; install onnxruntime-gpu or promote "
                "with --instance-kind cpu")
        self.providers = used
        self.tta = parameter(config, "tta", "none")
        tta_transforms(self.tta)  # validate

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                batch = input_array(request, NORMALISED)
                if batch.shape[0] == 0:
                    raise ValueError("empty batch")
                mode = json.loads(request.parameters() or "{}").get("tta", self.tta)
                logits = segment(self.sessions, batch, mode)
                responses.append(pb_utils.InferenceResponse(output_tensors=[output_tensor(LOGITS, logits)]))
            except Exception as exc:  # noqa: BLE001 - a failing request must not take the model down
                responses.append(error_response("segmenter", exc))
        return responses
