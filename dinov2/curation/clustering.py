"""Stage 3, cluster: spherical k-means (faiss) and hierarchical k-means with balanced sampling.

Hierarchical k-means (Vo et al., 2024, "Automatic Data Curation for Self-Supervised Learning: A
Clustering-Based Approach"): level 1 clusters the points into ``levels[0]`` clusters, level 2
clusters the level-1 centroids into ``levels[1]``, and so on. Optional resampling steps move each
level's centroids towards a uniform cover of the data: each step runs a fresh k-means on the
``resample_size`` points nearest each centroid (every cluster then weighs the same).

Level 1 is trained on a seeded sample of at most ``max_train_points`` vectors and then every
vector is assigned chunk by chunk, so the pool is never in memory at once; what is kept per vector
is its level-1 label and its similarity to that centroid.

Balanced sampling walks the hierarchy from the top: ``target`` images are shared equally among
the top clusters (a cluster with fewer images than its share gives all of them, and the rest is
shared among the others), each cluster's share is shared the same way among its children, down to
level 1, where the images are drawn at random (seeded) or taken closest to the centroid first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinov2.curation.faiss_index import VectorIndex, import_faiss

logger = logging.getLogger("dinov2")

SAMPLING_STRATEGIES = ("random", "closest")


INIT_METHODS = {"random": "RANDOM", "kmeans++": "KMEANS_PLUS_PLUS", "afkmc2": "AFK_MC2"}


def spherical_kmeans(
    x: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    gpus: int = 0,
    init=None,
    method: str = "kmeans++",
    nredo: int = 1,
) -> np.ndarray:
    """``k`` unit-norm centroids of the rows of ``x`` (faiss.Kmeans, spherical, on all of ``x``).

    ``method`` seeds the centroids (``kmeans++``, ``afkmc2`` or ``random``; a faiss without the
    option falls back to random with a warning); ``init`` gives starting centroids instead.
    ``nredo`` runs k-means that many times and keeps the best objective (k-means stops in local optima).
    """
    faiss = import_faiss()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not 1 <= k <= len(x):
        raise ValueError(f"cannot make {k} clusters of {len(x)} vectors (need 1 <= k <= number of vectors)")
    if method not in INIT_METHODS:
        raise ValueError(f"clustering.init must be one of {tuple(INIT_METHODS)}, got {method!r}")
    options = {}
    if method != "random":
        if hasattr(faiss, f"ClusteringInitMethod_{INIT_METHODS[method]}"):
            options["init_method"] = getattr(faiss, f"ClusteringInitMethod_{INIT_METHODS[method]}")
        else:
            logger.warning("this faiss has no %s initialisation; k-means starts from random points", method)
    kmeans = faiss.Kmeans(
        x.shape[1], int(k), niter=int(niter), seed=int(seed), spherical=True, gpu=gpus or False, nredo=int(nredo),
        max_points_per_centroid=max(1, -(-len(x) // k)), min_points_per_centroid=1, verbose=False, **options,
    )  # fmt: skip
    kmeans.train(x, init_centroids=None if init is None else np.ascontiguousarray(init, dtype=np.float32))
    return np.asarray(kmeans.centroids, dtype=np.float32)


def centroid_index(centroids: np.ndarray) -> VectorIndex:
    """An exact index over ``centroids`` (ids = centroid numbers), to assign many chunks with one copy."""
    index = VectorIndex(centroids.shape[1])
    index.add(centroids, np.arange(len(centroids)))
    return index


def assign(x: np.ndarray, centroids: np.ndarray | VectorIndex) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (by inner product) of each row: ``(labels int64, similarities float32)``.
    ``centroids`` is an array, or a :func:`centroid_index` built once for many calls."""
    index = centroids if isinstance(centroids, VectorIndex) else centroid_index(centroids)
    sims, labels = index.search(x, 1)
    return labels[:, 0], sims[:, 0]


def _resampled(x: np.ndarray, centroids: np.ndarray, size: int) -> np.ndarray:
    """The rows of ``x`` among the ``size`` nearest of their own centroid."""
    labels, sims = assign(x, centroids)
    order = np.lexsort((-sims, labels))  # by cluster, nearest first
    starts = np.searchsorted(labels[order], labels[order], side="left")
    rank_in_cluster = np.arange(len(order)) - starts
    return x[np.sort(order[rank_in_cluster < size])]


