"""Stage 4, retrieve: pool images for curated seed sets, or balanced sampling without seeds.

Each seed set (embedded with the pool's embedder) selects pool images in one of two ways, as in
the DINOv2 paper's retrieval step:

* ``mode: nn`` (large seed sets): the ``per_seed`` nearest deduplicated pool images of every seed
  image (the paper used 4);
* ``mode: cluster`` (small seed sets): ``per_seed`` pool images drawn from the level-1 cluster of
  each seed image (the paper used 10,000). Seeds that fall in the same cluster draw from one seeded
  permutation of it, so a cluster gives at most ``per_seed`` x (its seeds) distinct images.

``balanced_size`` images from the hierarchy (:func:`~dinov2.curation.clustering.balanced_sample`)
can be added to the seeds' retrievals, or stand alone when there are no seeds. The curated set is
the union, each image once.
"""

from __future__ import annotations

import logging

import numpy as np

from dinov2.curation.clustering import Hierarchy, assign, centroid_index, members_by_cluster
from dinov2.curation.faiss_index import VectorIndex

logger = logging.getLogger("dinov2")

MODES = ("nn", "cluster")


def nearest_neighbours(index: VectorIndex, seed_store, per_seed: int) -> np.ndarray:
    """Sorted unique ids of the ``per_seed`` nearest indexed vectors of every seed vector."""
    found = []
    for _, vectors in seed_store.iter_chunks():
        _, ids = index.search(vectors, per_seed)
        found.append(ids[ids >= 0])
    return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


def from_seed_clusters(h: Hierarchy, seed_store, per_seed: int, seed: int = 0) -> np.ndarray:
    """Sorted ids: from each seed's nearest level-1 cluster, ``per_seed`` members per seed in it."""
    seeds_in = np.zeros(len(h.centroids[0]), dtype=np.int64)
    level_one = centroid_index(h.centroids[0])
    for _, vectors in seed_store.iter_chunks():
        labels, _ = assign(vectors, level_one)
        seeds_in += np.bincount(labels, minlength=len(seeds_in))
    ids, starts = members_by_cluster(h.labels[0], len(h.centroids[0]))
    chosen = []
    for cluster in np.nonzero(seeds_in)[0]:
        members = ids[starts[cluster] : starts[cluster + 1]]
        rng = np.random.default_rng([seed, int(cluster)])
        chosen.append(rng.permutation(members)[: per_seed * int(seeds_in[cluster])])
    return np.unique(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def check_seed_sets(seed_sets) -> list[dict]:
    """Validate ``retrieval.seeds`` entries (``{name, dataset, mode, per_seed}``); errors name the entry and key."""
    allowed = {"name", "dataset", "mode", "per_seed"}
    checked, names = [], set()
    for number, entry in enumerate(seed_sets):
        entry = dict(entry)
        where = f"retrieval.seeds[{number}]"
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(allowed))}")
        if not entry.get("dataset"):
            raise ValueError(f"{where}: 'dataset' is required (a folder, a list file or a dataset string)")
        mode = entry.get("mode", "nn")
        if mode not in MODES:
            raise ValueError(f"{where}: mode must be one of {MODES}, got {mode!r}")
        per_seed = entry.get("per_seed", 4 if mode == "nn" else 10000)
        if isinstance(per_seed, bool) or not isinstance(per_seed, int) or per_seed < 1:
            raise ValueError(f"{where}: per_seed must be an integer >= 1, got {per_seed!r}")
        name = str(entry.get("name") or f"seeds{number}")
        if name in names or "/" in name or name in (".", ".."):
            raise ValueError(f"{where}: name {name!r} is repeated, contains '/' or is '.' or '..' (it names a folder)")
        names.add(name)
        checked.append({"name": name, "dataset": str(entry["dataset"]), "mode": mode, "per_seed": per_seed})
    return checked
