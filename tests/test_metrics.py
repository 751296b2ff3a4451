"""Metrics against independent implementations (scikit-learn, direct numpy formulas)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    jaccard_score,
    precision_score,
    recall_score,
)

from rsseg.errors import ConfigError
from rsseg.metrics import ChangeMetrics, ConfusionMatrix, binary_metrics, sek_metrics

IGNORE = 255


def _random(k: int, seed: int, shape=(3, 40, 40), ignore_frac: float = 0.1, accuracy: float = 0.6):
    rng = np.random.default_rng(seed)
    target = rng.integers(0, k, shape)
    pred = np.where(rng.random(shape) < accuracy, target, rng.integers(0, k, shape))
    target[rng.random(shape) < ignore_frac] = IGNORE
    return pred, target


@pytest.mark.parametrize("k", [2, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_matrix_against_sklearn(k: int, seed: int) -> None:
    pred, target = _random(k, seed)
    cm = ConfusionMatrix(k)
    cm.update(torch.from_numpy(pred), torch.from_numpy(target))
    keep = target != IGNORE
    y, p = target[keep], pred[keep]
    labels = list(range(k))
    np.testing.assert_array_equal(cm.matrix, confusion_matrix(y, p, labels=labels))
    assert cm.matrix.dtype == np.int64

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warnings from our side
        m = cm.compute()
    kw = {"labels": labels, "average": None, "zero_division": 0}
    for name, ref in (
        ("iou", jaccard_score(y, p, **kw)),
        ("f1", f1_score(y, p, **kw)),
        ("precision", precision_score(y, p, **kw)),
        ("recall", recall_score(y, p, **kw)),
    ):
        ours = np.array([m[f"{name}_class{i}"] for i in range(k)])
        np.testing.assert_allclose(ours, ref, rtol=1e-12)
    assert m["miou"] == pytest.approx(jaccard_score(y, p, labels=labels, average="macro"))
    assert m["mean_f1"] == pytest.approx(f1_score(y, p, labels=labels, average="macro"))
    assert m["mean_precision"] == pytest.approx(precision_score(y, p, labels=labels, average="macro"))
    assert m["mean_recall"] == pytest.approx(recall_score(y, p, labels=labels, average="macro"))
    assert m["oa"] == pytest.approx(accuracy_score(y, p))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, p))

    # FWIoU straight from its definition.
    h = confusion_matrix(y, p, labels=labels).astype(float)
    freq = h.sum(1) / h.sum()
    iu = np.diag(h) / (h.sum(1) + h.sum(0) - np.diag(h))
    assert m["fwiou"] == pytest.approx((freq[freq > 0] * iu[freq > 0]).sum())

    if k == 2:
        b = binary_metrics(cm)
        assert b["iou_target"] == pytest.approx(jaccard_score(y, p))
        assert b["f1_target"] == pytest.approx(f1_score(y, p))
        assert b["precision_target"] == pytest.approx(precision_score(y, p))
        assert b["recall_target"] == pytest.approx(recall_score(y, p))


def test_accumulation_merge_and_reset() -> None:
    pred, target = _random(6, 7, shape=(8, 32, 32))
    one_shot = ConfusionMatrix(6)
    one_shot.update(pred, target)
    batched = ConfusionMatrix(6)
    for i in range(0, 8, 3):  # mixed numpy / torch / dtypes
        p, t = pred[i : i + 3], target[i : i + 3]
        if i % 2:
            batched.update(torch.from_numpy(p).to(torch.uint8), torch.from_numpy(t))
        else:
            batched.update(p.astype(np.uint8), t.astype(np.uint8))
    np.testing.assert_array_equal(batched.matrix, one_shot.matrix)

    left, right = ConfusionMatrix(6), ConfusionMatrix(6)
    left.update(pred[:5], target[:5])
    right.update(pred[5:], target[5:])
    np.testing.assert_array_equal(left.merge(right).matrix, one_shot.matrix)
    assert left.compute() == pytest.approx(one_shot.compute())

    left.reset()
    assert left.matrix.sum() == 0 and math.isnan(left.compute()["oa"])


def test_absent_classes_are_nan_and_left_out_of_means() -> None:
    # Class 2 never occurs; class 3 only in prediction; class 1 only in target.
    target = np.array([0, 0, 1, 1, 0, IGNORE])
    pred = np.array([0, 3, 0, 0, 0, 2])  # the 2 is under an ignored pixel
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = cm.compute(["Back ground", "Sea-Ice", "x", "y"])
    assert math.isnan(m["iou_x"]) and math.isnan(m["f1_x"]) and math.isnan(m["precision_x"])
    assert m["iou_sea_ice"] == 0.0 and m["precision_sea_ice"] == 0.0 and m["recall_sea_ice"] == 0.0
    assert m["iou_y"] == 0.0 and m["recall_y"] == 0.0
    iou_bg = 2 / 5
    assert m["iou_back_ground"] == pytest.approx(iou_bg)
    assert m["miou"] == pytest.approx(iou_bg / 3)
    assert m["mean_f1"] == pytest.approx((2 * 2 / (3 + 4)) / 3)  # class 0: tp 2, 3 in target, 4 predicted


def test_class_names_validation() -> None:
    cm = ConfusionMatrix(2)
    with pytest.raises(ConfigError):
        cm.compute(["only one"])
    with pytest.raises(ConfigError):
        cm.compute(["Sea ice", "sea-ice"])


def test_out_of_range_values_are_rejected() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="class indices"):
        cm.update(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="class indices"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))


def _reference_sek(hist: np.ndarray) -> tuple[float, float, float]:
    """The SenseEarth2020 formula, written out independently."""
    hist = hist.astype(float)
    c2 = np.array([[hist[0, 0], hist[0, 1:].sum()], [hist[1:, 0].sum(), hist[1:, 1:].sum()]])
    iou_fg = c2[1, 1] / (c2.sum() - c2[0, 0])
    iou_mean = (iou_fg + c2[0, 0] / (c2.sum() - c2[1, 1])) / 2
    h = hist.copy()
    h[0, 0] = 0
    po = np.trace(h) / h.sum()
    pe = (h.sum(1) * h.sum(0)).sum() / h.sum() ** 2
    kappa = 0.0 if pe == 1 else (po - pe) / (1 - pe)
    sek = kappa * math.exp(iou_fg) / math.e
    return sek, iou_mean, 0.3 * iou_mean + 0.7 * sek


def _semantic_pair(seed: int, k: int = 5, shape=(2, 24, 24)):
    rng = np.random.default_rng(seed)
    changed = rng.random(shape) < 0.3
    sem_t = np.where(changed, rng.integers(1, k, shape), 0)
    pred_changed = np.where(rng.random(shape) < 0.8, changed, ~changed)
    sem_p = np.where(rng.random(shape) < 0.7, sem_t, rng.integers(1, k, shape))
    sem_p = np.where(pred_changed, np.maximum(sem_p, 1), 0)  # masked by the predicted change
    return changed.astype(np.int64), pred_changed.astype(np.int64), sem_t, sem_p


def test_sek_hand_made_example() -> None:
    hist = np.array([[50, 3, 2, 1], [4, 10, 2, 0], [1, 1, 8, 3], [2, 0, 1, 12]])
    got = sek_metrics(hist)
    sek, miou, score = _reference_sek(hist)
    assert got["sek"] == pytest.approx(sek)
    assert got["semantic_miou"] == pytest.approx(miou)
    assert got["score"] == pytest.approx(score)
    assert 0 < got["sek"] < 1


@pytest.mark.parametrize("seed", [0, 1])
def test_change_metrics_against_sklearn_and_reference(seed: int) -> None:
    k = 5
    change_t, change_p, sem_ta, sem_pa = _semantic_pair(seed, k)
    _, _, sem_tb, sem_pb = _semantic_pair(seed + 100, k)
    change_t[0, :2] = IGNORE
    sem_tb[1, :, :3] = IGNORE

    metrics = ChangeMetrics(num_semantic=k)
    for i in range(2):  # two batches
        metrics.update(
            torch.from_numpy(change_p[i : i + 1]), torch.from_numpy(change_t[i : i + 1]),
            sem_pa[i : i + 1], sem_ta[i : i + 1], sem_pb[i : i + 1], sem_tb[i : i + 1],
        )
    m = metrics.compute()

    keep = change_t != IGNORE
    y, p = change_t[keep], change_p[keep]
    assert m["change_iou"] == pytest.approx(jaccard_score(y, p))
    assert m["change_f1"] == pytest.approx(f1_score(y, p))
    assert m["change_precision"] == pytest.approx(precision_score(y, p))
    assert m["change_recall"] == pytest.approx(recall_score(y, p))
    assert m["oa"] == pytest.approx(accuracy_score(y, p))

    ka, kb = sem_ta != IGNORE, sem_tb != IGNORE
    hist = confusion_matrix(sem_ta[ka], sem_pa[ka], labels=range(k)) + confusion_matrix(
        sem_tb[kb], sem_pb[kb], labels=range(k)
    )
    sek, miou, score = _reference_sek(hist)
    assert m["sek"] == pytest.approx(sek)
    assert m["semantic_miou"] == pytest.approx(miou)
    assert m["score"] == pytest.approx(score)


def test_perfect_semantic_prediction_scores_one() -> None:
    change, _, sem_a, _ = _semantic_pair(5)
    _, _, sem_b, _ = _semantic_pair(6)
    metrics = ChangeMetrics(num_semantic=5)
    metrics.update(change, change, sem_a, sem_a, sem_b, sem_b)
    m = metrics.compute()
    assert m["sek"] == pytest.approx(1.0)
    assert m["score"] == pytest.approx(1.0)
    assert m["semantic_miou"] == pytest.approx(1.0)
    assert m["change_f1"] == pytest.approx(1.0) and m["oa"] == pytest.approx(1.0)


def test_change_metrics_without_semantics_and_misuse() -> None:
    metrics = ChangeMetrics(num_semantic=None)
    metrics.update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    m = metrics.compute()
    assert set(m) == {"change_iou", "change_f1", "change_precision", "change_recall", "oa"}
    assert m["change_precision"] == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.update(np.array([0]), np.array([0]), np.array([0]), np.array([0]))
    with pytest.raises(ValueError):
        ChangeMetrics(num_semantic=3).update(np.array([0]), np.array([0]), sem_pred_a=np.array([0]))
    with pytest.raises(ConfigError):
        ChangeMetrics(num_semantic=1)

    other = ChangeMetrics(num_semantic=None)
    other.update(np.array([1]), np.array([1]))
    metrics.merge(other)
    assert metrics.compute()["change_recall"] == pytest.approx(1.0)
    # Nothing changed anywhere: change metrics are NaN (undefined), not a crash or a warning.
    empty = ChangeMetrics(num_semantic=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        empty.update(np.zeros(4, int), np.zeros(4, int), np.zeros(4, int), np.zeros(4, int))
        m = empty.compute()
    assert math.isnan(m["change_f1"]) and math.isnan(m["sek"]) and m["oa"] == 1.0