def kmeans_level(x: np.ndarray, k: int, cfg, seed: int, gpus: int) -> np.ndarray:
    """One level: k-means on ``x``, then ``cfg.resampling_steps`` resampling steps.

    Each step takes the ``cfg.resample_size`` vectors nearest each current centroid and runs a fresh
    k-means (``cfg.init`` seeding, its own seed) on them, as Vo et al. do. Every cluster then weighs
    the same, so centroids leave dense regions for sparse ones. Starting that k-means from the current
    centroids would not do this: each resampled vector already sits in its own centroid's cell, so
    the run stops where it starts.
    """
    steps, size = int(cfg.resampling_steps), int(cfg.resample_size)
    if steps > 0 and size < 1:
        raise ValueError(f"clustering.resample_size must be >= 1 when resampling_steps > 0, got {size}")
    method, nredo = str(cfg.init), int(cfg.nredo)
    centroids = spherical_kmeans(x, k, int(cfg.niter), seed, gpus, method=method, nredo=nredo)
    for step in range(steps):
        subset = _resampled(x, centroids, size)
        if len(subset) < k:  # empty clusters (repeated vectors): too few points for k clusters
            logger.warning("Resampling step %d gives %d vectors for %d clusters: stopping resampling here",
                           step + 1, len(subset), k)  # fmt: skip
            break
        centroids = spherical_kmeans(subset, k, int(cfg.niter), seed + step + 1, gpus, method=method, nredo=nredo)
    return centroids


@dataclass
class Hierarchy:
    """``centroids[l]`` of level ``l + 1``; ``labels[0]`` the level-1 cluster of each vector id (-1:
    not clustered), ``labels[l]`` the level-``l + 1`` parent of each level-``l`` centroid;
    ``similarity`` of each vector to its level-1 centroid."""

    centroids: list[np.ndarray]
    labels: list[np.ndarray]
    similarity: np.ndarray

    @property
    def depth(self) -> int:
        return len(self.centroids)

    def sizes(self, level: int) -> np.ndarray:
        """Number of vectors in each cluster of ``level`` (1-based)."""
        counts = np.bincount(self.labels[0][self.labels[0] >= 0], minlength=len(self.centroids[0]))
        for lvl in range(1, level):
            counts = np.bincount(self.labels[lvl], weights=counts, minlength=len(self.centroids[lvl])).astype(np.int64)
        return counts

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {f"centroids_{i + 1}": c for i, c in enumerate(self.centroids)}
        arrays.update({f"labels_{i}": lab for i, lab in enumerate(self.labels)})
        from dinov2.checkpoint.training import atomic_write

        atomic_write(directory / "hierarchy.npz", lambda f: np.savez(f, similarity=self.similarity, **arrays))

    @classmethod
    def load(cls, directory: str | Path) -> Hierarchy:
        with np.load(Path(directory) / "hierarchy.npz", allow_pickle=False) as data:
            depth = sum(1 for key in data.files if key.startswith("centroids_"))
            return cls(
                [data[f"centroids_{i + 1}"] for i in range(depth)],
                [data[f"labels_{i}"] for i in range(depth)],
                data["similarity"],
            )


def check_levels(levels) -> list[int]:
    """``clustering.levels`` as integers: at least one level, each positive, none larger than the one below."""
    if isinstance(levels, int | str) or any(isinstance(k, bool) or not isinstance(k, int) for k in levels):
        raise ValueError(f"clustering.levels must be a list of integers (level 1 first), got {levels!r}")
    levels = [int(k) for k in levels]
    if not levels or min(levels) < 1 or any(b > a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"clustering.levels must be positive and non-increasing (level 1 first), got {levels}")
    return levels


