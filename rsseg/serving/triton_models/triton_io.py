"""What every Python-backend model here shares; promotion copies this file beside each model.py.

The Python-backend stub shipped with Triton 2.51 (nvidia-pytriton 0.7.0) is built against numpy 1:
under numpy 2, `as_numpy()` repeats the first element and `pb_utils.Tensor(name, ndarray)` sends no
bytes, silently, so under numpy 2 tensors go through DLPack. Under numpy 1 (the project's own environment,
conda.yaml, resolves to it) DLPack crashes the stub, and its native numpy path is the right one.
"""

import sys

import numpy as np
import triton_python_backend_utils as pb_utils

_NATIVE = int(np.__version__.split(".")[0]) < 2  # the numpy the stub was built against


def parameter(model_config, key, default=None):
    value = model_config.get("parameters", {}).get(key, {}).get("string_value")
    return default if value is None else value


def input_array(request, name):
    """The named input as a numpy view, valid during `execute` only."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"missing input {name}")
    return tensor.as_numpy() if _NATIVE else np.from_dlpack(tensor)


def output_tensor(name, array):
    array = np.ascontiguousarray(array)
    return pb_utils.Tensor(name, array) if _NATIVE else pb_utils.Tensor.from_dlpack(name, array)


def error_response(step, exc):
    """A per-request error: bad input is INVALID_ARG, anything else INTERNAL; the model keeps serving."""
    code = pb_utils.TritonError.INVALID_ARG if isinstance(exc, ValueError) else pb_utils.TritonError.INTERNAL
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{step}: {exc}", code))


def quiet_dlpack_noise():
    """numpy 2 complains, harmlessly, when the stub frees a DLPack capsule it consumed; keep logs clean."""
    default = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, ValueError) and "PyCapsule_GetPointer" in str(unraisable.exc_value):
            return
        default(unraisable)

    sys.unraisablehook = hook
