"""Distillation (DistillMetaArch): a tiny ViT-B teacher pretrained here for one step, distilled into
a one-block ViT-S on CPU. Expected values are computed independently in the tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dinov2.checkpoint import find_latest_checkpoint
from dinov2.checkpoint.sharded import load_full_tensors, read_tensor_metadata
from dinov2.layers.block import Block
from dinov2.train.distill_meta_arch import DistillMetaArch, TeacherChangedError
from dinov2.train.init_from import load_init_source, resolve_init_source
from dinov2.train.loop import Trainer
from dinov2.train.schedules import apply_optim_scheduler
from dinov2.train.train import build_model, main
from dinov2.utils.config import load_config
from dinov2.utils.device import seed_everything

B, N_LOCAL, K, TEMP = 4, 2, 64, 0.07
HEADS = [f"{h}.{k}={v}" for h in ("dino", "ibot") for k, v in
         (("head_n_prototypes", K), ("head_hidden_dim", 32), ("head_bottleneck_dim", 16))]  # fmt: skip
COMMON = [
    "train.device=cpu",
    "train.dataset_path=Synthetic:split=TRAIN:num_images=64:image_size=32",
    f"train.batch_size_per_gpu={B}",
    "train.num_workers=0",
    "train.log_period=1",
    "student.patch_size=14",
    "student.embed_dim=null",
    "student.num_heads=null",
    "crops.global_crops_size=28",
    "crops.local_crops_size=14",
    f"crops.local_crops_number={N_LOCAL}",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "optim.freeze_last_layer_epochs=0",
    "teacher.warmup_teacher_temp_epochs=0",
    *HEADS,
]
PRETRAIN = [*COMMON, "student.arch=vit_base", "student.depth=2", "train.OFFICIAL_EPOCH_LENGTH=2",
            "train.stop_at_iteration=1", "evaluation.eval_period_iterations=1"]  # fmt: skip


def distill_opts(teacher: Path | str, *extra: str) -> list[str]:
    return [
        *COMMON,
        "distillation.enabled=true",
        f"distillation.teacher_checkpoint={teacher}",
        "student.arch=vit_small",
        "student.depth=1",
        "student.drop_path_rate=0.3",  # forced to 0 by distillation
        "ibot.mask_sample_probability=0.5",  # masks drawn by the collate are ignored
        "train.OFFICIAL_EPOCH_LENGTH=4",
        "train.checkpoint_period_iterations=2",
        "evaluation.eval_period_iterations=4",
        "teacher.momentum_teacher=0.9",
        *extra,
    ]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory) -> Path:
    """A pretraining run (ViT-B, 2 blocks) of one step: checkpoint, config.yaml and export."""
    run = tmp_path_factory.mktemp("vitb_pretrain")
    main(["--output-dir", str(run), *PRETRAIN])
    return run


def distill_model(teacher: Path | str, *extra: str):
    cfg = load_config(None, distill_opts(teacher, *extra))
    seed_everything(0)
    return cfg, build_model(cfg, torch.device("cpu"))


def fixed_batch(seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n_patches = 4  # (28 / 14) ** 2
    masks = torch.zeros(2 * B, n_patches, dtype=torch.bool)
    masks[:B, :2] = True  # half of the global crops masked: a student that used them would differ
    indices = masks.flatten().nonzero().flatten()

    def crops(n, size):
        return torch.randn(n, 3, size, size, generator=gen) + 2 * torch.randn(n, 3, 1, 1, generator=gen)

    return {
        "collated_global_crops": crops(2 * B, 28),
        "collated_local_crops": crops(N_LOCAL * B, 14),
        "collated_masks": masks,
        "mask_indices_list": indices,
        "masks_weight": (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks],
        "n_masked_patches": torch.tensor([len(indices)]),
        "upperbound": len(indices),
    }


def records(run: Path) -> dict[int, dict]:
    lines = (run / "training_metrics.json").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines) if "loss" in r}


def _ce(targets: torch.Tensor, scores: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    """Row-wise -sum_k t_k log softmax(s / temp)_k in float64."""
    return -(targets.double() * torch.log_softmax(scores.double() / temp, dim=-1)).sum(-1)


@torch.no_grad()
def expected_first_losses(
    model: DistillMetaArch, batch: dict, teacher_patch_head: str = "ibot_head", n_local: int = N_LOCAL
) -> dict[str, float]:
    """DINO and iBOT terms of a first step (softmax-centering, centres zero), from plain loops;
    the student sees the global crops without any mask. ``teacher_patch_head``: the frozen teacher's
    head that scores its patch tokens."""
    frozen, student = model.frozen_teacher, model.student
    t_out = frozen.backbone.forward_features(batch["collated_global_crops"])
    t_cls = t_out["x_norm_clstoken"].chunk(2)
    t_dino = [torch.softmax(frozen.dino_head(c).double() / TEMP, -1) for c in t_cls]  # per view
    s_glob = student.backbone.forward_features(batch["collated_global_crops"])
    v_glob = student.dino_head(s_glob["x_norm_clstoken"]).chunk(2)
    n_terms = 2 + 2 * n_local
    losses = {}
    if n_local:
        s_loc = student.backbone.forward_features(batch["collated_local_crops"])
        v_loc = student.dino_head(s_loc["x_norm_clstoken"]).chunk(n_local)
        losses["dino_local_crops_loss"] = (sum(_ce(t, v).mean() for v in v_loc for t in t_dino) / n_terms).item()
    glob = (_ce(t_dino[1], v_glob[0]).mean() + _ce(t_dino[0], v_glob[1]).mean()) / n_terms
    t_patch = torch.softmax(frozen[teacher_patch_head](t_out["x_norm_patchtokens"]).double() / TEMP, -1)
    s_patch = student.ibot_head(s_glob["x_norm_patchtokens"])
    ibot = _ce(t_patch, s_patch).mean()  # every patch token of every global crop
    return {**losses, "dino_global_crops_loss": glob.item(), "ibot_loss": ibot.item()}


def test_losses_use_every_patch_and_no_masks_and_no_stochastic_depth(teacher_run, caplog):
    with caplog.at_level("WARNING", logger="dinov2"):
        cfg, model = distill_model(teacher_run)
    # both settings the recipe ignores are named: the stochastic depth and the masks the collate still draws
    assert "student.drop_path_rate=0.3 is ignored" in caplog.text
    assert "ibot.mask_sample_probability=0.5) are drawn but ignored" in caplog.text
    blocks = [m for m in model.student.modules() if isinstance(m, Block)]
    assert cfg.student.drop_path_rate == 0.3 and blocks
    assert all(b.sample_drop_ratio == 0 and isinstance(b.drop_path1, torch.nn.Identity) for b in blocks)
    model.train()
    batch = fixed_batch()
    expected = expected_first_losses(model, batch)
    losses = model(batch, teacher_temp=TEMP)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name
    # the batch's masks would change the iBOT term if the student used them
    masked = model.student.backbone.forward_features(batch["collated_global_crops"], masks=batch["collated_masks"])
    plain = model.student.backbone.forward_features(batch["collated_global_crops"])
    assert not torch.allclose(masked["x_norm_patchtokens"], plain["x_norm_patchtokens"])


def test_teacher_frozen_student_learns_and_spare_ema_tracks_it(teacher_run, tmp_path):
    cfg, model = distill_model(teacher_run)
    trainer = Trainer(cfg, model, torch.device("cpu"), tmp_path)
    frozen = {k: v.clone() for k, v in model.frozen_teacher.state_dict().items()}
    student_start = {k: v.clone() for k, v in model.student.state_dict().items()}
    assert all(not p.requires_grad for p in model.frozen_teacher.parameters())
    model.train()
    assert not model.frozen_teacher.training and not model.teacher.training
    batch, momentum, losses = fixed_batch(), 0.8, []
    scheduled = {"lr": 2e-3, "wd": 0.0, "mom": momentum, "last_layer_lr": 2e-3, "teacher_temp": TEMP}
    for _ in range(12):
        ema_before = {k: v.clone() for k, v in model.teacher.named_parameters()}
        apply_optim_scheduler(trainer.optimizer, scheduled["lr"], scheduled["wd"], scheduled["last_layer_lr"])
        out, _ = trainer.step(iter([batch]), scheduled)
        losses.append(out["loss"].item())
        student = dict(model.student.named_parameters())
        for name, ema in model.teacher.named_parameters():
            want = momentum * ema_before[name].double() + (1 - momentum) * student[name].detach().double()
            torch.testing.assert_close(ema.double(), want, rtol=1e-6, atol=1e-7, msg=name)
        qkv = "backbone.blocks.0.attn.qkv.weight"  # the EMA moves: the comparison is not vacuous
        assert not torch.equal(model.teacher.get_parameter(qkv), ema_before[qkv])
    for key, value in model.frozen_teacher.state_dict().items():
        assert torch.equal(value, frozen[key]), key  # bit-identical
    assert all(p.grad is None and not p.requires_grad for p in model.frozen_teacher.parameters())
    moved = [k for k, v in model.student.state_dict().items() if not torch.equal(v, student_start[k])]
    assert "backbone.blocks.0.attn.qkv.weight" in moved
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.fixture(scope="module")
def distill_run(teacher_run, tmp_path_factory) -> tuple[Path, dict]:
    """The uninterrupted 4-iteration distillation run and its summary (tests only read it)."""
    run = tmp_path_factory.mktemp("distill_straight")
    return run, main(["--output-dir", str(run), *distill_opts(teacher_run)])


def test_run_exports_the_ema_checkpoints_without_the_frozen_teacher(distill_run):
    from dinov2.hub.backbones import dinov2_vits14

    run, summary = distill_run
    assert summary["iteration"] == 4 and all(r["ibot_loss"] > 0 for r in records(run).values())
    ckpt = find_latest_checkpoint(run / "checkpoints")
    keys = read_tensor_metadata(ckpt)
    assert not [k for k in keys if "frozen_teacher" in k]
    assert {"model.teacher_fingerprint", "model.dino_loss.center", "model.ibot_patch_loss.center"} <= set(keys)
    assert any(k.startswith("optimizer.state.student.backbone.") for k in keys)
    ema = load_full_tensors(ckpt, "model.teacher.backbone.")  # the spare EMA of the student
    student = load_full_tensors(ckpt, "model.student.backbone.")
    assert not torch.equal(student["blocks.0.attn.qkv.weight"], ema["blocks.0.attn.qkv.weight"])
    x = torch.randn(2, 3, 28, 28)
    reference = dinov2_vits14(pretrained=False, img_size=28, depth=1).eval()
    reference.load_state_dict(ema, strict=True)
    export = run / "eval" / "training_4"
    flat = dinov2_vits14(pretrained=False, img_size=28, depth=1).eval()  # the official single-file layout
    flat.load_state_dict(load_file(export / "teacher_backbone.safetensors"), strict=True)
    from_pth = dinov2_vits14(weights=str(export / "teacher_checkpoint.pth"), img_size=28, depth=1).eval()
    for model in (flat, from_pth):
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_resume_repeats_the_uninterrupted_run(teacher_run, distill_run, tmp_path):
    straight, resumed = distill_run[0], tmp_path / "resumed"
    main(["--output-dir", str(resumed), *distill_opts(teacher_run, "train.stop_at_iteration=2")])
    main(["--output-dir", str(resumed), *distill_opts(teacher_run)])
    a, b = records(straight), records(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for it in a:
        for term in ("loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"):
            assert b[it][term] == pytest.approx(a[it][term], rel=0, abs=1e-6), (it, term)
    final_a = load_full_tensors(find_latest_checkpoint(straight / "checkpoints"), "model.")
    final_b = load_full_tensors(find_latest_checkpoint(resumed / "checkpoints"), "model.")
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key


def test_teacher_from_an_export_and_a_changed_teacher_refuses_to_resume(teacher_run, tmp_path):
    export = tmp_path / "teacher" / "eval" / "training_1" / "teacher_checkpoint.pth"
    export.parent.mkdir(parents=True)
    shutil.copy(teacher_run / "eval" / "training_1" / "teacher_checkpoint.pth", export)
    shutil.copy(teacher_run / "config.yaml", tmp_path / "teacher" / "config.yaml")
    run = tmp_path / "run"
    main(["--output-dir", str(run), *distill_opts(export, "train.stop_at_iteration=2")])
    state = torch.load(export, weights_only=True)
    state["teacher"]["dino_head.mlp.0.bias"] += 0.01
    torch.save(state, export)
    # also a finished run rerun with nothing left to train (it used to log "nothing to train" and go on)
    with pytest.raises(TeacherChangedError, match="differs from the one this run started with"):
        main(["--output-dir", str(run), *distill_opts(export, "train.stop_at_iteration=2")])
    with pytest.raises(TeacherChangedError, match="differs from the one this run started with"):
        main(["--output-dir", str(run), *distill_opts(export)])


def test_clear_errors_for_unusable_teachers(teacher_run, tmp_path):
    backbone_only = teacher_run / "eval" / "training_1" / "teacher_backbone.safetensors"
    with pytest.raises(ValueError, match="without the DINO/iBOT heads"):
        distill_model(backbone_only)
    # outside any run (a consolidated file, released weights): the same refusal, not a request for
    # distillation.teacher_config (which, once given, would only lead to this refusal)
    shutil.copy(backbone_only, tmp_path / "consolidated.safetensors")
    with pytest.raises(ValueError, match="without the DINO/iBOT heads"):
        distill_model(tmp_path / "consolidated.safetensors")
    with pytest.raises(ValueError, match=r"dino\.head_n_prototypes=32.*has 64 prototypes"):
        distill_model(teacher_run, "dino.head_n_prototypes=32")
    with pytest.raises(ValueError, match="teacher_checkpoint is not set"):
        distill_model("")
    lone = tmp_path / "teacher_checkpoint.pth"
    shutil.copy(teacher_run / "eval" / "training_1" / "teacher_checkpoint.pth", lone)
    with pytest.raises(FileNotFoundError, match="distillation.teacher_config"):
        distill_model(lone)
    _, model = distill_model(lone, f"distillation.teacher_config={teacher_run / 'config.yaml'}")
    ckpt = load_full_tensors(find_latest_checkpoint(teacher_run / "checkpoints"), "model.teacher.")
    for key, value in model.frozen_teacher.state_dict().items():
        assert torch.equal(value, ckpt[key]), key


@pytest.mark.parametrize("name", ["vits14", "vitb14", "vitl14"])
def test_shipped_distillation_configs(name):
    arch = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large"}[name]
    cfg = load_config(f"distill/{name}")
    assert load_config(f"distill/{name}.yaml") == cfg
    teacher = load_config("vitg14")
    assert cfg.distillation.enabled and OmegaConf.is_missing(cfg.distillation, "teacher_checkpoint")
    with pytest.raises(ValueError, match="teacher_checkpoint is not set"):  # required on the command line
        DistillMetaArch(cfg)
    assert (cfg.student.arch, cfg.student.patch_size, cfg.student.num_register_tokens) == (arch, 14, 0)
    assert cfg.student.drop_path_rate == 0 and cfg.ibot.mask_sample_probability == 0
    for section in ("dino", "ibot"):  # the student's heads predict the ViT-g teacher's prototypes
        assert cfg[section].head_n_prototypes == teacher[section].head_n_prototypes == 131072
    assert cfg.crops.global_crops_size % 14 == 0 and cfg.crops.local_crops_size % 14 == 0
    assert (cfg.optim.epochs * cfg.train.OFFICIAL_EPOCH_LENGTH, cfg.optim.warmup_epochs * 1250) == (625_000, 100_000)
    assert cfg.optim.base_lr * (2048 / 1024) ** 0.5 == pytest.approx(1e-3, rel=1e-3)  # 1e-3 at a batch of 2048


def test_laptop_distillation_config_matches_the_quickstart_teacher():
    cfg, teacher = load_config("distill/quickstart"), load_config("quickstart")
    assert cfg.distillation.enabled and OmegaConf.is_missing(cfg.distillation, "teacher_checkpoint")
    assert cfg.student.patch_size == teacher.student.patch_size
    assert cfg.student.embed_dim < teacher.student.embed_dim and cfg.student.drop_path_rate == 0
    for section in ("dino", "ibot"):
        assert cfg[section].head_n_prototypes == teacher[section].head_n_prototypes
    assert cfg.crops == teacher.crops and cfg.evaluation.knn == teacher.evaluation.knn


def test_teacher_with_a_shared_head_gives_the_patch_targets_with_its_dino_head(tmp_path):
    """A teacher pretrained with ibot.separate_head=false (as configs/train/vitl16_short.yaml) has one
    head: its DINO head scored the patch tokens for its own iBOT loss and does so for distillation.
    Its ibot.head_* settings were unused: the iBOT prototypes are its DINO head's."""
    teacher = tmp_path / "shared_head_teacher"
    main(["--output-dir", str(teacher), *PRETRAIN, "ibot.separate_head=false", "ibot.head_n_prototypes=32"])
    assert not [k for k in read_tensor_metadata(find_latest_checkpoint(teacher / "checkpoints")) if "ibot_head" in k]
    _, model = distill_model(teacher)  # the student's iBOT head predicts the teacher's K = 64 DINO prototypes
    assert "ibot_head" not in model.frozen_teacher and "ibot_head" in model.student
    model.train()
    batch = fixed_batch()
    expected = expected_first_losses(model, batch, teacher_patch_head="dino_head")
    losses = model(batch, teacher_temp=TEMP)
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name
    with pytest.raises(ValueError, match=r"ibot\.head_n_prototypes=32 .* its dino_head, which has 64 prototypes"):
        distill_model(teacher, "ibot.head_n_prototypes=32")


