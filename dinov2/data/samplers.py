"""Index samplers: an infinite, sharded, resumable one for training and a padded one for evaluation.

Both shard a single *global* order across ranks, so every rank sees different samples. Ranks and
world size default to :mod:`dinov2.distributed` (rank 0 of 1 in a single process).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from dinov2 import distributed


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = distributed.get_rank() if rank is None else int(rank)
    world_size = distributed.get_world_size() if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


def _order(sample_count: int, shuffle: bool, seed: int, step: int) -> np.ndarray:
    """The ``step``-th permutation of ``range(sample_count)``: seeded by ``(seed, step)``, or sequential."""
    if not shuffle:
        return np.arange(sample_count, dtype=np.int64)
    return np.random.default_rng([int(seed), int(step)]).permutation(sample_count)


class InfiniteSampler:
    """Yields dataset indices forever, sharded across ranks and resumable.

    The *global stream* is the concatenation of passes ``0, 1, 2, ...`` over the data; pass ``p`` is
    ``range(sample_count)`` or, with ``shuffle``, a permutation from a generator seeded by ``(seed, p)``.
    Rank ``r`` of ``W`` takes global positions ``r, r + W, r + 2W, ...``. Within any pass the ranks
    therefore get disjoint indices whose union is the whole pass; when ``sample_count`` is not a
    multiple of ``W`` the stream simply runs on into the next pass (no padding, no dropping), so a
    rank's k-th item may sit in a different pass than another rank's k-th item.

    ``advance`` is the number of indices *this rank* has already consumed (for a training loop:
    ``iteration * batch_size_per_rank``). Iteration starts at global position ``rank + advance * W``;
    the pass and offset are computed directly, so a large ``advance`` costs nothing.
    """

    def __init__(
        self,
        sample_count: int,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        advance: int = 0,
    ) -> None:
        if sample_count < 1:
            raise ValueError(f"sample_count must be positive, got {sample_count}")
        if advance < 0:
            raise ValueError(f"advance must be non-negative, got {advance}")
        self.sample_count, self.shuffle, self.seed = int(sample_count), bool(shuffle), int(seed)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.advance = int(advance)

    def __iter__(self) -> Iterator[int]:
        n, step = self.sample_count, self.world_size
        position = self.rank + self.advance * step  # global position of the next index
        while True:
            epoch, offset = divmod(position, n)
            chunk = _order(n, self.shuffle, self.seed, epoch)[offset::step]
            yield from chunk.tolist()
            position += len(chunk) * step


class EpochSampler:
    """Every index once per epoch, split across ranks in contiguous, equally long blocks.

    The global order (``range(sample_count)``, or a permutation seeded by ``(seed, epoch)``) is padded
    by repeating it from the start up to ``num_samples * world_size`` entries, ``num_samples =
    ceil(sample_count / world_size)``; rank ``r`` gets block ``r``. Padding therefore sits at the end
    of the padded order (on the last ranks): after an all-gather that concatenates the ranks' results
    in rank order, the first ``sample_count`` rows are the real ones and row ``i`` belongs to dataset
    index ``global_indices[i]`` (``i`` itself without shuffling).
    """

    def __init__(
        self,
        sample_count: int,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
    ) -> None:
        if sample_count < 1:
            raise ValueError(f"sample_count must be positive, got {sample_count}")
        self.sample_count, self.shuffle, self.seed = int(sample_count), bool(shuffle), int(seed)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.num_samples = -(-self.sample_count // self.world_size)
        self.total_size = self.num_samples * self.world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for ``epoch`` (only matters with ``shuffle``)."""
        self.epoch = int(epoch)

    @property
    def global_indices(self) -> np.ndarray:
        """The padded global order (``total_size`` entries); rank ``r`` owns block ``r``."""
        order = _order(self.sample_count, self.shuffle, self.seed, self.epoch)
        return np.resize(order, self.total_size)  # np.resize repeats from the start

    @property
    def indices(self) -> np.ndarray:
        """This rank's indices (``num_samples`` entries, padding last)."""
        start = self.rank * self.num_samples
        return self.global_indices[start : start + self.num_samples]

    @property
    def num_padding(self) -> int:
        """How many of this rank's indices are padding (repeats)."""
        real = self.sample_count - self.rank * self.num_samples
        return self.num_samples - min(max(real, 0), self.num_samples)

    @property
    def total_padding(self) -> int:
        """How many padding entries there are over all ranks."""
        return self.total_size - self.sample_count

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())
