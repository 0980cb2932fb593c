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
               "ibot.separate_head": True},
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
