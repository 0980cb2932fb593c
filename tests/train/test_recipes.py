"""Shipped training configs: every one loads against the schema and builds a valid model config."""

from __future__ import annotations

import pytest
import yaml

from dinov2.train.train import get_args_parser, setup_config
from dinov2.utils.config import CONFIGS_DIR, available_configs, load_config

# Published DINOv2 recipe values, written out independently of our files.
PUBLISHED = {
    "vitl16_short": {"train.dataset_path": "ImageNet:split=TRAIN", "train.batch_size_per_gpu": 64,
                     "student.arch": "vit_large", "student.patch_size": 16, "optim.epochs": 100,
                     "optim.base_lr": 0.004, "train.centering": "centering",
                     "ibot.separate_head": False},  # not set there; the original's default is the shared head
    "vitl14": {"student.arch": "vit_large", "student.patch_size": 14, "train.batch_size_per_gpu": 32,
               "train.centering": "sinkhorn_knopp", "dino.head_n_prototypes": 131072, "optim.epochs": 500,
               "optim.base_lr": 2.0e-4, "optim.warmup_epochs": 80, "teacher.momentum_teacher": 0.994,
               "crops.local_crops_size": 98, "optim.layerwise_decay": 1.0, "optim.weight_decay_end": 0.2},
    "vitg14": {"student.arch": "vit_giant2", "student.ffn_layer": "swiglufused", "train.batch_size_per_gpu": 12,
               "ibot.head_n_prototypes": 131072, "dino.head_bottleneck_dim": 384, "student.drop_path_rate": 0.4,
               "ibot.separate_head": True, "train.centering": "sinkhorn_knopp", "student.block_chunks": 4,
               "student.patch_size": 14, "teacher.momentum_teacher": 0.994, "optim.epochs": 500,
               "optim.base_lr": 2.0e-4, "optim.warmup_epochs": 80, "optim.layerwise_decay": 1.0,
               "optim.weight_decay_end": 0.2, "crops.local_crops_size": 98, "train.dataset_path": "ImageNet22k"},
}  # fmt: skip

# The published default config (facebookresearch/dinov2, dinov2/configs/ssl_default_config.yaml): what every recipe starts from.
PUBLISHED_DEFAULTS = {
    "dino.head_n_prototypes": 65536, "dino.head_bottleneck_dim": 256, "dino.head_hidden_dim": 2048,
    "dino.head_nlayers": 3, "dino.koleo_loss_weight": 0.1, "ibot.mask_sample_probability": 0.5,
    "ibot.mask_ratio_min_max": [0.1, 0.5], "train.OFFICIAL_EPOCH_LENGTH": 1250, "student.drop_path_rate": 0.3,
    "student.layerscale": 1.0e-05, "teacher.momentum_teacher": 0.992, "teacher.final_momentum_teacher": 1,
    "teacher.warmup_teacher_temp": 0.04, "teacher.teacher_temp": 0.07, "teacher.warmup_teacher_temp_epochs": 30,
    "optim.epochs": 100, "optim.weight_decay": 0.04, "optim.weight_decay_end": 0.4, "optim.base_lr": 0.004,
    "optim.warmup_epochs": 10, "optim.min_lr": 1.0e-06, "optim.clip_grad": 3.0, "optim.freeze_last_layer_epochs": 1,
    "optim.scaling_rule": "sqrt_wrt_1024", "optim.patch_embed_lr_mult": 0.2, "optim.layerwise_decay": 0.9,
    "optim.adamw_beta2": 0.999, "crops.global_crops_scale": [0.32, 1.0], "crops.local_crops_scale": [0.05, 0.32],
    "crops.local_crops_number": 8, "crops.global_crops_size": 224, "crops.local_crops_size": 96,
    "evaluation.eval_period_iterations": 12500,
}  # fmt: skip


def test_every_shipped_config_loads():
    names = available_configs("train")
    assert {"quickstart", "vitl16_short", "vitl14", "vitg14"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert cfg.crops.global_crops_size % cfg.student.patch_size == 0, name
        assert cfg.crops.local_crops_size % cfg.student.patch_size == 0, name


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_recipes_reproduce_the_published_values(name):
    cfg = load_config(name)
    for key, value in PUBLISHED[name].items():
        section, leaf = key.split(".")
        assert cfg[section][leaf] == value, key


@pytest.mark.parametrize("name", ["vits14_1gpu", "vitb14_1gpu"])
def test_one_gpu_presets_use_accumulation_and_a_scaled_lr(name):
    args = get_args_parser().parse_args(["--config", name])
    cfg = setup_config(args)
    effective = cfg.train.batch_size_per_gpu * cfg.train.grad_accum_steps
    assert cfg.train.grad_accum_steps > 1 and effective == 256
    assert cfg.optim.lr == pytest.approx(cfg.optim.base_lr * (effective / 1024) ** 0.5)


def test_config_by_path_and_with_suffix(tmp_path):
    raw = yaml.safe_load((CONFIGS_DIR / "train" / "vitl14.yaml").read_text())
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert load_config(str(path)) == load_config("vitl14.yaml") == load_config("vitl14")


def test_the_default_config_has_the_published_defaults():
    cfg = load_config(None)
    for key, value in PUBLISHED_DEFAULTS.items():
        section, leaf = key.split(".")
        got = cfg[section][leaf]
        assert (list(got) if isinstance(value, list) else got) == value, key
    lr = setup_config(get_args_parser().parse_args(["--config", "vitg14"]))  # one process: batch 12
    assert lr.optim.lr == pytest.approx(2.0e-4 * (12 / 1024) ** 0.5)  # the sqrt rule of the original


@pytest.mark.parametrize(
    "override", ["train.batch_size_per_gpu=0", "train.batch_size_per_gpu=2.5", "train.grad_accum_steps=-1",
                 "train.grad_accum_steps=0"],
)  # fmt: skip
def test_a_batch_or_accumulation_that_is_no_positive_integer_is_named(override):
    # Before: 0 gave lr 0 silently, 2.5 trained with batches of 2 and an lr for 2, -1 failed with "math domain error".
    key = override.split("=")[0]
    with pytest.raises(ValueError, match=rf"{key} must be a positive integer"):
        setup_config(get_args_parser().parse_args(["--config", "quickstart", override]))


def test_an_lr_given_directly_is_replaced_with_a_warning_naming_base_lr(caplog):
    # optim.lr is always computed from base_lr and the batch; a researcher setting it saw nothing happen.
    args = get_args_parser().parse_args(["--config", "quickstart", "optim.lr=0.5"])
    with caplog.at_level("WARNING", logger="dinov2"):
        cfg = setup_config(args)
    batch = cfg.train.batch_size_per_gpu * cfg.train.grad_accum_steps
    rule = {"sqrt_wrt_1024": (batch / 1024) ** 0.5, "linear_wrt_256": batch / 256}[cfg.optim.scaling_rule]
    assert cfg.optim.lr == pytest.approx(cfg.optim.base_lr * rule) != 0.5
    assert "optim.lr=0.5 is replaced" in caplog.text and "optim.base_lr" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dinov2"):  # the default (0) and the computed value: no warning
        setup_config(get_args_parser().parse_args(["--config", "quickstart"]))
        setup_config(get_args_parser().parse_args(["--config", "quickstart", f"optim.lr={cfg.optim.lr!r}"]))
    assert "optim.lr" not in caplog.text