def hierarchical_kmeans(store, keep, cfg, gpus: int = 0) -> Hierarchy:
    """Cluster the store's vectors where ``keep`` is true into ``cfg.levels`` (see the module docstring)."""
    levels = check_levels(cfg.levels)
    seed = int(cfg.seed)
    sample = store.read(store.sample_ids(int(cfg.max_train_points), seed, keep))
    if len(sample) < levels[0]:
        available = len(store) if keep is None else int(np.count_nonzero(keep))
        if available == 0:
            raise ValueError(
                f"nothing to cluster: deduplication kept none of the {len(store)} embedded images; are "
                "dedup.threshold and dedup.eval_threshold right for this embedder? (docs/curation.md, Deduplicate)"
            )
        fix = "use fewer level-1 clusters" if available < levels[0] else "raise clustering.max_train_points"
        raise ValueError(
            f"clustering.levels[0] = {levels[0]} clusters, but level 1 is trained on {len(sample)} vectors "
            f"({available} left after deduplication, clustering.max_train_points = {int(cfg.max_train_points)}); "
            f"{fix}"
        )
    centroids = [kmeans_level(sample, levels[0], cfg, seed, gpus)]
    point_labels = np.full(len(store), -1, dtype=np.int64)
    similarity = np.full(len(store), -np.inf, dtype=np.float32)
    level_one = centroid_index(centroids[0])
    for ids, vectors in store.iter_chunks(keep):
        point_labels[ids], similarity[ids] = assign(vectors, level_one)
    labels = [point_labels]
    for level, k in enumerate(levels[1:], start=2):
        below = centroids[-1]
        centroids.append(kmeans_level(below, k, cfg, seed + level, gpus))
        labels.append(assign(below, centroids[-1])[0])
    logger.info("Hierarchical k-means: levels %s over %d vectors", levels, int(np.count_nonzero(point_labels >= 0)))
    return Hierarchy(centroids, labels, similarity)


def allocate(sizes: np.ndarray, target: int) -> np.ndarray:
    """Share ``target`` among clusters of ``sizes`` as equally as their sizes allow (water-filling).

    Clusters smaller than their share give everything; the others get shares that differ by at
    most one (the larger clusters take the remainder). Never more than a cluster holds.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    counts = np.zeros_like(sizes)
    remaining = int(min(max(target, 0), sizes.sum()))
    order = np.argsort(sizes, kind="stable")
    order = order[sizes[order] > 0]
    for pos, cluster in enumerate(order):
        left = len(order) - pos
        if sizes[cluster] * left <= remaining:
            counts[cluster] = sizes[cluster]
            remaining -= int(sizes[cluster])
            continue
        rest = order[pos:]
        base, extra = divmod(remaining, left)
        counts[rest] = base
        if extra:
            counts[rest[len(rest) - extra :]] += 1
        break
    return counts


def balanced_sample(h: Hierarchy, target: int, seed: int = 0, strategy: str = "random") -> np.ndarray:
    """Sorted ids of ``target`` vectors (or all when fewer) drawn balanced across the hierarchy."""
    if strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"retrieval.sampling must be one of {SAMPLING_STRATEGIES}, got {strategy!r}")
    counts = allocate(h.sizes(h.depth), target)
    for level in range(h.depth - 1, 0, -1):  # share each cluster's count among its children
        sizes = h.sizes(level)
        children, starts = members_by_cluster(h.labels[level], len(counts))
        child = np.zeros(len(sizes), dtype=np.int64)
        for parent in np.nonzero(counts)[0]:
            members = children[starts[parent] : starts[parent + 1]]
            child[members] = allocate(sizes[members], counts[parent])
        counts = child
    return _draw_points(h, counts, seed, strategy)


def members_by_cluster(labels: np.ndarray, num_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids grouped by cluster, start offsets)``: cluster ``c``'s ids are ``ids[starts[c]:starts[c+1]]``."""
    clustered = np.nonzero(labels >= 0)[0]
    ids = clustered[np.argsort(labels[clustered], kind="stable")]
    starts = np.searchsorted(labels[ids], np.arange(num_clusters + 1))
    return ids, starts


def _draw_points(h: Hierarchy, counts: np.ndarray, seed: int, strategy: str) -> np.ndarray:
    ids, starts = members_by_cluster(h.labels[0], len(h.centroids[0]))
    rng = np.random.default_rng(seed)
    chosen = []
    for cluster in np.nonzero(counts)[0]:
        members = ids[starts[cluster] : starts[cluster + 1]]
        if strategy == "closest":
            members = members[np.argsort(-h.similarity[members], kind="stable")]
            chosen.append(members[: counts[cluster]])
        else:
            chosen.append(rng.choice(members, size=int(counts[cluster]), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)
