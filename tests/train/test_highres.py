"""The high-resolution phase: ``train.init_from`` starts a new run from a pretraining checkpoint at a
larger image size (position embeddings resampled), with fresh optimizer, schedules and data stream."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from dinov2.checkpoint import CheckpointLoadError, find_latest_checkpoint, load_backbone_state_dict
from dinov2.checkpoint.sharded import load_full_tensors, load_trainer_state
from dinov2.models import DinoVisionTransformer
from dinov2.train.data import build_collate
from dinov2.train.init_from import load_init_source, resolve_init_source
from dinov2.train.schedules import build_schedulers
from dinov2.train.train import build_model, get_args_parser, main, setup_config
from dinov2.utils.config import ConfigError, is_required_unset, load_config

PATCH = 8
SMALL, LARGE = 32, 48  # 4 x 4 -> 6 x 6 patch grid
TINY = [
    "train.device=cpu",
    "train.dataset_path=Synthetic:split=TRAIN:num_images=64:image_size=48",
    "train.batch_size_per_gpu=4",
    "train.num_workers=0",
    "train.log_period=1",
    "student.arch=vit_tiny",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    f"student.patch_size={PATCH}",
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "optim.freeze_last_layer_epochs=0.5",
    "teacher.warmup_teacher_temp_epochs=1",
    "crops.local_crops_size=16",
    "crops.local_crops_number=2",
    "evaluation.eval_period_iterations=1000",
]
# Pretraining: 2 epochs of 3 iterations at 32 px. High-res: the same 2 epochs compressed to 2
# iterations each (4 in all) at 48 px, from the pretraining checkpoint.
PRETRAIN = [*TINY, "train.OFFICIAL_EPOCH_LENGTH=3", f"crops.global_crops_size={SMALL}"]
HIGHRES = [*TINY, "train.OFFICIAL_EPOCH_LENGTH=2", f"crops.global_crops_size={LARGE}", "optim.base_lr=0.001"]


def independent_resample(pos_embed: torch.Tensor, new: int, offset: float = 0.1) -> torch.Tensor:
    """Bicubic resampling of the patch grid written out here, with the released models' convention:
    the target is given as the scale factor (new + offset) / old (offset 0: as the size)."""
    old = math.isqrt(pos_embed.shape[1] - 1)
    grid = pos_embed[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).double()
    if offset:
        grid = F.interpolate(grid, scale_factor=((new + offset) / old,) * 2, mode="bicubic", align_corners=False)
    else:
        grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    assert grid.shape[-2:] == (new, new)
    return torch.cat((pos_embed[:, :1].double(), grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)), 1).float()


def highres_cfg(init_from: Path | str, *extra: str):
    args = get_args_parser().parse_args(["--output-dir", "unused", *HIGHRES, f"train.init_from={init_from}", *extra])
    return setup_config(args)


@contextmanager
def dinov2_log():
    """The messages of the ``dinov2`` logger (which does not propagate once a run set it up)."""
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("dinov2")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "training_metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line and "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("highres") / "pretrain"
    main(["--output-dir", str(out), *PRETRAIN])
    return out


# ------------------------------------------------------------------------------ adapter layer
@pytest.mark.parametrize("offset", [0.1, 0.0])
def test_backbone_of_another_grid_is_resampled_like_the_forward(offset):
    kwargs = dict(patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, init_values=1.0, interpolate_offset=offset)
    source, target = DinoVisionTransformer(img_size=SMALL, **kwargs), DinoVisionTransformer(img_size=LARGE, **kwargs)
    with torch.no_grad():
        source.pos_embed.normal_()
    with dinov2_log() as log:
        report = load_backbone_state_dict(target, source.state_dict())
    assert report.pos_embed_grid == (4, 6)
    assert any("pos_embed resampled from a 4x4 to a 6x6 patch grid" in m for m in log)
    assert target.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(target.pos_embed.data, independent_resample(source.pos_embed.data, 6, offset))
    # the resampled model at 48 px computes what the source model computes at 48 px
    source.eval()
    target.eval()
    x = torch.randn(2, 3, LARGE, LARGE)
    torch.testing.assert_close(target(x), source(x), rtol=1e-5, atol=1e-5)


def test_grid_change_keeps_strict_checking():
    source = DinoVisionTransformer(img_size=SMALL, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2)
    target = DinoVisionTransformer(img_size=LARGE, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2)
    state = source.state_dict()
    del state["norm.bias"]
    with pytest.raises(RuntimeError, match="missing keys: norm.bias"):
        load_backbone_state_dict(target, state)


# ------------------------------------------------------------------------------ the new run
def test_init_from_checkpoint_loads_everything_and_starts_fresh(pretrained, tmp_path):
    checkpoint = find_latest_checkpoint(pretrained / "checkpoints")
    assert checkpoint.name == "step_0000006"
    cfg = highres_cfg(pretrained)
    source = resolve_init_source(cfg, tmp_path / "checkpoints", resume=True)
    assert (source.kind, Path(source.location)) == ("checkpoint", checkpoint)

    model = build_model(cfg, torch.device("cpu"))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_init_source(model, source)
    saved, state = load_full_tensors(checkpoint, "model."), model.state_dict()
    assert state.keys() == saved.keys()  # student, teacher, both heads and both loss centres
    for key, value in state.items():
        if key.endswith("backbone.pos_embed"):
            assert saved[key].shape == (1, 17, 32) and value.shape == (1, 37, 32)
            torch.testing.assert_close(value, independent_resample(saved[key], 6))
        else:
            assert torch.equal(value, saved[key]), key
    changed = {k for k in state if k.endswith("pos_embed") or not torch.equal(state[k], fresh[k])}
    for part in ("student.backbone.", "teacher.backbone.", "student.dino_head.", "teacher.dino_head.",
                 "student.ibot_head.", "teacher.ibot_head.", "dino_loss.", "ibot_patch_loss."):  # fmt: skip
        assert any(k.startswith(part) for k in changed), part  # not equal to the checkpoint by chance

    from dinov2.train.loop import Trainer

    trainer = Trainer(cfg, model, torch.device("cpu"), tmp_path)
    assert trainer.iteration == 0 and trainer.samples_consumed == 0 and not trainer.optimizer.state
    lr = trainer.schedules.lr
    assert len(lr) == trainer.max_iter == 4  # the new run's length, not the pretraining's 6
    np.testing.assert_allclose([lr[0], lr[1]], [0.0, cfg.optim.lr])  # warm-up: 1 epoch = 2 iterations
    assert lr[3] < lr[2] == lr[1] and trainer.schedules.teacher_temp[1] == cfg.teacher.teacher_temp


def test_highres_run_trains_from_the_checkpoint_and_resumes_without_it(pretrained, tmp_path):
    out = tmp_path / "highres"
    main(["--output-dir", str(out), *HIGHRES, f"train.init_from={pretrained}", "train.stop_at_iteration=2"])
    log = (out / "log.txt").read_text()
    assert log.count("pos_embed resampled from a 4x4 to a 6x6 patch grid") == 2  # student and teacher
    assert "loss centres loaded; optimizer, schedules, iteration counter and data stream start fresh" in log
    first = records(out)
    assert [r["iteration"] for r in first] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in first) and first[0]["lr"] == 0.0
    own = find_latest_checkpoint(out / "checkpoints")
    assert own.name == "step_0000002"
    trainer_state = load_trainer_state(own)
    assert (trainer_state["iteration"], trainer_state["samples_consumed"]) == (2, 8)  # fresh stream: 2 x 4
    steps = load_full_tensors(own, "optimizer.state.student.backbone.cls_token.step")
    assert float(next(iter(steps.values()))) == 2.0  # AdamW started at 0, not at pretraining's 6

    # resumed: its own checkpoint, init_from ignored (this path does not even exist)
    main(["--output-dir", str(out), *HIGHRES, f"train.init_from={tmp_path / 'gone'}"])
    resumed_log = (out / "log.txt").read_text()[len(log) :]
    assert "ignored: resuming from this run's own checkpoints" in resumed_log
    assert "resumed from" in resumed_log and "pos_embed resampled" not in resumed_log
    assert [r["iteration"] for r in records(out)] == [1, 2, 3, 4]
    # starting the phase in the pretraining run's own directory would resume pretraining: refused
    with pytest.raises(ValueError, match="needs a new --output-dir"):
        main(["--output-dir", str(pretrained), *HIGHRES, f"train.init_from={pretrained}"])
    # and with --no-resume as well, before the run's checkpoints would be set aside
    before = sorted(p.name for p in pretrained.iterdir())
    with pytest.raises(ValueError, match="needs a new --output-dir"):
        main(["--output-dir", str(pretrained), "--no-resume", *HIGHRES, f"train.init_from={pretrained}"])
    assert sorted(p.name for p in pretrained.iterdir()) == before


def test_resuming_at_another_image_size_names_the_tensor_and_the_way_out(pretrained, tmp_path):
    """Rerunning a 32 px run's own directory at 48 px: the error names the tensor whose shape the
    new config changes and points at a new --output-dir with train.init_from."""
    run = tmp_path / "run"
    shutil.copytree(pretrained, run)
    config = (run / "config.yaml").read_bytes()
    with pytest.raises(CheckpointLoadError) as caught:
        main(["--output-dir", str(run), *HIGHRES])
    # the run's config.yaml still describes its checkpoints (the evaluations and distillation read it)
    assert (run / "config.yaml").read_bytes() == config
    message = str(caught.value)
    old, new = (SMALL // PATCH) ** 2 + 1, (LARGE // PATCH) ** 2 + 1  # tokens: the patch grid plus CLS
    assert re.search(rf"backbone\.pos_embed \(1, {old}, 32\) in the checkpoint vs \(1, {new}, 32\)", message)
    assert "new --output-dir with train.init_from=" in message


def test_init_from_an_exported_teacher_file(pretrained):
    """An export holds the teacher's backbone and heads: both branches start from them; the loss
    centres (not in the file) stay fresh."""
    exported = pretrained / "eval" / "training_6" / "teacher_checkpoint.pth"
    cfg = highres_cfg(exported)
    source = resolve_init_source(cfg, pretrained / "none", resume=True)
    assert source.kind == "backbone"
    model = build_model(cfg, torch.device("cpu"))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with dinov2_log() as log:
        load_init_source(model, source)
    assert any("backbones and dino_head and ibot_head loaded" in m and "the loss centres keep" in m for m in log)
    teacher = load_full_tensors(find_latest_checkpoint(pretrained / "checkpoints"), "model.teacher.")
    for branch in ("student", "teacher"):
        for name, module in getattr(model, branch).items():
            for key, value in module.state_dict().items():
                stored = teacher[f"{name}.{key}"]
                expected = independent_resample(stored, 6) if key == "pos_embed" else stored
                torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=f"{branch} {name} {key}")
    centres = [k for k in model.state_dict() if k.endswith("center")]
    assert centres
    for key in centres:
        assert torch.equal(model.state_dict()[key], fresh[key]), key


def test_init_from_a_backbone_only_file_keeps_fresh_heads(pretrained, tmp_path):
    exported = torch.load(pretrained / "eval" / "training_6" / "teacher_checkpoint.pth", weights_only=True)
    backbone_only = tmp_path / "backbone.pth"
    torch.save({k.removeprefix("backbone."): v for k, v in exported["teacher"].items() if k.startswith("backbone.")},
               backbone_only)  # fmt: skip
    cfg = highres_cfg(backbone_only)
    model = build_model(cfg, torch.device("cpu"))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with dinov2_log() as log:
        load_init_source(model, resolve_init_source(cfg, pretrained / "none", resume=True))
    assert any("dino_head and ibot_head and the loss centres keep" in m for m in log)
    for key, value in model.state_dict().items():
        if "_head." in key or key.endswith("center"):
            assert torch.equal(value, fresh[key]), key
        elif key.startswith("student.backbone.blocks"):
            assert not torch.equal(value, fresh[key]), key  # loaded from the file


def original_training_file(checkpoint: Path, path: Path, centres: bool = True) -> dict[str, torch.Tensor]:
    """A training checkpoint in the original code's layout: ``{"model": SSLMetaArch state dict, "optimizer":
    ..., "iteration": N}``, its heads with the old weight-norm names; returns the tensors written."""
    saved = load_full_tensors(checkpoint, "model.")
    old_names = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    model = {}
    for key, value in saved.items():
        if key.endswith("center") and not centres:
            continue
        for new, old in old_names.items():
            key = key.replace(new, old)
        model[key] = value
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "iteration": 6}, path)
    return saved


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
def test_init_from_the_originals_training_file_keeps_both_branches_and_centres(pretrained, tmp_path, centering):
    """The original's whole-model checkpoint (student.*, teacher.*, dino_loss.center, ibot_patch_loss.center):
    before, its teacher went into both branches and its centres were dropped."""
    file = tmp_path / "model_0000005.rank_0.pth"
    saved = original_training_file(find_latest_checkpoint(pretrained / "checkpoints"), file)
    fc1 = "backbone.blocks.0.mlp.fc1.weight"
    assert not torch.equal(saved[f"student.{fc1}"], saved[f"teacher.{fc1}"])  # the test tells the branches apart
    assert saved["dino_loss.center"].abs().sum() > 0 and saved["ibot_patch_loss.center"].abs().sum() > 0
    cfg = highres_cfg(file, f"train.centering={centering}")
    model = build_model(cfg, torch.device("cpu"))
    with dinov2_log() as log:
        load_init_source(model, resolve_init_source(cfg, tmp_path / "checkpoints", resume=True))
    state = model.state_dict()
    assert state.keys() == saved.keys()
    for key, value in state.items():
        expected = independent_resample(saved[key], 6) if key.endswith("pos_embed") else saved[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=key)
    assert any("and loss centres loaded" in m for m in log)
    assert any("centres are loaded but unused" in m for m in log) == (centering == "sinkhorn_knopp")


def test_init_from_an_original_training_checkpoint_without_centres_keeps_them_fresh(pretrained, tmp_path):
    file = tmp_path / "no_centres.pth"
    saved = original_training_file(find_latest_checkpoint(pretrained / "checkpoints"), file, centres=False)
    cfg = highres_cfg(file)
    model = build_model(cfg, torch.device("cpu"))
    with dinov2_log() as log:
        load_init_source(model, resolve_init_source(cfg, tmp_path / "checkpoints", resume=True))
    assert any("fresh: dino_loss.center, ibot_patch_loss.center" in m for m in log)
    for key, value in model.state_dict().items():
        if key.endswith("center"):
            assert not value.any(), key  # a fresh run's zeros
        elif key.startswith("student.dino_head"):
            torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


class _PickledAsShardedTensor:
    """Pickles as the original's multi-GPU training files hold each FSDP flat parameter (LOCAL_STATE_DICT):
    a ShardedTensor (a real one takes a process group of several ranks to make)."""

    def __reduce__(self):
        from torch.distributed._shard.sharded_tensor import ShardedTensor

        return (ShardedTensor, ())


def test_init_from_the_originals_multi_gpu_training_file_names_what_to_use_instead(tmp_path):
    # model_N.rank_R.pth of a run on several GPUs: per-rank flat shards, never whole tensors. Before, the
    # refusal was torch's weights_only message, which suggests weights_only=False (and it would still not load).
    file = tmp_path / "model_0012499.rank_0.pth"
    model = {"student.backbone._flat_param": _PickledAsShardedTensor(), "dino_loss.center": torch.zeros(1, 64)}
    torch.save({"model": model, "iteration": 12499}, file)
    cfg = highres_cfg(file)
    source = resolve_init_source(cfg, tmp_path / "checkpoints", resume=True)
    with pytest.raises(ValueError, match=r"ShardedTensors.*flattened shards.*eval/training_N/teacher_checkpoint\.pth"):
        load_init_source(build_model(cfg, torch.device("cpu")), source)


# ------------------------------------------------------------------------------ errors and configs
def test_missing_or_wrong_init_from_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="train.init_from is required"):
        main(["--config", "vitl14_highres518", "--output-dir", str(tmp_path / "a")])
    with pytest.raises(FileNotFoundError, match=r"train.init_from='.*nowhere': no such file"):
        resolve_init_source(highres_cfg(tmp_path / "nowhere"), tmp_path / "checkpoints", resume=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train.init_from='.*empty': no training checkpoint"):
        resolve_init_source(highres_cfg(tmp_path / "empty"), tmp_path / "checkpoints", resume=True)
    assert resolve_init_source(highres_cfg("null"), tmp_path / "checkpoints", resume=True) is None


def test_no_resume_refuses_a_weights_file_it_would_move_aside(tmp_path):
    """--no-resume moves OUT/eval/ into OUT/replaced_*/ before loading: before, the run set the earlier
    run aside and then stopped on a missing weights file."""
    export = tmp_path / "out" / "eval" / "training_6" / "teacher_checkpoint.pth"
    export.parent.mkdir(parents=True)
    torch.save({"teacher": {}}, export)
    cfg = highres_cfg(export)
    with pytest.raises(ValueError, match=r"inside this run's eval/, which --no-resume moves aside"):
        resolve_init_source(cfg, tmp_path / "out" / "checkpoints", resume=False)
    assert resolve_init_source(cfg, tmp_path / "out" / "checkpoints", resume=True).kind == "backbone"
    assert resolve_init_source(cfg, tmp_path / "other" / "checkpoints", resume=False).kind == "backbone"


def test_no_resume_refuses_a_symlink_among_the_outputs_it_would_move_aside(tmp_path):
    """A link OUT/eval/best.pth -> a file elsewhere: the link moves into OUT/replaced_*/ with eval/, so the
    path given is gone by the time the weights load, wherever it pointed (before, only the target was checked)."""
    real = tmp_path / "weights" / "teacher_checkpoint.pth"
    real.parent.mkdir()
    torch.save({"teacher": {}}, real)
    link = tmp_path / "out" / "eval" / "best.pth"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    with pytest.raises(ValueError, match=r"inside this run's eval/"):
        resolve_init_source(highres_cfg(link), tmp_path / "out" / "checkpoints", resume=False)


def test_a_config_can_require_a_key():
    cfg = load_config("vitg14_highres518")  # train.init_from: ??? over the default's null
    assert OmegaConf.is_missing(cfg.train, "init_from")
    with pytest.raises(MissingMandatoryValue, match="train.init_from"):
        _ = cfg.train.init_from
    assert load_config("vitg14_highres518", ["train.init_from=/ckpt"]).train.init_from == "/ckpt"
    assert is_required_unset(cfg, "train.init_from") and not is_required_unset(cfg, "train.seed")
    assert not is_required_unset(load_config("vitg14_highres518", ["train.init_from=/ckpt"]), "train.init_from")
    with pytest.raises(ConfigError, match="did you mean 'train.init_from'"):
        load_config("vitg14_highres518", ["train.init_frm=/ckpt"])


def normalised(schedule, it: int, warmup: float) -> float:
    """The lr schedule without its scale: 0 -> 1 over the warm-up, then 1 at the peak -> 0 at min_lr."""
    if it < warmup:
        return schedule[it] / schedule.base_value
    return (schedule[it] - schedule.final_value) / (schedule.base_value - schedule.final_value)


@pytest.mark.parametrize("arch", ["vitg14", "vitl14"])
def test_shipped_highres_configs_compress_the_pretraining_schedules(arch):
    def schedules(name: str):
        args = get_args_parser().parse_args(["--config", name, "train.init_from=/somewhere"])
        cfg = setup_config(args)
        return cfg, build_schedulers(cfg)

    pre_cfg, pre = schedules(arch)
    cfg, high = schedules(f"{arch}_highres518")
    assert cfg.crops.global_crops_size == 518 and cfg.crops.local_crops_size == 98
    assert cfg.crops.global_crops_size // cfg.student.patch_size == 37
    collate = build_collate(cfg)  # the iBOT masks follow the crop size: 37 x 37 patches
    assert collate.keywords["n_tokens"] == 37 * 37
    generator = collate.keywords["mask_generator"]
    assert (generator.height, generator.width) == (37, 37)
    assert len(high.lr) == 10_000 and cfg.optim.base_lr < pre_cfg.optim.base_lr
    assert cfg.train.batch_size_per_gpu == pre_cfg.train.batch_size_per_gpu
    ratio = len(pre.lr) / len(high.lr)  # 62.5: every 250th iteration maps onto a whole one
    warmup = cfg.optim.warmup_epochs * cfg.train.OFFICIAL_EPOCH_LENGTH
    assert ratio == 62.5 and warmup == 1600
    for it in range(0, 10_000, 250):
        old = int(it * ratio)
        assert old == it * ratio
        for name in ("momentum", "wd"):  # cosines: the same phase at the same fraction of the run
            assert getattr(high, name)[it] == pytest.approx(getattr(pre, name)[old], abs=1e-12), (name, it)
        # linear warm-ups include both ends (k / (n - 1) of the way after k of n points): the compressed
        # one is ahead by less than 1 / n of its range (teacher temperature: n = 600, lr: n = 1600)
        assert high.teacher_temp[it] == pytest.approx(pre.teacher_temp[old], abs=0.03 / 600), it
        assert normalised(high.lr, it, warmup) == pytest.approx(normalised(pre.lr, old, 62.5 * warmup), abs=1 / 1600)
    assert high.lr[1599] == pytest.approx(cfg.optim.lr) and high.lr[1598] < cfg.optim.lr  # 80 epochs -> 1600 its
    assert high.teacher_temp[599] == pytest.approx(cfg.teacher.teacher_temp)  # 30 epochs -> 600 its
    assert high.teacher_temp[598] < cfg.teacher.teacher_temp
    assert high.last_layer_lr[19] == 0 and high.last_layer_lr[20] > 0
