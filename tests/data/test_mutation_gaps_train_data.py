"""The training data stream's settings: behaviour a mutation audit found untested (the iBOT masks
follow ``train.seed``, ``train.gpu_augmentation: false`` keeps the CPU path, and a negative seed is
refused by name)."""

from __future__ import annotations

import pytest
import torch
from test_masking_collate import _samples

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.gpu_augmentation import MultiCropParams
from dinov2.train import data as train_data
from dinov2.utils.config import default_config_with


def _cfg(**train):
    return default_config_with(
        {
            "train": {"dataset_path": "Synthetic:split=TRAIN:num_images=8:image_size=32", "device": "cpu",
                      "num_workers": 0, "batch_size_per_gpu": 4, **train},
            "crops": {"global_crops_size": 32, "local_crops_size": 16, "local_crops_number": 2},
            "student": {"patch_size": 8},
            "ibot": {"mask_sample_probability": 1.0},  # every global crop masked: the masks show the seed
        }
    )  # fmt: skip


def test_the_ibot_masks_follow_train_seed():
    samples = [(crops, target, 0, 40 + k) for k, (crops, target) in enumerate(_samples(batch_size=4))]
    masks = {seed: train_data.build_collate(_cfg(seed=seed))(samples)["collated_masks"] for seed in (0, 1)}
    again = train_data.build_collate(_cfg(seed=0))(samples)["collated_masks"]
    assert torch.equal(masks[0], again)  # the same seed and batch position: the same masks
    assert not torch.equal(masks[0], masks[1])  # another seed: other masks


@pytest.mark.parametrize("setting, transform", [(False, DataAugmentationDINO), (True, MultiCropParams)])
def test_gpu_augmentation_false_keeps_the_cpu_augmentation(setting, transform):
    cfg = _cfg(gpu_augmentation=setting)
    assert train_data.gpu_augmentation_enabled(cfg) is setting
    assert isinstance(train_data.build_train_dataset(cfg).transform, transform)


def test_a_negative_seed_is_refused_by_name():
    cfg = _cfg(seed=-1)
    with pytest.raises(ValueError, match=r"train.seed must be a non-negative integer, got -1"):
        train_data.build_train_loader(cfg, train_data.build_train_dataset(_cfg()))
