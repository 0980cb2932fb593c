"""Distillation behaviour that a line-coverage pass of the suite found unexercised: a student that
starts from pretrained backbone weights (``student.pretrained_weights``; its EMA copy too), and a
term switched off by a zero loss weight, whose head is neither checked against the teacher's
prototypes nor built."""

from __future__ import annotations

import torch
from test_distillation import K, distill_model, teacher_run  # noqa: F401 (fixture)


def test_the_student_and_its_ema_start_from_the_given_pretrained_backbone(teacher_run, tmp_path):  # noqa: F811
    _, reference = distill_model(teacher_run)
    generator = torch.Generator().manual_seed(1)
    pretrained = {
        k: torch.randn(v.shape, generator=generator) for k, v in reference.student.backbone.state_dict().items()
    }
    torch.save(pretrained, tmp_path / "vits_pretrained.pth")
    _, model = distill_model(teacher_run, f"student.pretrained_weights={tmp_path / 'vits_pretrained.pth'}")
    for name in ("student", "teacher"):  # the teacher attribute is the student's EMA
        state = getattr(model, name).backbone.state_dict()
        assert state.keys() == pretrained.keys()
        for key, value in pretrained.items():
            assert torch.equal(state[key], value), (name, key)
    frozen = model.frozen_teacher.backbone.state_dict()  # the distilled teacher is not touched
    assert any(not torch.equal(frozen[k], v) for k, v in pretrained.items() if k in frozen)


def test_a_term_with_zero_weight_is_not_checked_against_the_teacher_and_has_no_head(teacher_run):  # noqa: F811
    # K prototypes in the teacher's iBOT head; 7 here would be refused if the term were on
    _, model = distill_model(teacher_run, "ibot.loss_weight=0", "ibot.head_n_prototypes=7")
    assert "ibot_head" not in model.student and "dino_head" in model.student
    assert model.student.dino_head.last_layer.weight.shape[0] == K