def test_no_local_crops(teacher_run, tmp_path):
    """crops.local_crops_number=0: the collate's empty local-crop tensor is not fed to the student; the
    DINO loss has the 2 global-crop terms only."""
    _, model = distill_model(teacher_run, "crops.local_crops_number=0")
    model.train()
    batch = {**fixed_batch(), "collated_local_crops": torch.empty(0)}  # what the collate gives without local crops
    expected = expected_first_losses(model, batch, n_local=0)
    losses = model(batch, teacher_temp=TEMP)
    assert "dino_local_crops_loss" not in losses
    for name, value in expected.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name
    summary = main(["--output-dir", str(tmp_path), *distill_opts(teacher_run, "crops.local_crops_number=0",
                                                                  "train.stop_at_iteration=1")])  # fmt: skip
    assert summary["iteration"] == 1


def test_errors_name_where_the_teacher_architecture_came_from(teacher_run, tmp_path):
    """A teacher config that does not describe the checkpoint: the errors name the config they were
    built from, so that the user can tell a wrong distillation.teacher_config from a wrong student."""
    wrong = OmegaConf.load(teacher_run / "config.yaml")
    wrong.student.depth = 3  # the checkpoint has 2 blocks
    wrong_config = tmp_path / "wrong_teacher.yaml"
    OmegaConf.save(wrong, wrong_config)
    with pytest.raises(
        RuntimeError, match=rf"as distillation\.teacher_config={wrong_config} describes it(.|\n)*blocks\.2"
    ):
        distill_model(teacher_run, f"distillation.teacher_config={wrong_config}")
    wrong.student.depth, wrong.dino.head_n_prototypes = 2, 128
    OmegaConf.save(wrong, wrong_config)
    with pytest.raises(ValueError, match=rf"has 128 prototypes \(per distillation\.teacher_config={wrong_config}\)"):
        distill_model(teacher_run, f"distillation.teacher_config={wrong_config}")
    with pytest.raises(ValueError, match=rf"has 64 prototypes \(per {teacher_run / 'config.yaml'}\)"):
        distill_model(teacher_run, "dino.head_n_prototypes=32")


