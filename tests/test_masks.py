"""Mask decoding (index, binary255, threshold, palette) and the targets of change pairs."""

from __future__ import annotations

import numpy as np

from rsseg.data.masks import change_targets, decode_mask, decode_palette, mask_targets, pack_rgb
from rsseg.data.palette import load_palette
from rsseg.spec import DatasetSpec


def _spec(**kw) -> DatasetSpec:
    base = dict(name="t", task="binary", classes=["background", "target"], colors=[[0, 0, 0], [255, 255, 255]],
                bands=[1, 2, 3])
    base.update(kw)
    return DatasetSpec(**base)



def test_decode_mask_index_binary_threshold():
    raw = np.array([[0, 1, 2], [255, 3, 1]], np.uint8)
    spec = _spec(task="multiclass", classes=list("abcd"), colors=[[0, 0, 0]] * 4)
    assert decode_mask(raw, spec).tolist() == raw.tolist()  # ignore 255 stays ignore
    assert decode_mask(raw[..., None], spec).tolist() == raw.tolist()  # HWC first band
    b255 = np.array([[0, 255], [255, 0]], np.uint8)
    assert decode_mask(b255, _spec(mask_encoding="binary255")).tolist() == [[0, 1], [1, 0]]
    grey = np.array([[0, 127, 128, 254]], np.uint8)
    out = decode_mask(grey, _spec(mask_encoding="threshold", mask_threshold=128))
    assert out.tolist() == [[0, 0, 1, 1]] and out.dtype == np.uint8
    u16 = np.array([[0, 1, 300]], np.uint16)
    assert decode_mask(u16, spec).tolist() == [[0, 1, 255]]


def test_decode_mask_palette_unknown_ignore_binarize():
    pal = [[226, 169, 41, 0], [132, 41, 246, 1], [0, 0, 0, 255]]
    spec = _spec(mask_encoding="palette", palette=pal)
    raw = np.array([[[226, 169, 41], [132, 41, 246]], [[0, 0, 0], [1, 2, 3]]], np.uint8)
    assert decode_mask(raw, spec).tolist() == [[0, 1], [255, 255]]
    rgba = np.concatenate([raw, np.full((2, 2, 1), 255, np.uint8)], axis=-1)
    assert decode_mask(rgba, spec).tolist() == [[0, 1], [255, 255]]
    _, unknown = decode_palette(raw, pal, 255)
    assert unknown.tolist() == [[False, False], [False, True]]
    # JPEG-noisy DeepGlobe colours: binarised per channel first.
    dg = load_palette("deepglobe")
    assert dg.binarize == 128
    noisy = np.array([[[3, 250, 251], [240, 252, 9], [5, 4, 2]]], np.uint8)
    spec_dg = _spec(task="multiclass", classes=dg.names, colors=dg.colors, mask_encoding="palette",
                    palette=dg.entries, mask_threshold=dg.binarize)
    assert decode_mask(noisy, spec_dg).tolist() == [[0, 1, 255]]  # urban, agriculture, unknown (ignored)
    assert pack_rgb(np.array([1, 2, 3])) == 0x010203


def test_change_and_mask_targets():
    levir = _spec(task="change", classes=["no_change", "change"], mask_encoding="binary255")
    lab = np.array([[0, 255]], np.uint8)
    assert change_targets(lab, None, levir)["change"].tolist() == [[0, 1]]
    assert set(mask_targets(lab, None, levir)) == {"change"}
    second = _spec(task="change", classes=["no_change", "change"], mask_encoding="index",
                   semantic_classes=["unchanged", "water", "tree"], semantic_colors=[[0, 0, 0]] * 3)
    a = np.array([[0, 1, 2, 255]], np.uint8)
    b = np.array([[0, 2, 1, 255]], np.uint8)
    t = mask_targets(a, b, second)
    assert t["change"].tolist() == [[0, 1, 1, 255]]
    assert t["semantic_a"].tolist() == [[255, 1, 2, 255]]
    assert t["semantic_b"].tolist() == [[255, 2, 1, 255]]
    assert mask_targets(lab, None, _spec(mask_encoding="binary255"))["classes"].tolist() == [[0, 1]]
