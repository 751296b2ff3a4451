"""Losses: finite, differentiable, ignore-aware, and split correctly across output groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rsseg.errors import ConfigError
from rsseg.losses import ClasswiseDiceLoss, MultiHeadLoss, SegmentationLoss, build_loss
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