def test_teacher_from_a_whole_meta_architecture_state_dict(teacher_run, tmp_path):
    """A file holding the whole model of a training run ({"model": {student.*, teacher.*, ...}}, as a
    torch.save of a meta-architecture's state dict): its teacher.* tensors are the frozen teacher."""
    whole = load_full_tensors(find_latest_checkpoint(teacher_run / "checkpoints"), "model.")
    assert any(k.startswith("student.") for k in whole) and any(k.startswith("teacher.dino_head.") for k in whole)
    file = tmp_path / "model_final.pth"
    torch.save({"model": whole, "iteration": 1}, file)
    _, model = distill_model(file, f"distillation.teacher_config={teacher_run / 'config.yaml'}")
    for key, value in model.frozen_teacher.state_dict().items():
        assert torch.equal(value, whole[f"teacher.{key}"]), key  # the teacher's, not the student's
    assert not torch.equal(whole["teacher.dino_head.mlp.0.weight"], whole["student.dino_head.mlp.0.weight"])


def test_a_distilled_student_continues_at_a_larger_size_from_its_weights(teacher_run, tmp_path):
    """The released ViT-S/B/L have 518 px grids (docs/recipes.md): a distillation run started with
    train.init_from from another distillation run's weights at a larger crop size takes its student
    and spare EMA, position embeddings resampled (2 x 2 -> 3 x 3 patches); the frozen teacher is
    the teacher's."""
    _, first = distill_model(teacher_run)
    with torch.no_grad():
        for p in [*first.student.parameters(), *first.teacher.parameters()]:
            p.copy_(torch.randn_like(p))  # student and EMA differ, and differ from any fresh init
    saved = {k: v for k, v in first.state_dict().items() if not k.startswith("frozen_teacher.")}
    torch.save({"model": saved}, tmp_path / "distilled.pth")
    cfg, model = distill_model(
        teacher_run, "crops.global_crops_size=42", f"train.init_from={tmp_path / 'distilled.pth'}"
    )
    load_init_source(model, resolve_init_source(cfg, tmp_path / "new" / "checkpoints", resume=True))
    for branch in ("student", "teacher"):
        state = getattr(model, branch).state_dict()
        assert state["backbone.pos_embed"].shape[1] == 1 + 3 * 3, branch
        for key, value in state.items():
            if key != "backbone.pos_embed":
                assert torch.equal(value, saved[f"{branch}.{key}"]), (branch, key)
    teacher = load_full_tensors(find_latest_checkpoint(teacher_run / "checkpoints"), "model.teacher.")
    for key, value in model.frozen_teacher.state_dict().items():
        assert torch.equal(value, teacher[key]), key


