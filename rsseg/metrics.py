"""Confusion-matrix metrics, accumulated over batches.

Everything is derived from int64 count matrices, so partial results add up: across tiles, across
batches (`update`), across workers or DDP ranks (`merge`, or all-reduce `.matrix` and assign it back).

Conventions (all documented in the returned keys' meaning):
- rows of a confusion matrix are the target, columns the prediction;
- a class absent from BOTH target and prediction has NaN IoU/F1/precision/recall and is left out of
  the means (NaN-mean); a class present on one side only scores 0 where a ratio is 0/0
  (e.g. never predicted -> precision 0), as scikit-learn's `zero_division=0`;
- a metric with nothing to measure (no valid pixels) is NaN. No division warnings are emitted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rsseg.errors import ConfigError
from rsseg.spec import DEFAULT_IGNORE_INDEX

ArrayLike = Any  # torch.Tensor | np.ndarray of integer class indices


class ConfusionMatrix:
    """K x K pixel counts; `update` with argmaxed predictions and targets of the same shape."""

    def __init__(self, num_classes: int, ignore_index: int = DEFAULT_IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def reset(self) -> None:
        self.matrix[:] = 0

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        self.matrix += confusion_counts(pred, target, self.num_classes, self.ignore_index)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts into this one (in place); returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class counts into {self.num_classes}-class counts")
        self.matrix += other.matrix
        return self

    def compute(self, class_names: Sequence[str] | None = None) -> dict[str, float]:
        """oa, miou, fwiou, kappa, mean_f1/precision/recall, and iou_/f1_/precision_/recall_<name>."""
        names = class_keys(class_names, self.num_classes)
        stats = per_class(self.matrix)
        out: dict[str, float] = {
            "oa": overall_accuracy(self.matrix),
            "miou": nanmean(stats["iou"]),
            "fwiou": frequency_weighted_iou(self.matrix),
            "kappa": cohen_kappa(self.matrix),
            "mean_f1": nanmean(stats["f1"]),
            "mean_precision": nanmean(stats["precision"]),
            "mean_recall": nanmean(stats["recall"]),
        }
        for metric in ("iou", "f1", "precision", "recall"):
            for name, value in zip(names, stats[metric]):
                out[f"{metric}_{name}"] = float(value)
        return out


def binary_metrics(cm: ConfusionMatrix, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """`cm.compute()` plus iou_target/f1_target/precision_target/recall_target (class index 1)."""
    if cm.num_classes != 2:
        raise ValueError(f"binary_metrics needs a 2-class confusion matrix, got {cm.num_classes} classes")
    out = cm.compute(class_names)
    stats = per_class(cm.matrix)
    for metric in ("iou", "f1", "precision", "recall"):
        out[f"{metric}_target"] = float(stats[metric][1])
    return out


class ChangeMetrics:
    """Binary change metrics, plus SECOND/SenseEarth2020 semantic change metrics (SeK) when
    `num_semantic` is given.

    Semantic maps use index 0 = unchanged and 1..K-1 = land-cover classes of changed pixels;
    predicted semantic maps must already be masked by the predicted change (unchanged -> 0).
    """

    def __init__(self, num_semantic: int | None, ignore_index: int = DEFAULT_IGNORE_INDEX) -> None:
        if num_semantic is not None and num_semantic < 2:
            raise ConfigError(
                f"num_semantic must be >= 2 (unchanged + at least one class), got {num_semantic}; "
                "use None for change without semantic labels"
            )
        self.num_semantic = num_semantic
        self.ignore_index = ignore_index
        self.change = ConfusionMatrix(2, ignore_index)
        self.semantic = ConfusionMatrix(num_semantic, ignore_index) if num_semantic is not None else None

    def reset(self) -> None:
        self.change.reset()
        if self.semantic is not None:
            self.semantic.reset()

    def update(
        self,
        change_pred: ArrayLike,
        change_target: ArrayLike,
        sem_pred_a: ArrayLike | None = None,
        sem_target_a: ArrayLike | None = None,
        sem_pred_b: ArrayLike | None = None,
        sem_target_b: ArrayLike | None = None,
    ) -> None:
        self.change.update(change_pred, change_target)
        for date, pred, target in (("a", sem_pred_a, sem_target_a), ("b", sem_pred_b, sem_target_b)):
            if pred is None and target is None:
                continue
            if pred is None or target is None:
                raise ValueError(f"give both sem_pred_{date} and sem_target_{date}, or neither")
            if self.semantic is None:
                raise ValueError("semantic maps given but ChangeMetrics was built with num_semantic=None")
            # Both dates go into one histogram, as in the SenseEarth2020 / SECOND evaluation.
            self.semantic.update(pred, target)

    def merge(self, other: ChangeMetrics) -> ChangeMetrics:
        if other.num_semantic != self.num_semantic:
            raise ValueError(f"cannot merge num_semantic={other.num_semantic} into num_semantic={self.num_semantic}")
        self.change.merge(other.change)
        if self.semantic is not None and other.semantic is not None:
            self.semantic.merge(other.semantic)
        return self

    def compute(self) -> dict[str, float]:
        """change_iou/f1/precision/recall (changed = class 1), oa; with semantics: sek,
        semantic_miou, score."""
        stats = per_class(self.change.matrix)
        out = {
            "change_iou": float(stats["iou"][1]),
            "change_f1": float(stats["f1"][1]),
            "change_precision": float(stats["precision"][1]),
            "change_recall": float(stats["recall"][1]),
            "oa": overall_accuracy(self.change.matrix),
        }
        if self.semantic is not None:
            out.update(sek_metrics(self.semantic.matrix))
        return out


def sek_metrics(hist: np.ndarray) -> dict[str, float]:
    """SenseEarth2020 / SECOND metrics from a K x K semantic histogram (rows target, index 0 unchanged).

    semantic_miou: mean IoU of the 2-class unchanged/changed matrix folded from `hist` (a changed pixel
    counts as correctly changed whatever its predicted land-cover class);
    sek = kappa(hist with [0,0] zeroed) * exp(IoU_changed - 1); score = 0.3 * semantic_miou + 0.7 * sek.
    Kappa is 0 where undefined (the reference's convention), so a perfect prediction scores sek == 1
    only if at least two land-cover classes occur. IoU_changed is NaN (and so sek and score) when no
    pixel is changed in target or prediction.
    """
    hist = np.asarray(hist, dtype=np.int64)
    if hist.sum() == 0:
        return {"sek": math.nan, "semantic_miou": math.nan, "score": math.nan}
    c2 = np.array(
        [[hist[0, 0], hist[0, 1:].sum()], [hist[1:, 0].sum(), hist[1:, 1:].sum()]],
        dtype=np.int64,
    )
    iou = per_class(c2)["iou"]  # [iou_unchanged, iou_changed]
    semantic_miou = nanmean(iou)
    hist_n0 = hist.copy()
    hist_n0[0, 0] = 0
    kappa_n0 = cohen_kappa(hist_n0)
    if math.isnan(kappa_n0):
        kappa_n0 = 0.0
    sek = kappa_n0 * math.exp(iou[1] - 1.0) if not math.isnan(iou[1]) else math.nan
    return {"sek": sek, "semantic_miou": semantic_miou, "score": 0.3 * semantic_miou + 0.7 * sek}


# --- building blocks (numpy, on count matrices) ---------------------------------------------------


def confusion_counts(pred: ArrayLike, target: ArrayLike, num_classes: int, ignore_index: int) -> np.ndarray:
    """K x K int64 counts of (target, pred) pairs, skipping target == ignore_index."""
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    k = num_classes
    if isinstance(pred, torch.Tensor) or isinstance(target, torch.Tensor):
        # Stay on the tensors' device (bincount on GPU), bring back only K*K counts.
        p = torch.as_tensor(pred).reshape(-1)
        t = torch.as_tensor(target, device=p.device).reshape(-1)
        keep = t != ignore_index
        p, t = p[keep].long(), t[keep].long()
        if t.numel():
            lo, hi = torch.stack([torch.minimum(p.min(), t.min()), torch.maximum(p.max(), t.max())]).tolist()
            _check_range(lo, hi, k, ignore_index)
        return torch.bincount(t * k + p, minlength=k * k).reshape(k, k).cpu().numpy().astype(np.int64)
    p = np.asarray(pred).reshape(-1)
    t = np.asarray(target).reshape(-1)
    keep = t != ignore_index
    p, t = p[keep].astype(np.int64), t[keep].astype(np.int64)
    if t.size:
        _check_range(int(min(p.min(), t.min())), int(max(p.max(), t.max())), k, ignore_index)
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.int64)


def _check_range(lo: int, hi: int, k: int, ignore_index: int) -> None:
    if lo < 0 or hi >= k:
        raise ValueError(
            f"class indices must be in [0, {k}) (or {ignore_index} in the target to ignore), found values in "
            f"[{lo}, {hi}]; check the mask decoding / number of classes"
        )


def per_class(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class iou, f1, precision, recall (float64 arrays); NaN for classes absent on both sides."""
    m = np.asarray(matrix, dtype=np.float64)
    tp = np.diag(m)
    support = m.sum(axis=1)  # target count
    predicted = m.sum(axis=0)
    absent = (support == 0) & (predicted == 0)
    union = support + predicted - tp
    return {
        "iou": _ratio(tp, union, absent),
        "f1": _ratio(2 * tp, support + predicted, absent),
        "precision": _ratio(tp, predicted, absent),
        "recall": _ratio(tp, support, absent),
    }


def _ratio(num: np.ndarray, den: np.ndarray, absent: np.ndarray) -> np.ndarray:
    out = np.divide(num, den, out=np.zeros_like(num), where=den > 0)  # 0/0 -> 0 (zero_division=0) ...
    out[absent] = np.nan  # ... except for classes absent on both sides: undefined, left out of means
    return out


def overall_accuracy(matrix: np.ndarray) -> float:
    total = matrix.sum()
    return float(np.trace(matrix) / total) if total else math.nan


def frequency_weighted_iou(matrix: np.ndarray) -> float:
    """Sum of class IoUs weighted by each class's share of target pixels."""
    total = matrix.sum()
    if not total:
        return math.nan
    freq = matrix.sum(axis=1) / total
    iou = per_class(matrix)["iou"]
    present = freq > 0  # present in target -> IoU defined
    return float((freq[present] * iou[present]).sum())


def cohen_kappa(matrix: np.ndarray) -> float:
    """Cohen's kappa, NaN when undefined (no pixels, or chance agreement 1)."""
    # Exact integer arithmetic: n**2 exceeds float64's exact range for large validation sets.
    m = [[int(v) for v in row] for row in np.asarray(matrix)]
    n = sum(map(sum, m))
    rows = [sum(r) for r in m]
    cols = [sum(c) for c in zip(*m)]
    diag = sum(m[i][i] for i in range(len(m)))
    expected = sum(r * c for r, c in zip(rows, cols))
    den = n * n - expected
    if den == 0:
        return math.nan
    return (n * diag - expected) / den


def nanmean(values: np.ndarray) -> float:
    """Mean over non-NaN values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def class_keys(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """Metric-key-safe class names ([a-z0-9_]); default class0, class1, ..."""
    if class_names is None:
        return [f"class{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ConfigError(f"class_names has {len(class_names)} names for {num_classes} classes; give one per class")
    keys = []
    for i, name in enumerate(class_names):
        key = re.sub(r"[^a-z0-9_]+", "_", str(name).lower()).strip("_")
        keys.append(key or f"class{i}")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"class names {list(class_names)} collide as metric keys {keys}; make them distinct")
    return keys
