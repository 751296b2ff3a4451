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


def argmax_channels(scores):
    """[N, K, H, W] -> [N, H, W] uint8: the index of the largest channel, the first one on ties (numpy's
    argmax; K < 256). Whole-map comparisons, one per channel: numpy's argmax over the strided channel axis
    ran 50x slower for two classes (11.5 ms vs 0.2 ms for 4 x 512^2) and up to 3x for more, and the served
    postprocess step spends most of its time here."""
    channels = scores.shape[1]
    if channels == 1:
        return np.zeros(scores[:, 0].shape, np.uint8)
    greater = scores[:, 1] > scores[:, 0]
    if channels == 2:
        return greater.view(np.uint8)
    index = greater.astype(np.uint8)
    best = np.maximum(scores[:, 0], scores[:, 1])
    for k in range(2, channels):
        channel = scores[:, k]
        np.greater(channel, best, out=greater)
        np.copyto(index, np.uint8(k), where=greater)
        np.maximum(best, channel, out=best)
    return index


def class_maps(scores, groups):
    """[N, K, H, W] logits or probabilities -> [N, G, H, W] uint8, one class map per group. For change
    models the semantic maps are 0 ("unchanged") where no change is predicted, as in training."""
    parts = split(scores, groups)
    maps = {name: argmax_channels(part) for name, part in parts.items()}
    if CHANGE in parts:
        changed = maps[CHANGE] == 1
        for name in SEMANTIC:
            if name in parts:
                maps[name] = np.where(changed, argmax_channels(parts[name][:, 1:]) + 1, 0).astype(np.uint8)
    return np.stack([maps[name] for name, _ in groups], axis=1)


def probabilities(logits, groups):
    """Softmax within each group, fp16 (what the ensemble's PROBABILITIES carries)."""
    return np.concatenate([softmax(p) for p in split(logits, groups).values()], axis=1).astype(np.float16)
