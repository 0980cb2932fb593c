"""Samplers (sharding, passes, resumption, padding) and make_data_loader (seeding, pinning, drop_last)."""

from __future__ import annotations

import enum
import itertools
import random
import time

import numpy as np
import pytest
import torch

from dinov2.data.loaders import WorkerSeeder, make_data_loader, make_dataset, sampler_for
from dinov2.data.samplers import EpochSampler, InfiniteSampler


def _take(sampler, count: int) -> list[int]:
    return list(itertools.islice(iter(sampler), count))


def test_infinite_unshuffled_is_sequential_and_wraps():
    assert _take(InfiniteSampler(5, rank=0, world_size=1), 12) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_infinite_pass_boundary_with_uneven_world():
    # global stream 0..6 | 0..6 | ...; rank 1 of 3 takes global positions 1, 4, 7, 10, 13, 16, 19
    assert _take(InfiniteSampler(7, rank=1, world_size=3), 7) == [1, 4, 0, 3, 6, 2, 5]
    assert _take(InfiniteSampler(7, rank=0, world_size=3), 5) == [0, 3, 6, 2, 5]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("sample_count", [7, 10])
@pytest.mark.parametrize("shuffle", [False, True])
def test_infinite_ranks_partition_every_pass(world_size, sample_count, shuffle):
    passes = 4
    per_rank = -(-passes * sample_count // world_size) + 1
    streams = [
        _take(InfiniteSampler(sample_count, shuffle=shuffle, seed=11, rank=r, world_size=world_size), per_rank)
        for r in range(world_size)
    ]
    # interleave the ranks back into the global stream (rank r's k-th item is global position r + k*W)
    merged = [streams[r][k] for k in range(per_rank) for r in range(world_size)]
    for p in range(passes):
        chunk = merged[p * sample_count : (p + 1) * sample_count]
        assert sorted(chunk) == list(range(sample_count))  # complete, no repeats
        owners = [(p * sample_count + i) % world_size for i in range(sample_count)]
        for r in range(world_size):  # the ranks' shares of this pass are disjoint
            for q in range(r + 1, world_size):
                mine = {x for x, o in zip(chunk, owners) if o == r}
                theirs = {x for x, o in zip(chunk, owners) if o == q}
                assert not mine & theirs


def test_infinite_shuffle_differs_per_pass_and_is_reproducible():
    n = 50
    stream = _take(InfiniteSampler(n, shuffle=True, seed=3, rank=0, world_size=1), 3 * n)
    passes = [stream[i * n : (i + 1) * n] for i in range(3)]
    assert all(sorted(p) == list(range(n)) for p in passes)
    assert passes[0] != passes[1] and passes[1] != passes[2]
    assert passes[0] != list(range(n))
    assert stream == _take(InfiniteSampler(n, shuffle=True, seed=3, rank=0, world_size=1), 3 * n)
    assert stream != _take(InfiniteSampler(n, shuffle=True, seed=4, rank=0, world_size=1), 3 * n)


@pytest.mark.parametrize("world_size", [1, 3])
@pytest.mark.parametrize("advance", [0, 1, 4, 9, 23, 31])
def test_infinite_resume_matches_uninterrupted_stream(world_size, advance):
    n = 7  # advance 23 and 31 lie several passes in
    for rank in range(world_size):
        kwargs = dict(shuffle=True, seed=5, rank=rank, world_size=world_size)
        full = _take(InfiniteSampler(n, **kwargs), advance + 15)
        resumed = _take(InfiniteSampler(n, advance=advance, **kwargs), 15)
        assert resumed == full[advance:]


def test_infinite_large_advance_is_fast_and_consistent():
    kwargs = dict(shuffle=True, seed=1, rank=1, world_size=4)
    start = time.perf_counter()
    late = _take(InfiniteSampler(1000, advance=10**12, **kwargs), 10)
    earlier = _take(InfiniteSampler(1000, advance=10**12 - 2000, **kwargs), 2010)
    assert time.perf_counter() - start < 2.0
    assert late == earlier[2000:]


def test_infinite_rejects_bad_arguments():
    with pytest.raises(ValueError):
        InfiniteSampler(0)
    with pytest.raises(ValueError):
        InfiniteSampler(5, rank=2, world_size=2)
    with pytest.raises(ValueError):
        InfiniteSampler(5, advance=-1)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("sample_count", [2, 10, 11])
@pytest.mark.parametrize("shuffle", [False, True])
def test_epoch_sampler_covers_each_index_once(world_size, sample_count, shuffle):
    samplers = [EpochSampler(sample_count, rank=r, world_size=world_size, shuffle=shuffle) for r in range(world_size)]
    lengths = {len(s) for s in samplers}
    assert lengths == {-(-sample_count // world_size)}  # equal shards
    real = [i for s in samplers for i in list(s)[: len(s) - s.num_padding]]
    assert sorted(real) == list(range(sample_count))
    assert sum(s.num_padding for s in samplers) == samplers[0].total_padding
    assert samplers[0].total_padding == world_size * len(samplers[0]) - sample_count
    gathered = np.concatenate([s.indices for s in samplers])  # what an all-gather in rank order yields
    np.testing.assert_array_equal(gathered, samplers[0].global_indices)
    assert sorted(gathered[:sample_count].tolist()) == list(range(sample_count))
    padding = samplers[0].total_padding  # the order repeated from its start, not one index many times
    assert gathered[sample_count:].tolist() == np.tile(gathered[:sample_count], 4)[:padding].tolist()
    if not shuffle:
        assert gathered[:sample_count].tolist() == list(range(sample_count))


def test_epoch_sampler_set_epoch_reshuffles():
    s = EpochSampler(30, rank=0, world_size=1, shuffle=True, seed=2)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first and sorted(s) == list(range(30))
    s.set_epoch(0)
    assert list(s) == first


class _Kind(enum.Enum):
    SHARDED_INFINITE = 1


def test_sampler_for_maps_names():
    inf = sampler_for("infinite", 10, seed=3, advance=4, rank=0, world_size=1)
    assert isinstance(inf, InfiniteSampler) and inf.shuffle and inf.advance == 4 and inf.seed == 3
    assert isinstance(sampler_for(_Kind.SHARDED_INFINITE, 10), InfiniteSampler)
    epoch = sampler_for("EPOCH", 10)
    assert isinstance(epoch, EpochSampler) and not epoch.shuffle
    dist = sampler_for("DISTRIBUTED", 10, seed=1)
    assert isinstance(dist, EpochSampler) and dist.shuffle
    with pytest.raises(ValueError):
        sampler_for("EPOCH", 10, advance=3)
    with pytest.raises(ValueError):
        sampler_for("RANDOM", 10)


class _RandomDraws(torch.utils.data.Dataset):
    """Each item reports draws from Python ``random``, NumPy and torch made inside ``__getitem__``."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([random.random(), np.random.rand(), torch.rand(()).item()], dtype=torch.float64)


def _all_batches(seed: int) -> list[torch.Tensor]:
    loader = make_data_loader(_RandomDraws(), 2, num_workers=2, shuffle=False, seed=seed, persistent_workers=False)
    return list(loader)


def test_worker_seeding_is_reproducible_and_differs_across_workers():
    first, second = _all_batches(seed=7), _all_batches(seed=7)
    assert len(first) == 4
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # batches 0 and 1 come from workers 0 and 1: every generator differs between them
    assert (first[0][0] != first[1][0]).all()
    other = _all_batches(seed=8)
    assert (first[0] != other[0]).all()


@pytest.mark.parametrize("persistent", [False, True])
def test_each_epoch_draws_new_augmentations_reproducibly(persistent):
    def two_epochs(seed: int) -> list[torch.Tensor]:
        loader = make_data_loader(
            _RandomDraws(), 4, num_workers=1, shuffle=False, seed=seed, persistent_workers=persistent
        )
        return [torch.cat(list(loader)) for _ in range(2)]

    epochs = two_epochs(seed=3)
    # same samples in the same order, but a new epoch must not replay the previous epoch's random draws
    assert (epochs[0] != epochs[1]).all()
    torch.manual_seed(123)  # the epochs do not depend on the main process's generator either
    again = two_epochs(seed=3)
    for a, b in zip(epochs, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_worker_seeder_seeds_all_generators():
    WorkerSeeder(seed=1, rank=0)(worker_id=3)
    draws = (random.random(), np.random.rand(), torch.rand(()).item())
    WorkerSeeder(seed=1, rank=0)(worker_id=3)
    assert draws == (random.random(), np.random.rand(), torch.rand(()).item())
    WorkerSeeder(seed=1, rank=1)(worker_id=3)
    assert random.random() != draws[0]


def test_worker_seeder_gives_numpy_and_torch_different_streams():
    # both are MT19937 generators: seeded from one word they would emit the same 32-bit numbers
    WorkerSeeder(seed=5, rank=0)(worker_id=0)
    from_numpy = set(np.random.randint(0, 2**32, size=64, dtype=np.uint64).tolist())
    from_torch = set(torch.randint(0, 2**32, (64,), dtype=torch.int64).tolist())
    assert not from_numpy & from_torch


def test_loader_defaults_pin_memory_and_drop_last():
    data = torch.arange(10)
    loader = make_data_loader(data, 4, num_workers=0, shuffle=False)
    assert loader.pin_memory is torch.cuda.is_available()
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    kept = make_data_loader(data, 4, num_workers=0, shuffle=False, drop_last=False)
    assert [len(b) for b in kept] == [4, 4, 2]
    shuffled = torch.cat(list(make_data_loader(data, 5, num_workers=0, shuffle=True, seed=1)))
    assert sorted(shuffled.tolist()) == list(range(10)) and shuffled.tolist() != list(range(10))
    sampler = InfiniteSampler(10, rank=0, world_size=1, advance=8)
    infinite = iter(make_data_loader(data, 4, num_workers=0, sampler=sampler))
    assert next(infinite).tolist() == [8, 9, 0, 1]


def test_make_dataset_is_reexported():
    dataset = make_dataset("Synthetic:split=VAL:num_images=6:image_size=16")
    assert len(dataset) == 6 and dataset[0][0].size == (16, 16)
