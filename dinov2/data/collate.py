"""Batch collation for SSL training: stack multi-crop views crop-major and draw the iBOT masks."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from dinov2.data.augmentations import is_probability
from dinov2.data.masking import MaskingGenerator


def _stack_crop_major(samples_list: Sequence, key: str, dtype: torch.dtype) -> torch.Tensor:
    """``[sample0 crop0, sample1 crop0, ..., sample0 crop1, ...]`` stacked and cast to ``dtype``."""
    n_crops = len(samples_list[0][0][key])
    crops = [sample[0][key][i] for i in range(n_crops) for sample in samples_list]
    if not crops:
        return torch.empty(0, dtype=dtype)
    return torch.stack(crops).to(dtype)


def check_mask_settings(mask_ratio_tuple: Sequence[float], mask_probability: float, where: str = "") -> None:
    """Raise a ValueError unless ``0 <= mask_probability <= 1`` and ``mask_ratio_tuple`` is a
    pair of ratios in ``[0, 1]``; ``where`` names the setting in the message."""
    prefix = f"{where}: " if where else ""
    if not is_probability(mask_probability):
        raise ValueError(f"{prefix}mask_probability must be in [0, 1], got {mask_probability!r}")
    try:
        ratios = tuple(mask_ratio_tuple)
    except TypeError:
        ratios = (mask_ratio_tuple,)
    if len(ratios) != 2 or not all(is_probability(ratio) for ratio in ratios):
        raise ValueError(f"{prefix}mask_ratio_tuple must be a (min, max) pair of ratios in [0, 1], got {ratios}")


def _draw_masks(
    n_crops: int,
    n_tokens: int,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    mask_generator: MaskingGenerator,
    rng,
    mask_rng=None,
) -> tuple[torch.Tensor, int]:
    """(n_crops, n_tokens) bool masks, ``int(n_crops * mask_probability)`` of them non-empty, and the
    upper bound on their total number of masked tokens. ``mask_rng`` (default: the generator's own)
    draws the rectangles."""
    check_mask_settings(mask_ratio_tuple, mask_probability)
    n_masked = int(n_crops * mask_probability)
    probs = np.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked + 1)
    masks, upperbound = [], 0
    for prob_min, prob_max in zip(probs[:-1].tolist(), probs[1:].tolist()):
        masks.append(mask_generator(int(n_tokens * rng.uniform(prob_min, prob_max)), rng=mask_rng))
        upperbound += int(n_tokens * prob_max)
    masks += [mask_generator(0, rng=mask_rng) for _ in range(n_crops - n_masked)]
    rng.shuffle(masks)
    stacked = torch.from_numpy(np.stack(masks)).reshape(n_crops, -1)
    if stacked.shape[1] != n_tokens:
        raise ValueError(f"mask generator gives {stacked.shape[1]} tokens per crop, expected n_tokens={n_tokens}")
    return stacked, upperbound


def collate_data_and_cast(
    samples_list: Sequence[tuple[dict, object]],
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    dtype: torch.dtype,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    random_generator: random.Random | None = None,
) -> dict[str, torch.Tensor | int]:
    """Collate ``(augmentation dict, target)`` samples (see ``DataAugmentationDINO``) into a training batch.

    Returns ``collated_global_crops`` (2B, 3, H, W) and ``collated_local_crops`` (N_local * B, 3, h, w), both
    crop-major (all first crops, then all second ...) and cast to ``dtype``; ``collated_masks`` (2B, n_tokens)
    bool; ``mask_indices_list`` (indices of True in ``collated_masks.flatten()``); ``masks_weight`` (float32,
    ``1 / masked tokens of its crop`` for each masked token); ``n_masked_patches`` (long, shape (1,)); and
    ``upperbound`` (int bound on the number of masked tokens). Targets are dropped.

    ``int(2B * mask_probability)`` crops are masked, crop ``i`` with a ratio drawn uniformly from the ``i``-th
    of the equal bins splitting ``mask_ratio_tuple``; the masks are then shuffled across crops.
    ``n_tokens`` defaults to the generator's grid size. Randomness (ratios, rectangles, the shuffle) comes
    from ``random_generator`` when given, else the ``random`` module and the generator's own. Training
    passes ``random_generator=batch_random(...)`` (``dinov2.data.seeding``), seeded by the batch's
    position in the sample stream, so masks do not depend on which worker or rank collates the batch.
    """
    if mask_generator is None:
        raise ValueError("collate_data_and_cast needs a mask_generator")
    if n_tokens is None:
        height, width = mask_generator.get_shape()
        n_tokens = height * width
    rng = random_generator if random_generator is not None else random

    collated_global_crops = _stack_crop_major(samples_list, "global_crops", dtype)
    collated_local_crops = _stack_crop_major(samples_list, "local_crops", dtype)
    collated_masks, upperbound = _draw_masks(
        len(collated_global_crops), n_tokens, mask_ratio_tuple, mask_probability, mask_generator, rng,
        mask_rng=random_generator,
    )  # fmt: skip
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_crop_weight = 1.0 / collated_masks.sum(dim=-1).clamp(min=1).to(torch.float32)
    masks_weight = per_crop_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {
        "collated_global_crops": collated_global_crops,
        "collated_local_crops": collated_local_crops,
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
