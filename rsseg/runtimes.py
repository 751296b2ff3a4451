"""The runtimes that compute an exported ONNX model: the one definition the served segmenter (Triton's Python
backend, where this file is shipped beside model.py) and in-process scoring share. No rsseg imports, so it
runs inside Triton's stub as it is.

- onnxruntime: the CPU provider, or CUDA on GPU instances (the reference every parity check uses);
- openvino: Intel's OpenVINO CPU plugin (it runs well on AMD CPUs too). On this project's 2-core AVX-512
  machine it ran the seed UNet 1.5x faster than ONNX Runtime in fp32 and 3.8x faster as a QDQ int8 file
  (README, reduced precision). It reads QDQ int8 files, not QOperator ones. Its CPU plugin would run fp32
  models in bf16 on CPUs that have it; fp32 inference is pinned here so an fp32 file answers as fp32.
"""

RUNTIMES = ("onnxruntime", "openvino")


def check_runtime(runtime, gpu=False):
    """Raise ValueError for a runtime this module does not know, or one that cannot use a GPU on GPU instances."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if gpu and runtime != "onnxruntime":
        raise ValueError(f"runtime {runtime} runs on CPU instances only; GPU instances use ONNX Runtime's CUDA provider")


def session_runner(session):
    """An ONNX Runtime session (one input, logits first output) as a callable NCHW -> logits."""
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def load_runner(path, runtime="onnxruntime", *, gpu_device=None, threads=0):
    """(callable NCHW float32 -> logits, what computes it) for the ONNX file at `path`. `gpu_device`: a CUDA
    device id for ONNX Runtime (None: CPU); `threads`: intra-op threads (0: the runtime's own choice)."""
    check_runtime(runtime, gpu_device is not None)
    if runtime == "openvino":
        return _openvino_runner(path, threads)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if gpu_device is not None:
        providers = [("CUDAExecutionProvider", {"device_id": int(gpu_device)}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    return session_runner(session), [f"onnxruntime:{p}" for p in session.get_providers()]


def _openvino_runner(path, threads):
    try:
        import openvino as ov
    except ImportError as exc:
        raise ImportError("runtime openvino needs the openvino package: pip install openvino") from exc
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()  # one request: each model instance computes one batch at a time
    return (lambda batch: request.infer({0: batch})[0]), [f"openvino:CPU {ov.__version__}"]
