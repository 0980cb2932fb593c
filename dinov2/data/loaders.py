"""DataLoader construction: sampler choice by name, per-worker seeding and device-aware defaults.

Sampler names from the original configs map onto :mod:`dinov2.data.samplers`:

* ``INFINITE`` and ``SHARDED_INFINITE`` -> :class:`InfiniteSampler` (shuffled, resumable with
  ``advance`` = indices already consumed by this rank); the original distinguished two
  implementations of the same stream, here there is one.
* ``EPOCH`` -> :class:`EpochSampler` in dataset order (evaluation: every sample once, padded).
* ``DISTRIBUTED`` -> :class:`EpochSampler` shuffled by ``seed`` (one pass, sharded; call
  ``set_epoch`` for a new permutation).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from dinov2 import distributed
from dinov2.data.samplers import EpochSampler, InfiniteSampler

SAMPLER_KINDS = ("INFINITE", "SHARDED_INFINITE", "EPOCH", "DISTRIBUTED")


def make_dataset(*args: Any, **kwargs: Any):
    """Build a dataset from its description; see :func:`dinov2.data.datasets.make_dataset`."""
    from dinov2.data.datasets import make_dataset as _make_dataset

    return _make_dataset(*args, **kwargs)


def sampler_for(
    kind: str | Enum,
    dataset_len: int,
    seed: int = 0,
    advance: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
) -> InfiniteSampler | EpochSampler:
    """The sampler for a config name (``INFINITE``, ``SHARDED_INFINITE``, ``EPOCH``, ``DISTRIBUTED``;
    an Enum member is read by name, case is ignored). ``advance`` is only valid for the infinite kinds."""
    name = (kind.name if isinstance(kind, Enum) else str(kind)).upper()
    if name not in SAMPLER_KINDS:
        raise ValueError(f"unknown sampler kind {kind!r}; expected one of {SAMPLER_KINDS}")
    if name in ("INFINITE", "SHARDED_INFINITE"):
        return InfiniteSampler(dataset_len, shuffle=True, seed=seed, rank=rank, world_size=world_size, advance=advance)
    if advance:
        raise ValueError(f"advance={advance} is only supported by the infinite samplers, not {name}")
    return EpochSampler(dataset_len, rank=rank, world_size=world_size, shuffle=name == "DISTRIBUTED", seed=seed)


class WorkerSeeder:
    """``worker_init_fn`` that seeds Python ``random``, NumPy and torch in each worker from
    ``(seed, rank, worker_id)`` and the DataLoader iterator's base seed: reproducible across runs,
    different across workers and ranks, and different for each new iterator of the loader (an epoch
    of a loader without persistent workers restarts its workers; without the base seed they would
    redraw the previous epoch's augmentations). :func:`make_data_loader` draws the base seeds from a
    generator seeded by ``seed``, so the sequence of epochs is reproducible as well. Called
    outside a worker, the base seed counts as 0. The three generators get independent seeds."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = int(seed), int(rank)

    def __call__(self, worker_id: int) -> None:
        info = get_worker_info()
        base_seed = 0 if info is None else int(info.seed) - int(info.id)  # the same for all workers of an iterator
        entropy = [self.seed, self.rank, int(worker_id), base_seed]
        state = np.random.SeedSequence(entropy).generate_state(3, dtype=np.uint64)
        random.seed(int(state[0]))
        # NumPy's legacy generator and torch's CPU generator are both MT19937 seeded from the seed's low 32
        # bits: one shared word would give them the same stream of numbers. Each gets its own.
        np.random.seed(int(state[1] % 2**32))
        torch.manual_seed(int(state[2] % 2**63))


def make_data_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    sampler: Sampler | InfiniteSampler | EpochSampler | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = True,
    persistent_workers: bool = True,
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
    collate_fn: Callable[[list], Any] | None = None,
    worker_init_fn: Callable[[int], None] | None = None,
) -> DataLoader:
    """A :class:`~torch.utils.data.DataLoader` over ``dataset``.

    Without ``sampler`` an :class:`EpochSampler` (sharded over ranks, shuffled by ``seed`` when
    ``shuffle``) is used. ``pin_memory=None`` pins when CUDA is available; ``persistent_workers`` and
    ``prefetch_factor`` only apply with ``num_workers > 0``. ``worker_init_fn=None`` installs
    :class:`WorkerSeeder` (seeded from ``seed``, this process's rank and each iterator's base seed, drawn
    from a generator of the loader's own); pass a callable to replace it (then the base seeds come from
    torch's global generator, as in PyTorch).
    With ``num_workers=0`` no seeding happens: samples use the main process's generators.
    """
    if sampler is None:
        sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    generator = None
    if worker_init_fn is None:
        worker_init_fn = WorkerSeeder(seed, distributed.get_rank())
        generator = torch.Generator().manual_seed(int(seed))  # the iterators' base seeds, for WorkerSeeder
    extra = {}
    if num_workers > 0:
        extra = {"persistent_workers": persistent_workers, "prefetch_factor": prefetch_factor}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        collate_fn=collate_fn,
        worker_init_fn=worker_init_fn,
        generator=generator,
        **extra,
    )
