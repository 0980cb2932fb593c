"""The training data stream: dataset -> multi-crop augmentation -> positioned, seeded sampling ->
collation with iBOT masks. Resuming at iteration ``i`` restarts the stream where it stopped."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.loaders import make_data_loader, make_dataset, sampler_for
from dinov2.data.masking import MaskingGenerator
from dinov2.data.seeding import PositionedSampler, SeededSamples


def build_augmentation(crops: Any) -> DataAugmentationDINO:
    """Multi-crop augmentation from the config's ``crops`` section."""
    return DataAugmentationDINO(
        crops.global_crops_scale,
        crops.local_crops_scale,
        crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        global_crops_1_blur_prob=crops.global_crops_1_blur_prob,
        global_crops_2_blur_prob=crops.global_crops_2_blur_prob,
        local_crops_blur_prob=crops.local_crops_blur_prob,
    )


def collate_training_batch(samples: list[tuple], **collate_kwargs) -> dict[str, Any]:
    """:func:`collate_data_and_cast` over ``(crops, target, skipped)`` samples, plus
    ``skipped_images``: how many unreadable images were skipped to produce this batch."""
    batch = collate_data_and_cast([sample[:2] for sample in samples], **collate_kwargs)
    batch["skipped_images"] = sum(int(sample[2]) for sample in samples)
    return batch


def build_collate(cfg: Any, dtype: torch.dtype = torch.float32) -> partial:
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    n_tokens = grid * grid
    return partial(
        collate_training_batch,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=dtype,
        n_tokens=n_tokens,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * n_tokens),
    )


def build_train_dataset(cfg: Any):
    """The dataset named by ``train.dataset_path``, with the multi-crop augmentation as its transform."""
    return make_dataset(str(cfg.train.dataset_path), transform=build_augmentation(cfg.crops), target_transform=None)


def build_train_loader(cfg: Any, dataset, samples_consumed: int = 0) -> DataLoader:
    """Batches of ``train.batch_size_per_gpu`` from an infinite, sharded stream that starts after
    ``samples_consumed`` samples of this rank (``iteration * batch_size_per_gpu * grad_accum_steps``)."""
    sampler = sampler_for(cfg.train.sampler_type, len(dataset), seed=cfg.train.seed, advance=samples_consumed)
    if not hasattr(sampler, "advance"):
        raise ValueError(f"train.sampler_type={cfg.train.sampler_type!r}: training needs an infinite sampler")
    return make_data_loader(
        SeededSamples(dataset, seed=cfg.train.seed),
        batch_size=cfg.train.batch_size_per_gpu,
        num_workers=cfg.train.num_workers,
        sampler=PositionedSampler(sampler),
        seed=cfg.train.seed,
        drop_last=True,
        collate_fn=build_collate(cfg),
    )
