"""Per-sample seeding: augmentations that depend only on a sample's position in the training stream.

A resumable run must draw, after a restart, exactly the crops and masks an uninterrupted run would
have drawn. Seeding DataLoader workers once at start is not enough (a restarted worker's generator
is not where the interrupted one was), so the training stream carries positions:

* :class:`PositionedSampler` yields ``(global_position, index)`` pairs, the position being the
  sample's place in the global stream shared by all ranks (so augmentations do not depend on the
  world size either), batch by batch;
* :class:`SeededSamples` wraps a dataset and, before loading item ``index``, seeds Python's
  ``random``, NumPy's global generator and torch's CPU generator from ``(seed, global_position)``.

Batch-level randomness (the iBOT masks drawn in the training ``collate_fn``) is seeded from the
batch's first position (``SeededSamples(..., return_position=True)`` passes positions along), so
it is the same in a worker, in the main process and on any world size. In the main process
(``num_workers=0``) the generators are restored after each sample, so the model's own randomness
(stochastic depth) keeps its own stream, which the checkpoint saves and restores.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from dinov2.data.samplers import _order, _rank_world


class PositionedSampler:
    """``(global_position, index)`` pairs for this rank, in batches of ``batch_size``.

    The global stream is the concatenation of passes over the data (pass ``p`` a permutation seeded
    by ``(seed, p)``, as for :class:`~dinov2.data.samplers.InfiniteSampler`); position ``q`` holds
    index ``permutation[q % n]``. The stream from ``start`` on is cut into consecutive slots of
    ``batch_size`` positions, dealt round-robin to the ranks: rank ``r`` of ``W`` gets slots
    ``r, r + W, r + 2W, ...``, one slot per (micro-)batch. A step of ``W`` ranks with ``A``
    accumulation steps therefore consumes the same ``W * A`` slots, grouped into the same batches,
    whatever the split between ranks and accumulation: 2 ranks x 1 step sees exactly the batches of
    1 rank x 2 accumulation steps, and a run can resume on another world size at ``start`` = the
    number of samples consumed so far.
    """

    def __init__(
        self,
        sample_count: int,
        batch_size: int,
        seed: int = 0,
        start: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if sample_count < 1 or batch_size < 1 or start < 0 or seed < 0:
            raise ValueError(
                "need sample_count >= 1, batch_size >= 1, start >= 0, seed >= 0; "
                f"got {sample_count}, {batch_size}, {start}, {seed}"
            )
        self.sample_count, self.batch_size, self.seed = int(sample_count), int(batch_size), int(seed)
        self.start, self.shuffle = int(start), bool(shuffle)
        self.rank, self.world_size = _rank_world(rank, world_size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n, b = self.sample_count, self.batch_size
        cached_pass, order = -1, None
        slot = self.rank
        while True:
            first = self.start + slot * b
            for position in range(first, first + b):
                pass_index, offset = divmod(position, n)
                if pass_index != cached_pass:
                    cached_pass, order = pass_index, _order(n, self.shuffle, self.seed, pass_index)
                yield position, int(order[offset])
            slot += self.world_size


def _sample_seeds(seed: int, position: int) -> tuple[int, int, int]:
    state = np.random.SeedSequence([int(seed), int(position)]).generate_state(3, dtype=np.uint32)
    return int(state[0]), int(state[1]), int(state[2])


def batch_random(seed: int, first_position: int) -> random.Random:
    """A ``random.Random`` for batch-level draws (iBOT masks), seeded by the batch's first position."""
    state = np.random.SeedSequence([int(seed), int(first_position), 1]).generate_state(2, dtype=np.uint32)
    return random.Random(int(state[0]) << 32 | int(state[1]))


class SeededSamples(Dataset):
    """``(*dataset[index], skipped)`` computed with the generators seeded from ``(seed, position)``,
    for items ``(position, index)`` (see :class:`PositionedSampler`). ``skipped`` is the number of
    unreadable images the dataset skipped while producing this sample (0 for datasets that never
    skip), so that the training loop can count them across workers. With ``return_position`` the
    position is appended: ``(*dataset[index], skipped, position)``."""

    def __init__(self, dataset: Dataset, seed: int, return_position: bool = False) -> None:
        self.dataset, self.seed, self.return_position = dataset, int(seed), bool(return_position)

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
            sample = (*self.dataset[index], getattr(self.dataset, "num_skipped", 0) - skipped_before)
            return (*sample, position) if self.return_position else sample
        finally:
            if in_main_process:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])
