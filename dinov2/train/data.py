"""The training data stream: dataset -> multi-crop augmentation -> positioned, seeded sampling ->
collation with iBOT masks. Resuming at iteration ``i`` restarts the stream where it stopped."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.loaders import make_data_loader, make_dataset
from dinov2.data.masking import MaskingGenerator
from dinov2.data.seeding import PositionedSampler, SeededSamples, batch_random


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


def collate_training_batch(samples: list[tuple], seed: int = 0, **collate_kwargs) -> dict[str, Any]:
    """:func:`collate_data_and_cast` over ``(crops, target, skipped, position)`` samples, plus
    ``skipped_images``: how many unreadable images were skipped to produce this batch. The iBOT
    masks are drawn from a generator seeded by ``seed`` and the batch's first position, so a batch
    gets the same masks in any worker, process or world size."""
    rng = batch_random(seed, int(samples[0][3]))
    batch = collate_data_and_cast([sample[:2] for sample in samples], random_generator=rng, **collate_kwargs)
    batch["skipped_images"] = sum(int(sample[2]) for sample in samples)
    return batch


def build_collate(cfg: Any, dtype: torch.dtype = torch.float32) -> partial:
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    n_tokens = grid * grid
    return partial(
        collate_training_batch,
        seed=int(cfg.train.seed),
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
    """Batches of ``train.batch_size_per_gpu`` from the infinite global stream, starting after
    ``samples_consumed`` samples of all ranks together (see :class:`PositionedSampler`)."""
    if str(cfg.train.sampler_type).upper() not in ("INFINITE", "SHARDED_INFINITE"):
        raise ValueError(f"train.sampler_type={cfg.train.sampler_type!r}: training needs INFINITE or SHARDED_INFINITE")
    batch_size = int(cfg.train.batch_size_per_gpu)
    sampler = PositionedSampler(len(dataset), batch_size, seed=int(cfg.train.seed), start=int(samples_consumed))
    return make_data_loader(
        SeededSamples(dataset, seed=cfg.train.seed, return_position=True),
        batch_size=batch_size,
        num_workers=cfg.train.num_workers,
        sampler=sampler,
        seed=cfg.train.seed,
        drop_last=True,
        collate_fn=build_collate(cfg),
    )
