"""Logit averaging over models and test-time-augmentation views: the one definition the served segmenter
(Triton's Python backend, where this file is shipped beside model.py) and in-process evaluation share.
numpy only, and no rsseg imports, so it runs inside Triton's stub as it is."""

TTA_VIEWS = {"none": 1, "flips": 3, "d4": 8}

import numpy as np  # noqa: E402


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
    raise ValueError(f"tta must be one of {', '.join(TTA_VIEWS)}, got {mode!r}")


def average_logits(models, batch, mode="none"):
    """Mean of the logits of every model (a callable: NCHW float32 -> logits) over every TTA view of
    `batch`: the land-cover seed's logit-averaging ensemble. One model, no TTA: its logits unchanged."""
    total = None
    count = 0
    for model in models:
        for forward, inverse in tta_transforms(mode):
            logits = inverse(model(np.ascontiguousarray(forward(batch))))
            total = logits if total is None else total + logits
            count += 1
    return (total / count).astype(np.float32, copy=False)

