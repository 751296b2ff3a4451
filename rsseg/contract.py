"""The wire contract between the served ensemble and its clients: tensor names, dtypes, step names and
message limits, in one place that both sides import (rsseg.serving writes configs from it, rsseg.client
builds requests from it).

Plain Python, no imports: promotion copies this file beside the Python-backend models' model.py, so the
models in the repository read the same names as the code that wrote their configs.
"""

# Inputs of the two ensembles: raw tiles [N, H, W, C] (NAME) and encoded image files [N, bytes]
# (NAME-files, 3-band uint8 models only).
TILES = "TILES"
IMAGES = "IMAGES"
# Between the steps: normalised NCHW float32 into the segmenter, its logits out.
NORMALISED = "INPUT"
LOGITS = "LOGITS"
# Outputs of both ensembles: [N, G, H, W] class maps, one per output group, and on request
# [N, K, H, W] per-class probabilities.
CLASS_MAP = "CLASS_MAP"
PROBABILITIES = "PROBABILITIES"

# Raw tile dtypes the ensemble accepts: numpy name -> Triton config type.
INPUT_TYPES = {"uint8": "TYPE_UINT8", "uint16": "TYPE_UINT16"}
# The ensemble's outputs: config type and numpy dtype. Clients size shared-memory regions from it.
OUTPUT_TYPES = {CLASS_MAP: ("TYPE_UINT8", "uint8"), PROBABILITIES: ("TYPE_FP16", "float16")}

# Test-time augmentation the segmenter offers (config parameter, or request parameter `tta`).
TTA_MODES = ("none", "flips", "d4")

# The models behind a promoted ensemble NAME are NAME + one of these.
STEP_SUFFIXES = {"preprocess": "-preprocess", "segmenter": "-segmenter", "postprocess": "-postprocess",
                 "decode": "-decode", "files": "-files"}

# A client reads the served config (which carries the model spec) before it knows the served message
# limit; gRPC's 4 MB default is too small for that and for most tile batches.
BOOTSTRAP_MESSAGE_BYTES = 64 << 20


def wire_type(dtype: str) -> str:
    """Triton's wire name of a raw tile dtype ("uint8" -> "UINT8")."""
    return INPUT_TYPES[dtype].removeprefix("TYPE_")


def step_names(name: str) -> dict[str, str]:
    """The models of the promoted ensemble NAME, by role."""
    return {role: name + suffix for role, suffix in STEP_SUFFIXES.items()}


def is_step(model: str) -> bool:
    """True for the step models and the files ensemble, i.e. not a promoted ensemble NAME itself."""
    return model.endswith(tuple(STEP_SUFFIXES.values()))
