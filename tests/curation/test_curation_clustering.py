"""k-means recovers mixtures, the hierarchy is consistent, balanced sampling is balanced, retrieval is exact."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score
from test_curation_dedup import config, make_store_from

from dinov2.curation import clustering, retrieve
from dinov2.curation.faiss_index import build_index


def mixture(rng, centres: int, sizes, dim: int = 16, spread: float = 0.05):
    """Unit vectors around ``centres`` random unit directions, ``sizes[c]`` of them for centre ``c``."""
    means = rng.normal(size=(centres, dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    labels = np.repeat(np.arange(centres), sizes)
    x = means[labels] + spread * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels, means


def test_spherical_kmeans_recovers_the_components_of_a_mixture():
    rng = np.random.default_rng(0)
    x, truth, means = mixture(rng, 8, [150] * 8)
    centroids = clustering.spherical_kmeans(x, 8, niter=30, seed=0, nredo=5)  # one run can stop in a local optimum
    labels, sims = clustering.assign(x, centroids)
    assert adjusted_rand_score(truth, labels) == pytest.approx(1.0)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    matched = (centroids @ means.T).max(axis=0)  # each true mean has a centroid next to it
    assert matched.min() > 0.99
    np.testing.assert_allclose(sims, np.einsum("nd,nd->n", x, centroids[labels]), atol=1e-5)


def test_hierarchical_kmeans_streams_every_vector_into_a_consistent_hierarchy(tmp_path):
    rng = np.random.default_rng(1)
    x, truth, _ = mixture(rng, 12, [40] * 12)
    store, _ = make_store_from(tmp_path / "s", x, chunk_size=100)
    keep = np.ones(len(x), dtype=bool)
    keep[::7] = False  # removed by deduplication: not clustered
    cfg = config("clustering.levels=[12,4]", "clustering.max_train_points=300", "clustering.niter=25",
                 "clustering.resampling_steps=2", "clustering.resample_size=5", "clustering.nredo=5").clustering  # fmt: skip
    h = clustering.hierarchical_kmeans(store, keep, cfg)
    assert [len(c) for c in h.centroids] == [12, 4] and h.depth == 2
    assert (h.labels[0][~keep] == -1).all() and (h.labels[0][keep] >= 0).all()
    direct, _ = clustering.assign(x[keep], h.centroids[0])  # streamed chunk assignment = one-shot assignment
    np.testing.assert_array_equal(h.labels[0][keep], direct)
    assert adjusted_rand_score(truth[keep], h.labels[0][keep]) == pytest.approx(1.0)  # trained on 300 of 411
    parents, _ = clustering.assign(h.centroids[0], h.centroids[1])
    np.testing.assert_array_equal(h.labels[1], parents)
    assert h.sizes(1).sum() == h.sizes(2).sum() == keep.sum()
    h.save(tmp_path / "h")
    loaded = clustering.Hierarchy.load(tmp_path / "h")
    for a, b in zip(loaded.centroids + loaded.labels, h.centroids + h.labels):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("sizes,target", [([5, 100, 40, 1, 60], 100), ([3, 3, 3], 100), ([10, 20, 30], 31), ([7], 3)])
def test_allocate_is_the_most_balanced_share_that_fits(sizes, target):
    sizes = np.array(sizes)
    counts = clustering.allocate(sizes, target)
    assert counts.sum() == min(target, sizes.sum()) and (counts <= sizes).all() and (counts >= 0).all()
    unfilled = counts < sizes
    if unfilled.any():  # every cluster not given all it has gets the same share (up to one), at least any other's
        assert counts[unfilled].max() - counts[unfilled].min() <= 1
        assert counts[unfilled].min() >= counts[~unfilled].max(initial=0)
    best = (
        max(  # brute force: no other split of the target has a larger smallest unfilled share
            (c for c in np.ndindex(*(sizes + 1)) if sum(c) == counts.sum()),
            key=lambda c: sorted(min(ci, 10**9) for ci in c),
        )
        if sizes.prod() < 50000
        else None
    )
    if best is not None:
        assert sorted(counts.tolist()) == sorted(best)


def test_hierarchical_sampling_is_balanced_across_top_clusters_and_their_children(tmp_path):
    rng = np.random.default_rng(2)
    sizes = [400, 400, 200, 60, 30, 20, 10, 5]  # very unbalanced: 8 level-1 clusters of one mixture
    x, truth, _ = mixture(rng, 8, sizes, spread=0.02)
    store, _ = make_store_from(tmp_path / "s", x, chunk_size=256)
    cfg = config("clustering.levels=[8,2]", "clustering.niter=30", "clustering.nredo=5").clustering
    h = clustering.hierarchical_kmeans(store, None, cfg)
    selected = clustering.balanced_sample(h, 200, seed=0)
    assert len(selected) == len(np.unique(selected)) == 200
    top_of_point = h.labels[1][h.labels[0]]
    per_top = np.bincount(top_of_point[selected], minlength=2)
    expected_top = clustering.allocate(h.sizes(2), 200)
    np.testing.assert_array_equal(per_top, expected_top)
    for top in range(2):  # inside each top cluster the share is split evenly among its children
        children = np.nonzero(h.labels[1] == top)[0]
        got = np.bincount(h.labels[0][selected], minlength=8)[children]
        np.testing.assert_array_equal(got, clustering.allocate(h.sizes(1)[children], expected_top[top]))
    uniform = np.random.default_rng(0).choice(len(x), 200, replace=False)  # what balancing changes
    assert np.bincount(truth[selected], minlength=8).min() > np.bincount(truth[uniform], minlength=8).min()
    closest = clustering.balanced_sample(h, 200, seed=0, strategy="closest")
    for c in range(8):  # "closest": a cluster gives its members nearest the centroid
        members = np.nonzero(h.labels[0] == c)[0]
        taken = np.intersect1d(members, closest)
        if 0 < len(taken) < len(members):
            assert h.similarity[taken].min() >= h.similarity[np.setdiff1d(members, taken)].max()


def test_nearest_neighbour_retrieval_equals_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    pool, _, _ = mixture(rng, 10, [50] * 10, spread=0.3)
    seeds, _, _ = mixture(rng, 3, [4] * 3, spread=0.3)
    store, _ = make_store_from(tmp_path / "pool", pool)
    seed_store, _ = make_store_from(tmp_path / "seeds", seeds, chunk_size=5)
    keep = np.ones(len(pool), dtype=bool)
    keep[rng.choice(len(pool), 100, replace=False)] = False  # duplicates are never retrieved
    index = build_index(store, config().index, keep=keep)
    got = retrieve.nearest_neighbours(index, seed_store, per_seed=4)
    sims = seeds @ pool.T
    sims[:, ~keep] = -np.inf
    expected = np.unique(np.argsort(-sims, axis=1)[:, :4])
    np.testing.assert_array_equal(got, expected)


def test_cluster_retrieval_draws_from_each_seeds_cluster(tmp_path):
    rng = np.random.default_rng(4)
    x, truth, means = mixture(rng, 6, [80] * 6, spread=0.03)
    store, _ = make_store_from(tmp_path / "pool", x)
    seeds = np.concatenate([means[[1]], means[[1]], means[[4]]]).astype(np.float32)  # two seeds in one cluster
    seed_store, _ = make_store_from(tmp_path / "seeds", seeds)
    h = clustering.hierarchical_kmeans(
        store, None, config("clustering.levels=[6]", "clustering.niter=30", "clustering.nredo=5").clustering
    )
    got = retrieve.from_seed_clusters(h, seed_store, per_seed=30, seed=0)
    assert len(got) == 60 + 30
    assert sorted(np.bincount(truth[got], minlength=6).tolist()) == [0, 0, 0, 0, 30, 60]
    assert set(truth[got]) == {1, 4}
    np.testing.assert_array_equal(got, retrieve.from_seed_clusters(h, seed_store, per_seed=30, seed=0))
    everything = retrieve.from_seed_clusters(h, seed_store, per_seed=1000, seed=0)
    assert len(everything) == 160  # a cluster gives at most what it has


def test_seed_set_entries_are_checked_by_name():
    with pytest.raises(ValueError, match=r"retrieval.seeds\[0\]: unknown key 'per_sed'"):
        retrieve.check_seed_sets([{"dataset": "d", "per_sed": 3}])
    with pytest.raises(ValueError, match=r"retrieval.seeds\[1\]: mode must be one of"):
        retrieve.check_seed_sets([{"dataset": "d"}, {"dataset": "e", "mode": "knn"}])
    with pytest.raises(ValueError, match=r"retrieval.seeds\[0\]: per_seed must be an integer >= 1, got 'four'"):
        retrieve.check_seed_sets([{"dataset": "d", "per_seed": "four"}])
    with pytest.raises(ValueError, match=r"per_seed must be an integer >= 1, got 2.5"):
        retrieve.check_seed_sets([{"dataset": "d", "per_seed": 2.5}])  # not silently 2
    with pytest.raises(ValueError, match=r"retrieval.seeds\[0\]: name '..' .*names a folder"):
        retrieve.check_seed_sets([{"dataset": "d", "name": ".."}])  # embeddings/seeds/.. is embeddings/
    checked = retrieve.check_seed_sets([{"dataset": "d"}, {"dataset": "e", "mode": "cluster"}])
    assert [(c["mode"], c["per_seed"]) for c in checked] == [("nn", 4), ("cluster", 10000)]


def test_too_few_vectors_for_level_one_say_what_to_change(tmp_path):
    rng = np.random.default_rng(2)
    x, _, _ = mixture(rng, 2, [10, 10])
    store, _ = make_store_from(tmp_path / "s", x, chunk_size=32)
    cfg = config("clustering.levels=[8]", "clustering.max_train_points=5").clustering
    with pytest.raises(ValueError, match="trained on 5 vectors.*raise clustering.max_train_points"):
        clustering.hierarchical_kmeans(store, np.ones(len(x), dtype=bool), cfg)
    keep = np.zeros(len(x), dtype=bool)
    keep[:3] = True
    with pytest.raises(ValueError, match="3 left after deduplication.*use fewer level-1 clusters"):
        clustering.hierarchical_kmeans(store, keep, cfg)
    with pytest.raises(ValueError, match="deduplication kept none of the 20 embedded images.*dedup.threshold"):
        clustering.hierarchical_kmeans(store, np.zeros(len(x), dtype=bool), cfg)