def test_the_teachers_run_config_is_found_from_relative_paths_inside_the_run(tmp_path, monkeypatch):
    """A step directory named from inside OUT/checkpoints, an export from inside OUT/eval: the run
    (and with it the teacher's config.yaml) is still found (layouts only, no training)."""
    from dinov2.train.distill_teacher import resolve_teacher_source

    run = tmp_path / "teacher_run"
    step = run / "checkpoints" / "step_0000002"
    step.mkdir(parents=True)
    (step / ".metadata").touch()
    (step / "trainer_state.pth").touch()
    (run / "eval" / "training_2").mkdir(parents=True)
    (run / "eval" / "training_2" / "teacher_checkpoint.pth").touch()
    (run / "config.yaml").write_text("student: {arch: vit_small}\n")
    monkeypatch.chdir(run / "checkpoints")
    assert resolve_teacher_source("step_0000002").run_dir == run
    monkeypatch.chdir(run / "eval")
    assert resolve_teacher_source("training_2/teacher_checkpoint.pth").run_dir == run
    monkeypatch.chdir(tmp_path)
    assert resolve_teacher_source("teacher_run").run_dir == run
    (run / "config.yaml").unlink()  # no config: no run to take the architecture from
    assert resolve_teacher_source("teacher_run").run_dir is None
