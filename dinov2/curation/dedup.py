"""Stage 2, deduplicate: near-duplicates inside the pool, and pool images that copy an evaluation set.

Inside the pool: every vector's ``k`` nearest neighbours; each pair at cosine similarity >=
``threshold`` is an edge; connected components of that graph are groups of copies, and each
group keeps its first image (lowest id, i.e. first in the pool's order).

With an approximate (IVF-PQ) index the searched similarities are biased low: a query's similarity
to a quantised vector lacks what the quantisation dropped (about 0.06 on average at PQ64 and dim
384, up to 0.14; docs/performance.md). Candidates are therefore kept down to ``threshold -
rerank_margin - shortfall``, where ``shortfall`` is the 99.9th percentile of what the index loses on
a vector's similarity to itself, measured on a sample; they are then re-scored exactly from the
stored vectors, and the threshold is applied to the exact similarities.

Against evaluation sets: each pool image whose nearest evaluation image has similarity >=
``eval_threshold`` is removed (test-set contamination), counted per evaluation set.

The DINOv2 paper ran both steps on copy-detection embeddings (k = 64; thresholds there are for
that model, so calibrate yours on a few planted copies).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from dinov2.curation.faiss_index import VectorIndex, build_index

logger = logging.getLogger("dinov2")


def quantisation_shortfall(store, index: VectorIndex, k: int, sample: int = 4096, seed: int = 0) -> float:
    """How far below the exact similarity the index scores a vector against itself (99.9th percentile
    over a seeded sample; 0 for an exact index). A vector whose own row is not among its ``k``
    results counts with its ``k``-th score, a bound on its shortfall."""
    if index.exact:
        return 0.0
    ids = store.sample_ids(sample, seed)
    vectors = store.read(ids)
    sims, found = index.search(vectors, min(k, len(index)))
    own = found == ids[:, None]
    approx = np.where(own.any(axis=1), np.where(own, sims, -np.inf).max(axis=1), sims[:, -1])
    shortfall = np.einsum("nd,nd->n", vectors, vectors) - approx
    return float(max(0.0, np.quantile(shortfall[np.isfinite(shortfall)], 0.999)))


def duplicate_pairs(store, index: VectorIndex, k: int, threshold: float, rerank_margin: float = 0.05, shortfall=None):
    """``(i, j, similarity)`` arrays of the pairs ``i < j`` found among each vector's ``k`` neighbours
    with similarity >= ``threshold`` (exact similarities: re-scored when the index is approximate;
    ``shortfall``: :func:`quantisation_shortfall`, measured when not given)."""
    if shortfall is None:
        shortfall = quantisation_shortfall(store, index, k + 1)
    floor = threshold if index.exact else threshold - rerank_margin - shortfall
    if not index.exact:
        logger.info("Approximate index %s: candidates from %.3f (shortfall %.3f) re-scored exactly",
                    index.spec, floor, shortfall)  # fmt: skip
    found_i, found_j, found_s = [], [], []
    for ids, vectors in store.iter_chunks():
        sims, neighbours = index.search(vectors, min(k + 1, len(index)))
        hit = (sims >= floor) & (neighbours >= 0) & (neighbours != ids[:, None])
        rows, cols = np.nonzero(hit)
        found_i.append(ids[rows])
        found_j.append(neighbours[rows, cols])
        found_s.append(sims[rows, cols])
    i, j = np.concatenate(found_i), np.concatenate(found_j)
    s = np.concatenate(found_s).astype(np.float32)
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    pairs, first = np.unique(np.stack([lo, hi], axis=1), axis=0, return_index=True)
    i, j, s = pairs[:, 0], pairs[:, 1], s[first]
    if not index.exact and len(i):
        s = _exact_similarities(store, i, j)
    keep = s >= threshold
    return i[keep], j[keep], s[keep]


def _exact_similarities(store, i: np.ndarray, j: np.ndarray, batch: int = 65536) -> np.ndarray:
    out = np.empty(len(i), dtype=np.float32)
    for start in range(0, len(i), batch):
        a, b = store.read(i[start : start + batch]), store.read(j[start : start + batch])
        out[start : start + batch] = np.einsum("nd,nd->n", a, b)
    return out


def duplicate_groups(num_vectors: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label of every vector in the graph with edges ``(i, j)`` (scipy's connected components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(num_vectors, num_vectors))
    _, labels = connected_components(graph, directed=False)
    return labels


def first_of_each_group(labels: np.ndarray) -> np.ndarray:
    """Boolean mask keeping the lowest id of every component."""
    _, first = np.unique(labels, return_index=True)
    keep = np.zeros(len(labels), dtype=bool)
    keep[first] = True
    return keep


def repeated_entries(store) -> np.ndarray:
    """Mask of the vector ids whose path an earlier id has (a file listed twice in the pool is one
    image: its later entries go, with or without deduplication). Paths are compared through 8-byte
    hashes, one per vector, and the rare equal hashes through the paths themselves."""
    hashes = np.fromiter((hash(p) for c in range(store.num_chunks) for p in store.chunk_paths(c)),
                         dtype=np.int64, count=len(store))  # fmt: skip
    order = np.argsort(hashes, kind="stable")
    equal = np.nonzero(hashes[order][1:] == hashes[order][:-1])[0]
    repeated = np.zeros(len(hashes), dtype=bool)
    candidates = np.unique(np.concatenate([order[equal], order[equal + 1]]))
    seen: set[str] = set()
    for i, path in zip(candidates, store.paths(candidates)):  # in id order: the first entry stays
        repeated[i] = path in seen
        seen.add(path)
    return repeated


def self_deduplicate(store, index_cfg, k: int, threshold: float, rerank_margin: float, seed: int = 0):
    """``(keep mask, report)`` for the near-duplicates inside ``store``."""
    index = build_index(store, index_cfg, seed=seed)
    shortfall = quantisation_shortfall(store, index, k + 1, seed=seed)
    i, j, sims = duplicate_pairs(store, index, k, threshold, rerank_margin, shortfall)
    labels = duplicate_groups(len(store), i, j)
    keep = first_of_each_group(labels)
    sizes = np.bincount(labels)
    report = {
        "index": index.spec,
        "k": int(k),
        "threshold": float(threshold),
        "candidates_from": float(threshold if index.exact else threshold - rerank_margin - shortfall),
        "pairs_above_threshold": int(len(i)),
        "groups_with_copies": int(np.count_nonzero(sizes > 1)),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "removed": int(len(keep) - np.count_nonzero(keep)),
    }
    return keep, report


def eval_contamination(
    store,
    eval_stores: Mapping[str, object],
    threshold: float,
    index_cfg,
    keep=None,
    rerank_margin: float = 0.05,
    k: int = 8,
):
    """``(removed mask, {name: count})``: pool vectors at similarity >= ``threshold`` to any image of
    an evaluation store (each is searched exactly or through ``index_cfg``'s choice for its size).
    Counts are of images not already removed by ``keep`` (an image is counted for the first set it copies).

    Through an approximate index each pool vector's ``k`` nearest evaluation images are candidates
    down to ``threshold - rerank_margin - shortfall`` and are re-scored exactly, as in
    :func:`duplicate_pairs`, so a copy is not missed because quantisation scored it low."""
    removed = np.zeros(len(store), dtype=bool)
    counts: dict[str, int] = {}
    for name, eval_store in eval_stores.items():
        index = build_index(eval_store, index_cfg)
        shortfall = quantisation_shortfall(eval_store, index, k)
        floor = threshold if index.exact else threshold - rerank_margin - shortfall
        hit = np.zeros(len(store), dtype=bool)
        for ids, vectors in store.iter_chunks(keep):
            sims, found = index.search(vectors, 1 if index.exact else min(k, len(index)))
            if not index.exact:
                sims = _rescore_candidates(eval_store, vectors, sims, found, floor)
            hit[ids[sims.max(axis=1) >= threshold]] = True
        counts[name] = int(np.count_nonzero(hit & ~removed))
        removed |= hit
        logger.info("%d pool images copy evaluation set %s (similarity >= %.2f)", counts[name], name, threshold)
    return removed, counts


def _rescore_candidates(
    eval_store, queries: np.ndarray, sims: np.ndarray, found: np.ndarray, floor: float
) -> np.ndarray:
    """Exact similarities of the searched candidates at or above ``floor`` (-inf for the others)."""
    exact = np.full(sims.shape, -np.inf, dtype=np.float32)
    rows, cols = np.nonzero((sims >= floor) & (found >= 0))
    if len(rows):
        exact[rows, cols] = np.einsum("nd,nd->n", queries[rows], eval_store.read(found[rows, cols]))
    return exact
