"""The training data stream: dataset -> multi-crop augmentation -> positioned, seeded sampling ->
collation with iBOT masks. Resuming at iteration ``i`` restarts the stream where it stopped."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.data import DataLoader

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import check_mask_settings, collate_data_and_cast
from dinov2.data.gpu_augmentation import GPUMultiCrop, MultiCropParams, collate_multicrop_params
from dinov2.data.loaders import make_data_loader, make_dataset
from dinov2.data.masking import MaskingGenerator
from dinov2.data.seeding import PositionedSampler, SeededSamples, batch_random
from dinov2.utils.config import select


def _crop_settings(crops: Any) -> dict[str, Any]:
    return dict(
        global_crops_scale=crops.global_crops_scale,
        local_crops_scale=crops.local_crops_scale,
        local_crops_number=crops.local_crops_number,
        global_crops_size=crops.global_crops_size,
        local_crops_size=crops.local_crops_size,
        global_crops_1_blur_prob=crops.global_crops_1_blur_prob,
        global_crops_2_blur_prob=crops.global_crops_2_blur_prob,
        local_crops_blur_prob=crops.local_crops_blur_prob,
    )


def build_augmentation(crops: Any) -> DataAugmentationDINO:
    """Multi-crop augmentation from the config's ``crops`` section."""
    return DataAugmentationDINO(**_crop_settings(crops))


def gpu_augmentation_enabled(cfg: Any) -> bool:
    """``train.gpu_augmentation``: workers decode and draw parameters, the device renders the crops."""
    return bool(select(cfg, "train.gpu_augmentation", False))


def build_params_transform(crops: Any) -> MultiCropParams:
    """The dataset transform of the GPU-augmentation mode: the same draws as :func:`build_augmentation`."""
    return MultiCropParams(**_crop_settings(crops))


def build_gpu_augmentation(cfg: Any, dtype: torch.dtype = torch.float32) -> GPUMultiCrop:
    """Applies to a batch of the GPU-augmentation loader once on the device (see ``Trainer.step``):
    ``gpu_augment(batch_to_device(batch, device))`` has the keys of the CPU path's batches."""
    return GPUMultiCrop(cfg.crops.global_crops_size, cfg.crops.local_crops_size, dtype=dtype)


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
    check_mask_settings(
        tuple(cfg.ibot.mask_ratio_min_max),
        cfg.ibot.mask_sample_probability,
        where="ibot.mask_ratio_min_max / ibot.mask_sample_probability",
    )
    return partial(
        collate_training_batch,
        seed=int(cfg.train.seed),
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        dtype=dtype,
        n_tokens=n_tokens,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * n_tokens),
    )


def build_gpu_collate(cfg: Any) -> partial:
    """The collate of the GPU-augmentation mode: padded uint8 images, crop parameters, and the iBOT
    masks of :func:`build_collate` (identical for the same batch)."""
    return partial(collate_multicrop_params, mask_collate=build_collate(cfg))


def build_train_dataset(cfg: Any):
    """The dataset named by ``train.dataset_path``, with the multi-crop augmentation as its transform
    (with ``train.gpu_augmentation``, :class:`MultiCropParams`)."""
    gpu = gpu_augmentation_enabled(cfg)
    transform = build_params_transform(cfg.crops) if gpu else build_augmentation(cfg.crops)
    return make_dataset(str(cfg.train.dataset_path), transform=transform, target_transform=None)


def _pins_memory(cfg: Any) -> bool:
    """Pinned host memory only helps copies to a CUDA device: True when ``train.device`` is (or,
    with ``auto``, resolves to) CUDA. A CPU run on a machine with GPUs does not pin (pinning would
    also start a CUDA context in the pin-memory thread)."""
    name = select(cfg, "train.device", "auto")
    if name in (None, "", "auto"):
        return torch.cuda.is_available()
    try:
        device = torch.device(str(name))
    except RuntimeError as error:
        raise ValueError(f"train.device={name!r} is not a device name ({error})") from error
    return device.type == "cuda" and torch.cuda.is_available()


def build_train_loader(cfg: Any, dataset, samples_consumed: int = 0) -> DataLoader:
    """Batches of ``train.batch_size_per_gpu`` from the infinite global stream, starting after
    ``samples_consumed`` samples of all ranks together (see :class:`PositionedSampler`). Host
    memory is pinned only when ``train.device`` is a CUDA device. ``train.seed`` must be >= 0."""
    if str(cfg.train.sampler_type).upper() not in ("INFINITE", "SHARDED_INFINITE"):
        raise ValueError(f"train.sampler_type={cfg.train.sampler_type!r}: training needs INFINITE or SHARDED_INFINITE")
    batch_size, seed = int(cfg.train.batch_size_per_gpu), int(cfg.train.seed)
    if seed < 0:  # the stream's generators are seeded through NumPy's SeedSequence, which takes no negative words
        raise ValueError(f"train.seed must be a non-negative integer, got {cfg.train.seed}")
    sampler = PositionedSampler(len(dataset), batch_size, seed=seed, start=int(samples_consumed))
    return make_data_loader(
        SeededSamples(dataset, seed=seed, return_position=True),
        batch_size=batch_size,
        num_workers=cfg.train.num_workers,
        sampler=sampler,
        seed=seed,
        drop_last=True,
        pin_memory=_pins_memory(cfg),
        collate_fn=build_gpu_collate(cfg) if gpu_augmentation_enabled(cfg) else build_collate(cfg),
    )
