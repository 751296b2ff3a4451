"""Distillation (`train -P teacher=...`): the student learns the teacher's soft logits beside the labels;
alpha=0 is plain training bit for bit; a teacher that reads other pixels or gives other heads is refused."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from rsseg.data.datasets import PreparedData
from rsseg.errors import ConfigError
from rsseg.losses import distillation_loss
from rsseg.spec import OutputGroup
from rsseg.tracked_training import train_and_register
from rsseg.training import train
from tests.conftest import tiny_config


def test_soft_target_loss_is_zero_only_when_the_student_matches_the_teacher():
    groups = [OutputGroup("change", 2), OutputGroup("semantic_a", 3)]
    x = torch.randn(2, 5, 4, 4)
    assert float(distillation_loss(x, x, groups, 2.0)) == pytest.approx(0.0, abs=1e-6)
    assert float(distillation_loss(x, torch.randn(2, 5, 4, 4), groups, 2.0)) > 0.01


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_alpha_zero_is_plain_training_and_alpha_moves_the_student(seaice_prepared, change_prepared, tmp_path):
    data = PreparedData.load(seaice_prepared)
    teacher = train(tiny_config(seaice_prepared, tmp_path / "t", epochs=1, seed=7), data)
    pair = (teacher.model, teacher.spec)
    plain = _weights(train(tiny_config(seaice_prepared, tmp_path / "p", epochs=1), data).model)
    zero = _weights(train(tiny_config(seaice_prepared, tmp_path / "z", epochs=1, alpha=0.0), data, teacher=pair).model)
    assert plain.keys() == zero.keys() and all(torch.equal(plain[k], zero[k]) for k in plain)
    taught = _weights(train(tiny_config(seaice_prepared, tmp_path / "a", epochs=1, alpha=0.8), data,
                            teacher=pair).model)
    assert any(not torch.equal(plain[k], taught[k]) for k in plain)
    assert all(not p.requires_grad for p in teacher.model.parameters())  # the teacher did not learn

    change = train(tiny_config(change_prepared, tmp_path / "c", epochs=1), PreparedData.load(change_prepared))
    with pytest.raises(ConfigError, match="teacher and student differ in task"):
        train(tiny_config(seaice_prepared, tmp_path / "x", epochs=1), data, teacher=(change.model, change.spec))


@pytest.mark.slow
def test_a_registered_teacher_distils_and_the_lineage_says_so(seaice_prepared, mlflow_store, tmp_path):
    first = train_and_register(tiny_config(seaice_prepared, tmp_path / "t", epochs=1, model_name="taught"))
    student = train_and_register(tiny_config(seaice_prepared, tmp_path / "s", epochs=1, model_name="taught",
                                             teacher=f"models:/taught/{first['model_version']},"
                                                     f"{first['model_version']}"))
    tags = MlflowClient().get_model_version("taught", student["model_version"]).tags
    assert tags["distilled_from"] == "models:/taught/1,1"
