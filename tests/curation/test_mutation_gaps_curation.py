"""Curation behaviour a mutation audit found untested: threshold boundaries, the self match in the
neighbour search, contamination counts after deduplication, resampling sizes, upper hierarchy levels,
the remainder of an allocation, padded search results, the PQ size, mean-patch pooling, and which
embed settings invalidate the stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_curation_dedup import config, make_store_from
from test_curation_store_embed import micro_model_cfg

from dinov2.curation import clustering, dedup, retrieve
from dinov2.curation.faiss_index import VectorIndex, factory_string
from dinov2.curation.pipeline import stage_settings


def _unit(*rows) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_a_pair_exactly_at_the_threshold_is_a_copy(tmp_path):
    # cos = 0.5 exactly in float32: "similarity >= threshold" makes it an edge
    vectors = np.array([[1, 0, 0, 0], [0.5, np.sqrt(0.75), 0, 0], [0, 0, 1, 0]], dtype=np.float32)
    store, _ = make_store_from(tmp_path / "s", vectors)
    index = dedup.build_index(store, config().index)
    assert index.exact
    i, j, sims = dedup.duplicate_pairs(store, index, k=2, threshold=0.5)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1)] and sims.tolist() == [0.5]


def test_with_k_equal_to_one_the_one_neighbour_searched_is_not_the_image_itself(tmp_path):
    base = _unit([1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0])
    copy = _unit(base[0] + 0.1 * np.array([0, 0, 0, 1], dtype=np.float32))  # cos ~0.995 to image 0
    store, _ = make_store_from(tmp_path / "s", np.concatenate([base, copy]))
    keep, report = dedup.self_deduplicate(store, config().index, k=1, threshold=0.9, rerank_margin=0.05)
    assert keep.tolist() == [True, True, True, False] and report["removed"] == 1


def test_a_pool_image_exactly_at_the_eval_threshold_is_removed(tmp_path):
    pool, _ = make_store_from(tmp_path / "pool", _unit([1, 0, 0, 0], [0, 0, 1, 0]))
    val, _ = make_store_from(tmp_path / "val", np.array([[0.5, np.sqrt(0.75), 0, 0]], dtype=np.float32))
    removed, counts = dedup.eval_contamination(pool, {"val": val}, 0.5, config().index)
    assert removed.tolist() == [True, False] and counts == {"val": 1}


def test_contamination_counts_leave_out_images_deduplication_already_removed(tmp_path):
    # pool 0 and 1 both copy the evaluation image; 1 is a copy of 0 that deduplication removed
    original = _unit([1, 0, 0, 0])[0]
    near = _unit(original + 0.05 * np.array([0, 1, 0, 0], dtype=np.float32))[0]
    pool, _ = make_store_from(tmp_path / "pool", np.stack([original, near, _unit([0, 0, 1, 0])[0]]))
    val, _ = make_store_from(tmp_path / "val", near[None])
    keep = np.array([True, False, True])
    removed, counts = dedup.eval_contamination(pool, {"val": val}, 0.9, config().index, keep=keep)
    assert counts == {"val": 1}
    assert removed[0] and not removed[2]


def test_resampling_keeps_exactly_the_size_nearest_rows_of_each_centroid():
    rng = np.random.default_rng(0)
    x = _unit(*rng.normal(size=(80, 8)))
    centroids = _unit(*rng.normal(size=(4, 8)))
    size = 5
    sims = x @ centroids.T
    labels = sims.argmax(axis=1)
    expected = []
    for c in range(4):  # brute force: the `size` rows most similar to their own centroid
        members = np.nonzero(labels == c)[0]
        expected += members[np.argsort(-sims[members, c])][:size].tolist()
    got = clustering._resampled(x, centroids, size)
    np.testing.assert_array_equal(got, x[np.sort(expected)])
    assert len(got) == sum(min(size, int(np.count_nonzero(labels == c))) for c in range(4))


def test_an_upper_level_clusters_the_level_below_s_centroids_not_the_vectors(tmp_path):
    # 4 far-apart groups, each of 3 sub-blobs of very unequal sizes: a level-2 centroid is the
    # (normalised) mean of its level-1 centroids, each weighing the same, not of the vectors under them
    rng = np.random.default_rng(3)
    rows = []
    for group in range(4):
        for blob, count in enumerate((300, 20, 20)):
            centre = np.zeros(16, dtype=np.float32)
            centre[group] = 1.0
            centre[4 + 3 * group + blob] = 0.6
            rows.append(centre + 0.01 * rng.normal(size=(count, 16)).astype(np.float32))
    vectors = _unit(*np.concatenate(rows))
    store, _ = make_store_from(tmp_path / "s", vectors, chunk_size=256)
    cfg = config("clustering.levels=[12,4]", "clustering.resampling_steps=0").clustering
    h = clustering.hierarchical_kmeans(store, None, cfg)
    level_one, level_two, parents = h.centroids[0], h.centroids[1], h.labels[1]
    for c in range(4):
        below = level_one[parents == c]
        assert len(below)
        of_centroids = below.sum(axis=0) / np.linalg.norm(below.sum(axis=0))
        np.testing.assert_allclose(level_two[c], of_centroids, atol=1e-3)
        points = vectors[np.isin(h.labels[0], np.nonzero(parents == c)[0])]
        of_points = points.sum(axis=0) / np.linalg.norm(points.sum(axis=0))
        assert np.linalg.norm(of_points - of_centroids) > 0.05  # the two readings differ on this data


def test_the_remainder_of_an_equal_share_goes_to_the_larger_clusters():
    # sizes 3, 10, 20 and a target of 16: the small cluster gives its 3, the other two share 13 as
    # 6 and 7, the extra one to the larger cluster (worked by hand from the docstring)
    assert clustering.allocate(np.array([3, 10, 20]), 16).tolist() == [3, 6, 7]
    assert clustering.allocate(np.array([20, 10, 3]), 16).tolist() == [7, 6, 3]
    assert clustering.allocate(np.array([9, 8, 7, 6]), 10).tolist() == [3, 3, 2, 2]


def test_nearest_neighbours_past_the_index_size_gives_only_real_ids(tmp_path):
    index = VectorIndex(4)
    index.add(np.eye(4, dtype=np.float32)[:3], np.array([10, 20, 30]))
    seeds, _ = make_store_from(tmp_path / "seeds", _unit([1, 0.1, 0, 0], [0, 0, 1, 0.1]))
    assert retrieve.nearest_neighbours(index, seeds, per_seed=5).tolist() == [10, 20, 30]


@pytest.mark.parametrize("dim", [384, 768, 1024, 1536, 96, 40, 6])
def test_the_automatic_pq_takes_the_most_bytes_that_divide_the_dim(dim):
    allowed = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)  # the docstring's list, largest first
    expected = max(b for b in allowed if dim % b == 0 and 4 * b <= dim) if dim >= 4 else 1
    spec = factory_string(2_000_000, dim, config().index)
    assert spec.split(",")[1] == f"PQ{expected}np"


def test_avgpool_embeds_the_mean_patch_token_and_cls_avgpool_both():
    from omegaconf import OmegaConf

    from dinov2.curation.embed import BackboneEmbedder

    images = torch.randn(3, 3, 32, 32)
    out = {}
    for pooling in ("cls", "avgpool", "cls_avgpool"):
        cfg = micro_model_cfg()
        OmegaConf.update(cfg, "pooling", pooling)
        embedder = BackboneEmbedder(cfg, device="cpu")  # seeded: the same random-init weights each time
        out[pooling] = embedder(images)
    with torch.no_grad():
        features = embedder.model.forward_features(images)
    cls = F.normalize(features["x_norm_clstoken"], dim=1)
    mean_patch = F.normalize(features["x_norm_patchtokens"].mean(dim=1), dim=1)
    torch.testing.assert_close(out["cls"], cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["avgpool"], mean_patch, atol=1e-5, rtol=1e-5)
    both = out["cls_avgpool"]
    assert both.shape == (3, 2 * cls.shape[1])
    halves = F.normalize(both[:, : cls.shape[1]], dim=1), F.normalize(both[:, cls.shape[1] :], dim=1)
    torch.testing.assert_close(halves[0], cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(halves[1], mean_patch, atol=1e-5, rtol=1e-5)


def test_the_storage_dtype_is_part_of_the_embed_fingerprint_and_loader_settings_are_not():
    base = stage_settings(config(), "embed")
    assert stage_settings(config("embed.dtype=float32"), "embed") != base
    assert stage_settings(config("embed.model.pooling=avgpool"), "embed") != base
    for neutral in ("embed.batch_size=7", "embed.num_workers=1", "embed.device=cpu"):
        assert stage_settings(config(neutral), "embed") == base, neutral
