"""Model zoo chosen by name: `create_model("unet", "tf_efficientnet_lite3", 3, outputs)`.

Every model maps (N, in_channels, H, W) to raw logits (N, sum(outputs.channels), H, W) and has `stride`
(H and W must be multiples of it), `outputs`, `in_channels` and `encoder` (the timm feature extractor).
"""

# importing the modules registers their architectures
from rsseg.models import change, danet, deeplab, ocr, pspnet, unet, unetplusplus  # noqa: F401
from rsseg.models.registry import (
    SegmentationModel,
    create_model,
    default_encoder,
    list_models,
    model_kwargs,
    model_tasks,
    register_model,
)

__all__ = [
    "SegmentationModel",
    "create_model",
    "default_encoder",
    "list_models",
    "model_kwargs",
    "model_tasks",
    "register_model",
]
