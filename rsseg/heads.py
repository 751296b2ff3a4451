"""Output heads in numpy: the one definition the served models and the scene client share.

numpy only (promotion copies this file beside the segmenter's and postprocess's model.py). The torch
twin used in training and export checks is rsseg.inference.class_maps; tests compare the two.
"""

import numpy as np

# Output group names: a single-date model has one group, CLASSES; a change model has CHANGE and, with
# semantic change labels, one semantic class map per date.
CLASSES = "classes"
CHANGE = "change"
SEMANTIC = ("semantic_a", "semantic_b")

def split(logits, groups):
    """[N, K, H, W] -> {name: [N, channels, H, W]} for `groups` of (name, channels) in channel order."""
    parts, start = {}, 0
    for name, channels in groups:
        parts[name] = logits[:, start : start + channels]
        start += channels
    if start != logits.shape[1]:
        raise ValueError(f"{logits.shape[1]} channels, but the output groups have {start}")
    return parts


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def class_maps(scores, groups):
    """[N, K, H, W] logits or probabilities -> [N, G, H, W] uint8, one class map per group. For change
    models the semantic maps are 0 ("unchanged") where no change is predicted, as in training."""
    parts = split(scores, groups)
    maps = {name: part.argmax(axis=1) for name, part in parts.items()}
    if CHANGE in parts:
        changed = maps[CHANGE] == 1
        for name in SEMANTIC:
            if name in parts:
                maps[name] = np.where(changed, parts[name][:, 1:].argmax(axis=1) + 1, 0)
    return np.stack([maps[name] for name, _ in groups], axis=1).astype(np.uint8)


def probabilities(logits, groups):
    """Softmax within each group, fp16 (what the ensemble's PROBABILITIES carries)."""
    return np.concatenate([softmax(p) for p in split(logits, groups).values()], axis=1).astype(np.float16)
