"""Per-sample seeding: augmentations that depend only on a sample's position in the training stream.

A resumable run must draw, after a restart, exactly the crops and masks an uninterrupted run would
have drawn. Seeding DataLoader workers once at start is not enough (a restarted worker's generator
is not where the interrupted one was), so the training stream carries positions:

* :class:`PositionedSampler` wraps an :class:`~dinov2.data.samplers.InfiniteSampler` and yields
  ``(global_position, index)`` pairs, the position being the sample's place in the global stream
  shared by all ranks (so augmentations do not depend on the world size either);
* :class:`SeededSamples` wraps a dataset and, before loading item ``index``, seeds Python's
  ``random``, NumPy's global generator and torch's CPU generator from ``(seed, global_position)``.

Batch-level randomness (the iBOT masks drawn in ``collate_fn``) then follows from the seeds of the
batch's samples: in a worker the collate function runs right after the batch's last sample. In the
main process (``num_workers=0``) the generators are restored after each sample, so the model's own
randomness (stochastic depth) keeps its own stream, which the checkpoint saves and restores.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from dinov2.data.samplers import InfiniteSampler


class PositionedSampler:
    """``(global_position, index)`` pairs of an :class:`InfiniteSampler`'s stream for this rank."""

    def __init__(self, sampler: InfiniteSampler) -> None:
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world, start = self.sampler.rank, self.sampler.world_size, self.sampler.advance
        for offset, index in enumerate(self.sampler):
            yield rank + (start + offset) * world, index


def _sample_seeds(seed: int, position: int) -> tuple[int, int, int]:
    state = np.random.SeedSequence([int(seed), int(position)]).generate_state(3, dtype=np.uint32)
    return int(state[0]), int(state[1]), int(state[2])


class SeededSamples(Dataset):
    """``(*dataset[index], skipped)`` computed with the generators seeded from ``(seed, position)``,
    for items ``(position, index)`` (see :class:`PositionedSampler`). ``skipped`` is the number of
    unreadable images the dataset skipped while producing this sample (0 for datasets that never
    skip), so that the training loop can count them across workers."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (unpickling): avoid recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, item: tuple[int, int]):
        position, index = item
        in_main_process = get_worker_info() is None
        if in_main_process:
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        python_seed, numpy_seed, torch_seed = _sample_seeds(self.seed, position)
        random.seed(python_seed)
        np.random.seed(numpy_seed)
        torch.default_generator.manual_seed(torch_seed)
        skipped_before = getattr(self.dataset, "num_skipped", 0)
        try:
            return (*self.dataset[index], getattr(self.dataset, "num_skipped", 0) - skipped_before)
        finally:
            if in_main_process:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])
