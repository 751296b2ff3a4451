"""Losses: finite, differentiable, ignore-aware, and split correctly across output groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rsseg.errors import ConfigError
from rsseg.losses import (
    LOSS_TERMS,
    ClasswiseDiceLoss,
    MultiHeadLoss,
    SegmentationLoss,
    build_loss,
    parse_loss,
)
from rsseg.spec import OutputGroup

IGNORE = 255


def _batch(n: int = 2, c: int = 4, h: int = 16, w: int = 16, seed: int = 0, ignore_frac: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, generator=g, requires_grad=True)
    target = torch.randint(0, c, (n, h, w), generator=g)
    target[torch.rand(n, h, w, generator=g) < ignore_frac] = IGNORE
    return logits, target


@pytest.mark.parametrize("loss", [ClasswiseDiceLoss(), SegmentationLoss(), SegmentationLoss(label_smoothing=0.1)])
def test_finite_and_differentiable(loss: torch.nn.Module) -> None:
    logits, target = _batch()
    value = loss(logits, target)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_dice_small_for_perfect_prediction_and_large_for_wrong() -> None:
    _, target = _batch(c=3, ignore_frac=0.0)
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50.0
    wrong = F.one_hot((target + 1) % 3, 3).permute(0, 3, 1, 2).float() * 50.0
    dice = ClasswiseDiceLoss()
    assert dice(perfect, target).item() < 1e-3
    assert dice(wrong, target).item() > 0.9


def test_present_dice_averages_only_classes_in_the_labels() -> None:
    logits, target = _batch(c=4, ignore_frac=0.0)
    target = target % 3  # class 3 never appears in the labels
    probs = torch.softmax(logits, 1)
    one_hot = F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    per_class = (2 * (probs * one_hot).sum((0, 2, 3)) + 1) / (probs.sum((0, 2, 3)) + one_hot.sum((0, 2, 3)) + 1)
    present = ClasswiseDiceLoss(present_only=True)(logits, target)
    torch.testing.assert_close(present, 1 - per_class[:3].mean())
    torch.testing.assert_close(ClasswiseDiceLoss()(logits, target), 1 - per_class.mean())
    # Unlike the all-classes mean, the absent class's own Dice adds no push: its gradient is only the
    # softmax coupling through the present classes, and differs from the all-classes one.
    present.backward()
    from_present = logits.grad.clone()
    logits.grad = None
    ClasswiseDiceLoss()(logits, target).backward()
    assert not torch.allclose(from_present[:, 3], logits.grad[:, 3])


def test_present_dice_is_a_loss_term() -> None:
    assert ("dice_present", 1.0) in parse_loss("ce+dice_present")
    logits, target = _batch()
    value = SegmentationLoss(terms=parse_loss("ce+dice_present"))(logits, target)
    assert torch.isfinite(value) and value > 0
    empty = torch.full_like(target, IGNORE)
    assert SegmentationLoss(terms=parse_loss("dice_present"))(logits, empty).item() == 0.0


def test_ignored_pixels_do_not_change_the_loss() -> None:
    logits, target = _batch(ignore_frac=0.3)
    loss = SegmentationLoss()
    base = loss(logits, target)
    ignored = target == IGNORE
    # Whatever the logits are under ignored pixels, the loss and the other pixels' gradients stay put.
    scrambled = torch.where(ignored.unsqueeze(1), torch.randn_like(logits) * 10, logits.detach()).requires_grad_()
    other = loss(scrambled, target)
    torch.testing.assert_close(base, other)
    base.backward()
    other.backward()
    assert torch.all(scrambled.grad[ignored.unsqueeze(1).expand_as(logits)] == 0)
    torch.testing.assert_close(logits.grad, scrambled.grad)


def test_all_ignored_batch_gives_zero_with_grad() -> None:
    logits, _ = _batch()
    target = torch.full((2, 16, 16), IGNORE, dtype=torch.int64)
    for loss in (SegmentationLoss(), SegmentationLoss(dice_weight=0.0), ClasswiseDiceLoss()):
        value = loss(logits, target)
        assert value.item() == 0.0 and value.requires_grad
        value.backward()
        assert torch.isfinite(logits.grad).all()
    total, parts = build_loss([OutputGroup("classes", 4)])(logits, {"classes": target})
    assert total.item() == 0.0 and all(v == 0.0 for v in parts.values())


def test_class_weights_and_smoothing_match_torch_cross_entropy() -> None:
    logits, target = _batch(c=3)
    weights = [0.2, 1.0, 3.0]
    loss = SegmentationLoss(dice_weight=0.0, class_weights=weights, label_smoothing=0.05)
    expected = F.cross_entropy(
        logits, target, weight=torch.tensor(weights), ignore_index=IGNORE, label_smoothing=0.05
    )
    torch.testing.assert_close(loss(logits, target), expected)
    assert not torch.allclose(expected, SegmentationLoss(dice_weight=0.0, label_smoothing=0.05)(logits, target))


def test_default_is_sum_and_zero_weight_skips_term() -> None:
    logits, target = _batch()
    terms = SegmentationLoss().terms(logits, target)
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["dice"])
    torch.testing.assert_close(SegmentationLoss(ce_weight=0.0)(logits, target), ClasswiseDiceLoss()(logits, target))
    assert set(SegmentationLoss(ce_weight=0.0).terms(logits, target)) == {"dice", "loss"}


def test_multihead_splits_channels_by_group() -> None:
    groups = [OutputGroup("change", 2), OutputGroup("semantic_a", 5), OutputGroup("semantic_b", 5)]
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 12, 8, 8, generator=g, requires_grad=True)
    targets = {
        "change": torch.randint(0, 2, (2, 8, 8), generator=g),
        "semantic_a": torch.randint(0, 5, (2, 8, 8), generator=g),
        "semantic_b": torch.randint(0, 5, (2, 8, 8), generator=g),
    }
    targets["semantic_b"][0, :3] = IGNORE
    loss = build_loss(groups, class_weights=[1.0, 2.0, 1.0, 1.0, 0.5])
    assert isinstance(loss, MultiHeadLoss)
    total, parts = loss(logits, targets)

    plain = SegmentationLoss()
    weighted = SegmentationLoss(class_weights=[1.0, 2.0, 1.0, 1.0, 0.5])
    expected = (
        plain(logits[:, 0:2], targets["change"])
        + weighted(logits[:, 2:7], targets["semantic_a"])
        + weighted(logits[:, 7:12], targets["semantic_b"])
    )
    torch.testing.assert_close(total, expected)
    assert set(parts) == {f"{n}_{k}" for n in targets for k in ("ce", "dice", "loss")}
    assert all(isinstance(v, float) for v in parts.values())
    assert parts["change_loss"] == pytest.approx(plain(logits[:, 0:2], targets["change"]).item(), rel=1e-5)
    total.backward()
    assert torch.isfinite(logits.grad).all()

    # A group without targets is skipped.
    only_change, parts = loss(logits, {"change": targets["change"]})
    torch.testing.assert_close(only_change, plain(logits[:, 0:2], targets["change"]))
    assert set(parts) == {"change_ce", "change_dice", "change_loss"}


def test_multihead_rejects_bad_inputs() -> None:
    loss = build_loss([OutputGroup("classes", 3)])
    logits, target = _batch(c=3)
    with pytest.raises(ValueError, match="unknown output group"):
        loss(logits, {"clases": target})
    with pytest.raises(ValueError, match="channels"):
        loss(logits[:, :2], {"classes": target})


def test_bad_class_weights_raise_config_error_naming_the_group() -> None:
    with pytest.raises(ConfigError, match="'classes'"):
        build_loss([OutputGroup("classes", 3)], class_weights=[1.0, 2.0])
    with pytest.raises(ConfigError, match="'semantic_a'"):
        build_loss(
            [OutputGroup("change", 2), OutputGroup("semantic_a", 5)], class_weights={"semantic_a": [1.0, 2.0]}
        )
    with pytest.raises(ConfigError, match="nope"):
        build_loss([OutputGroup("classes", 3)], class_weights={"nope": [1.0, 2.0, 3.0]})
    with pytest.raises(ConfigError, match="ce_weight"):
        SegmentationLoss(ce_weight=0.0, dice_weight=0.0)
    with pytest.raises(ConfigError, match="label_smoothing"):
        SegmentationLoss(label_smoothing=1.5)


def test_class_weights_dict_applies_per_group() -> None:
    groups = [OutputGroup("change", 2), OutputGroup("semantic_a", 3)]
    loss = build_loss(groups, class_weights={"change": [1.0, 4.0]}, dice_weight=0.0)
    logits, _ = _batch(c=5, ignore_frac=0.0)
    change = torch.randint(0, 2, (2, 16, 16))
    total, _ = loss(logits, {"change": change})
    torch.testing.assert_close(total, F.cross_entropy(logits[:, :2], change, weight=torch.tensor([1.0, 4.0])))


# ------------------------------------------------------------------------------------------- named terms


def test_parse_loss_names_and_weights() -> None:
    assert parse_loss("ce+dice") == [("ce", 1.0), ("dice", 1.0)]
    assert parse_loss(" ce + lovasz:0.5 ") == [("ce", 1.0), ("lovasz", 0.5)]
    for bad, what in [("ce+cats", "unknown term 'cats'"), ("ce:x", "not a number"), ("ce+ce:2", "named twice"),
                      ("dice:-1", ">= 0"), ("", "unknown term ''")]:
        with pytest.raises(ConfigError, match=what):
            parse_loss(bad)


@pytest.mark.parametrize("term", LOSS_TERMS)
def test_every_term_is_finite_differentiable_and_ignores_ignored_pixels(term: str) -> None:
    loss = SegmentationLoss(terms=[(term, 1.0)], class_weights=[1.0, 2.0, 1.0, 0.5] if term != "dice" else None)
    logits, target = _batch(seed=3)
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value) and logits.grad is not None and torch.isfinite(logits.grad).all()
    ignored = target == IGNORE
    assert bool(ignored.any()) and float(logits.grad.abs().sum(1)[ignored].max()) == 0.0  # no gradient there
    elsewhere = torch.where(ignored.unsqueeze(1), torch.randn_like(logits) * 10, logits.detach())
    torch.testing.assert_close(loss(elsewhere, target), value.detach())  # logits under ignored pixels don't count


def test_focal_with_gamma_zero_is_cross_entropy() -> None:
    logits, target = _batch(seed=4)
    focal = SegmentationLoss(terms=[("focal", 1.0)], focal_gamma=0.0)(logits, target)
    torch.testing.assert_close(focal, F.cross_entropy(logits, target, ignore_index=IGNORE))
    assert SegmentationLoss(terms=[("focal", 1.0)])(logits, target) < focal  # gamma 2 discounts easy pixels


def test_lovasz_of_confident_predictions_is_one_minus_mean_iou() -> None:
    target = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 1]]])
    predicted = torch.tensor([[[0, 1, 1, 1], [0, 2, 2, 2]]])
    logits = F.one_hot(predicted, 3).permute(0, 3, 1, 2).float() * 50.0
    ious = []
    for c in range(3):
        inter = ((predicted == c) & (target == c)).sum().item()
        union = ((predicted == c) | (target == c)).sum().item()
        ious.append(inter / union)
    lovasz = SegmentationLoss(terms=[("lovasz", 1.0)])(logits, target)
    assert float(lovasz) == pytest.approx(1.0 - sum(ious) / 3, abs=1e-4)
    perfect = F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 50.0
    assert float(SegmentationLoss(terms=[("lovasz", 1.0)])(perfect, target)) == pytest.approx(0.0, abs=1e-4)


def test_edge_ce_smooths_only_near_boundaries() -> None:
    logits = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    uniform = torch.zeros(1, 12, 12, dtype=torch.int64)  # no boundary anywhere: plain CE
    edge = SegmentationLoss(terms=[("edge_ce", 1.0)], edge_smoothing=0.3)
    torch.testing.assert_close(edge(logits, uniform), F.cross_entropy(logits, uniform))
    split = uniform.clone()
    split[:, :, 6:] = 2  # one vertical boundary: columns 4..7 are within 2 px of the other class
    same = SegmentationLoss(terms=[("edge_ce", 1.0)], label_smoothing=0.3, edge_smoothing=0.3)
    torch.testing.assert_close(same(logits, split), F.cross_entropy(logits, split, label_smoothing=0.3))
    near = torch.zeros(1, 12, 12, dtype=torch.bool)
    near[:, :, 4:8] = True
    per_pixel = F.cross_entropy(logits, split, reduction="none")
    smoothed = F.cross_entropy(logits, split, reduction="none", label_smoothing=0.3)
    torch.testing.assert_close(edge(logits, split), torch.where(near, smoothed, per_pixel).mean())


def test_build_loss_from_a_name_logs_each_term() -> None:
    logits, target = _batch(c=3, seed=6)
    total, parts = build_loss([OutputGroup("classes", 3)], loss="ce+lovasz:0.5")(logits, {"classes": target})
    assert set(parts) == {"classes_ce", "classes_lovasz", "classes_loss"}
    assert parts["classes_loss"] == pytest.approx(parts["classes_ce"] + 0.5 * parts["classes_lovasz"], rel=1e-5)
    with pytest.raises(ConfigError, match="every term has weight 0"):
        build_loss([OutputGroup("classes", 3)], loss="lovasz:0")
