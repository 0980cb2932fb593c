"""Distillation gaps a mutation audit found: the DINO global term pairs each student view with the
frozen teacher's OTHER view (checked with a teacher head whose targets differ per sample, so the
pairing shows), and the global term's gradient reaches the student's DINO head."""

from __future__ import annotations

import pytest
import torch
from test_distillation import TEMP, distill_model, fixed_batch, teacher_run  # noqa: F401 (fixture)
from torch import nn


def _ce(targets: torch.Tensor, scores: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    return -(targets.double() * torch.log_softmax(scores.double() / temp, dim=-1)).sum(-1)


def _sharp_heads(model) -> None:
    """Plain linear DINO heads with large weights (teacher and student): scores differ strongly
    between samples, so a wrong pairing of views changes the loss (the initial heads score every
    sample almost alike)."""
    k = model.cfg.dino.head_n_prototypes
    for seed, part in ((3, model.frozen_teacher), (4, model.student)):
        dim = part.backbone.embed_dim
        head = nn.Linear(dim, k)
        with torch.no_grad():
            head.weight.copy_(10 * torch.randn(k, dim, generator=torch.Generator().manual_seed(seed)))
            head.bias.zero_()
        head.requires_grad_(part is model.student)
        part["dino_head"] = head
        with torch.no_grad():  # LayerScale starts near 0: the CLS token would not depend on the image
            for name, param in part.backbone.named_parameters():
                if name.endswith("gamma"):
                    param.fill_(1.0)


def test_global_dino_term_pairs_each_student_view_with_the_other_teacher_view(teacher_run):  # noqa: F811
    cfg, model = distill_model(teacher_run)
    _sharp_heads(model)
    model.train()
    batch = fixed_batch()
    n_local = cfg.crops.local_crops_number
    with torch.no_grad():
        t_cls = model.frozen_teacher.backbone.forward_features(batch["collated_global_crops"])["x_norm_clstoken"]
        t = [torch.softmax(model.frozen_teacher.dino_head(c).double() / TEMP, -1) for c in t_cls.chunk(2)]
        s_cls = model.student.backbone.forward_features(batch["collated_global_crops"])["x_norm_clstoken"]
        s = model.student.dino_head(s_cls).chunk(2)
        n_terms = 2 + 2 * n_local
        swapped = ((_ce(t[1], s[0]).mean() + _ce(t[0], s[1]).mean()) / n_terms).item()
        same = ((_ce(t[0], s[0]).mean() + _ce(t[1], s[1]).mean()) / n_terms).item()
        assert abs(swapped - same) > 1e-3 * abs(swapped)  # the pairing matters for this teacher
        losses = model(batch, teacher_temp=TEMP)
    assert abs(losses["dino_global_crops_loss"].item() - swapped) <= 1e-5 * abs(swapped)


def test_global_dino_term_trains_the_students_dino_head(teacher_run):  # noqa: F811
    _, model = distill_model(teacher_run)
    model.train()
    losses = model(fixed_batch(), teacher_temp=TEMP)
    params = [p for p in model.student.dino_head.parameters() if p.requires_grad]
    grads = torch.autograd.grad(losses["dino_global_crops_loss"], params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def _sinkhorn(scores: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """Plain Sinkhorn-Knopp (SwAV): rows of the result sum to 1, prototypes share the mass equally."""
    q = torch.exp(scores.double() / temp).t()
    n_prototypes, n_samples = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True) * n_prototypes
        q /= q.sum(dim=0, keepdim=True) * n_samples
    return (q * n_samples).t()


def test_sinkhorn_ibot_targets_are_balanced_over_every_patch_of_both_global_crops(teacher_run):  # noqa: F811
    _, model = distill_model(teacher_run, "train.centering=sinkhorn_knopp")
    model.train()
    batch = fixed_batch()
    with torch.no_grad():
        t_patch = model.frozen_teacher.backbone.forward_features(batch["collated_global_crops"])["x_norm_patchtokens"]
        targets = _sinkhorn(model.frozen_teacher.ibot_head(t_patch.flatten(0, 1)), TEMP)
        s_patch = model.student.backbone.forward_features(batch["collated_global_crops"])["x_norm_patchtokens"]
        scores = model.student.ibot_head(s_patch.flatten(0, 1))
        expected = _ce(targets, scores).mean().item()
        losses = model(batch, teacher_temp=TEMP)
    assert abs(losses["ibot_loss"].item() - expected) <= 1e-5 * abs(expected)


def test_accumulated_micro_batches_keep_the_steps_dino_and_ibot_centres(teacher_run):  # noqa: F811
    """Gradient accumulation in distillation: a later micro-batch of the same optimiser step
    (``accumulate=True``) is centred with the step's centre, the pending update waits for the next step;
    the next step's first micro-batch applies it."""
    _, model = distill_model(teacher_run)
    model.train()
    losses = (model.dino_loss, model.ibot_patch_loss)
    model(fixed_batch(0), teacher_temp=TEMP)  # step 1: its centre update is pending
    before = [loss.center.clone() for loss in losses]
    model(fixed_batch(1), teacher_temp=TEMP, accumulate=True)  # step 1, second micro-batch
    for loss, centre in zip(losses, before, strict=True):
        assert torch.equal(loss.center, centre), type(loss).__name__
    model(fixed_batch(2), teacher_temp=TEMP)  # step 2 applies step 1's update of both micro-batches
    for loss, centre in zip(losses, before, strict=True):
        assert not torch.allclose(loss.center, centre), type(loss).__name__


def test_the_students_mask_token_is_not_trained(teacher_run):  # noqa: F811
    """The student sees no masks, so its mask token gets no gradient: it is frozen at zero rather
    than given AdamW state and weight decay."""
    from dinov2.train.loop import build_optimizer

    cfg, model = distill_model(teacher_run)
    token = model.student.backbone.mask_token
    assert not token.requires_grad and torch.equal(token, torch.zeros_like(token))
    optimizer = build_optimizer(cfg, model)
    in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(token) not in in_groups
    assert id(model.student.backbone.cls_token) in in_groups  # the other tokens train


def test_a_student_of_another_patch_size_is_refused_naming_both(teacher_run):  # noqa: F811
    with pytest.raises(ValueError, match=r"teacher patch size 14 .* student.patch_size 16"):
        distill_model(teacher_run, "student.patch_size=16")


def test_distillation_without_a_separate_ibot_head_is_refused(teacher_run):  # noqa: F811
    with pytest.raises(ValueError, match="ibot.separate_head"):
        distill_model(teacher_run, "ibot.separate_head=false")


def test_an_export_directory_stands_for_the_teacher_checkpoint_it_holds(tmp_path):
    """``eval/training_N`` (the directory) names its teacher_checkpoint.pth: a file source, not a search
    for DCP checkpoints under it (layouts only, no training)."""
    from dinov2.train.distill_teacher import resolve_teacher_source

    run = tmp_path / "run"
    export = run / "eval" / "training_3"
    export.mkdir(parents=True)
    (export / "teacher_checkpoint.pth").touch()
    (run / "config.yaml").write_text("student: {arch: vit_small}\n")
    source = resolve_teacher_source(export)
    assert (source.kind, source.path, source.run_dir) == ("file", export / "teacher_checkpoint.pth", run)


def test_a_teacher_state_without_the_ibot_head_its_config_names_is_refused(teacher_run):  # noqa: F811
    from dinov2.train.distill_teacher import load_teacher_, read_teacher_state, resolve_teacher_source

    _, model = distill_model(teacher_run)
    state = read_teacher_state(resolve_teacher_source(teacher_run))
    assert any(k.startswith("ibot_head.") for k in state)  # the run's teacher has one
    without = {k: v for k, v in state.items() if not k.startswith("ibot_head.")}
    with pytest.raises(ValueError, match=r"holds no teacher ibot_head.*ibot\.separate_head: true"):
        load_teacher_(model.frozen_teacher, without, "the checkpoint")


def test_the_teacher_fingerprint_is_count_sum_and_sum_of_squares():
    from dinov2.train.distill_teacher import state_fingerprint

    state = {"b": torch.tensor([[1.5, -2.0]]), "a": torch.tensor([3.0, 0.25, -1.0])}
    values = [1.5, -2.0, 3.0, 0.25, -1.0]
    expected = torch.tensor([len(values), sum(values), sum(v * v for v in values)], dtype=torch.float64)
    torch.testing.assert_close(state_fingerprint(state), expected, rtol=0, atol=1e-12)
    # a change that keeps the count, the sum and the sum of magnitudes still shows
    assert not torch.equal(state_fingerprint({"w": torch.tensor([2.0, 0.0])}), state_fingerprint({"w": torch.ones(2)}))
