"""Segmenter: the exported model(s) in ONNX Runtime or OpenVINO (runtimes.py), NCHW float32 in, logits out.

Config parameters: `models` (JSON list of ONNX files in the version folder; several are averaged in
logit space, the land-cover seed's ensemble), `tta` ("none", "flips" or "d4": flips/rot90 of the
input, logits mapped back and averaged; a request parameter `tta` overrides it), `runtime` (onnxruntime
or openvino, CPU only), `intra_op_threads` (0: the runtime's choice). ONNX Runtime's CUDA provider is
asked for on KIND_GPU instances; the providers a session really uses are logged, and a GPU instance
that did not get CUDA fails to load instead of silently running on the CPU.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # averaging.py, heads.py, triton_io.py, contract.py sit beside model.py

import triton_python_backend_utils as pb_utils  # noqa: E402
from averaging import average_logits, tta_transforms  # noqa: E402
from contract import LOGITS, NORMALISED  # noqa: E402
from runtimes import load_runner  # noqa: E402
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
        folder = os.path.join(args["model_repository"], args["model_version"])
        gpu = args["model_instance_kind"] == "GPU"
        runtime = parameter(config, "runtime", "onnxruntime")
        threads = int(parameter(config, "intra_op_threads", "0"))
        device = int(args["model_instance_device_id"]) if gpu else None
        loaded = [load_runner(os.path.join(folder, f), runtime, gpu_device=device, threads=threads)
                  for f in json.loads(parameter(config, "models", '["model.onnx"]'))]
        self.runners = [runner for runner, _ in loaded]
        used = loaded[0][1]
        pb_utils.Logger.log_info(f"segmenter: {len(self.runners)} model(s) on {used}")
        if gpu and "onnxruntime:CUDAExecutionProvider" not in used:
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
                logits = average_logits(self.runners, batch, mode)
                responses.append(pb_utils.InferenceResponse(output_tensors=[output_tensor(LOGITS, logits)]))
            except Exception as exc:  # noqa: BLE001 - a failing request must not take the model down
                responses.append(error_response("segmenter", exc))
        return responses
