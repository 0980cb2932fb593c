"""Deduplication: planted copies found, distinct images never merged, approximate index re-scored, eval sets."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from curation_images import COPY_KINDS, write_pool
from test_curation_store_embed import make_store

from dinov2.curation import dedup
from dinov2.curation.embed import embed_images
from dinov2.curation.faiss_index import factory_string
from dinov2.curation.pipeline import load_curation_config


def config(*overrides):
    return load_curation_config(None, ["pool=x", "embed.model.kind=thumbnail", *overrides])


def test_planted_copies_are_found_and_distinct_images_never_merged(tmp_path):
    planted = {3: COPY_KINDS, 10: ("jpeg", "cropped"), 25: ("resized",), 40: ("exact", "cropped")}
    groups = write_pool(tmp_path / "pool", 60, planted)
    cfg = config()
    store = embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg.embed.model, chunk_size=16)
    keep, report = dedup.self_deduplicate(store, cfg.index, k=8, threshold=0.8, rerank_margin=0.05)
    paths = store.paths()
    kept_groups = [groups[p] for p, k in zip(paths, keep) if k]
    assert sorted(kept_groups) == list(range(60))  # one image per picture: every copy removed, no original lost
    assert report["removed"] == sum(len(kinds) for kinds in planted.values())
    assert report["groups_with_copies"] == len(planted)
    for path, kept in zip(paths, keep):  # the representative is the first in the pool's order
        if groups[path] in planted:
            first = min(i for i, p in enumerate(paths) if groups[p] == groups[path])
            assert kept == (paths.index(path) == first)


def test_pairs_and_groups_match_a_brute_force_graph(tmp_path):
    rng = np.random.default_rng(1)
    store, vectors = make_store(tmp_path / "s", [40, 40, 20], dim=8)
    base = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for target, source in [(50, 90), (5, 50), (12, 13), (70, 71)]:  # a chain: 5-50-90 is one group
        base[target] = base[source] + 0.01 * rng.normal(size=8)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    store, _ = make_store_from(tmp_path / "t", base)
    cfg = config()
    i, j, sims = dedup.duplicate_pairs(store, dedup.build_index(store, cfg.index), k=10, threshold=0.95)
    brute = base @ base.T
    expected = {(a, b) for a, b in itertools.combinations(range(100), 2) if brute[a, b] >= 0.95}
    assert set(zip(i.tolist(), j.tolist())) == expected
    np.testing.assert_allclose(sims, brute[i, j], atol=1e-5)
    labels = dedup.duplicate_groups(100, i, j)
    assert labels[5] == labels[50] == labels[90] and labels[12] == labels[13] and labels[70] == labels[71]
    parent = list(range(100))  # an independent union-find over the brute-force pairs

    def root(a):
        while parent[a] != a:
            a = parent[a]
        return a

    for a, b in expected:
        parent[root(a)] = root(b)
    assert len(np.unique(labels)) == len({root(a) for a in range(100)}) <= 100 - 4
    for a, b in itertools.combinations(range(100), 2):
        assert (labels[a] == labels[b]) == (root(a) == root(b))


def make_store_from(directory: Path, vectors: np.ndarray, chunk_size: int = 32):
    from dinov2.curation.store import EmbeddingStore

    sources = [f"/v/{i}.png" for i in range(len(vectors))]
    info = {"source": "test", "embedder": {"kind": "test"}, "dtype": "float32"}
    store = EmbeddingStore.create(directory, sources, chunk_size, info)
    for c in range(store.num_chunks):
        part = slice(c * chunk_size, (c + 1) * chunk_size)
        store.write_chunk(c, vectors[part], sources[part], {})
    return EmbeddingStore(directory), vectors


def test_an_ivf_pq_index_finds_the_same_pairs_with_exact_similarities(tmp_path):
    rng = np.random.default_rng(2)
    base = rng.normal(size=(3000, 32))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    picked = rng.choice(3000, 120, replace=False)
    copies, sources = picked[:40], picked[40:80]  # near-copies (similarity ~0.99): above the threshold
    base[copies] = base[sources] + 0.02 * rng.normal(size=(40, 32))
    near, far = picked[80:100], picked[100:120]  # near misses (~0.85): candidates that re-scoring rejects
    base[near] = base[far] + 0.11 * rng.normal(size=(20, 32))
    base = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)
    store, _ = make_store_from(tmp_path / "s", base, chunk_size=1000)
    cfg = config("index.factory='IVF32,PQ16x4'", "index.train_size=3000", "index.nprobe=8")  # 4-bit PQ: fast to train
    index = dedup.build_index(store, cfg.index)
    assert index.spec == "IVF32,PQ16x4" and not index.exact
    i, j, sims = dedup.duplicate_pairs(store, index, k=10, threshold=0.9, rerank_margin=0.1)
    brute = base @ base.T
    expected = {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(brute >= 0.9, 1)))}
    found = set(zip(i.tolist(), j.tolist()))
    assert found == expected, (len(found), len(expected), sorted(expected - found)[:5], sorted(found - expected)[:5])
    np.testing.assert_allclose(sims, brute[i, j], atol=1e-5)  # re-scored exactly, not the PQ estimate


def test_pool_copies_of_evaluation_images_are_removed_and_counted(tmp_path):
    write_pool(tmp_path / "pool", 30)
    write_pool(tmp_path / "val_a", 3, first_seed=4)  # pictures 4, 5, 6 of the pool
    write_pool(tmp_path / "val_b", 2, first_seed=100, copies={0: ("cropped",)})  # nothing of the pool
    write_pool(tmp_path / "val_c", 2, first_seed=5)  # 5 (already counted for val_a) and 6
    cfg = config()
    model = cfg.embed.model
    pool = embed_images(str(tmp_path / "pool"), tmp_path / "e_pool", model)
    evals = {
        name: embed_images(str(tmp_path / name), tmp_path / f"e_{name}", model) for name in ("val_a", "val_b", "val_c")
    }
    removed, counts = dedup.eval_contamination(pool, evals, threshold=0.8, index_cfg=cfg.index)
    names = sorted(Path(p).name for p, r in zip(pool.paths(), removed) if r)
    assert names == ["img_0004.png", "img_0005.png", "img_0006.png"]
    assert counts == {"val_a": 3, "val_b": 0, "val_c": 0}


@pytest.mark.parametrize("n", [10, 10**5, 10**6, 10**7])
def test_automatic_index_choice(n):
    cfg = config().index
    spec = factory_string(n, 384, cfg)
    if n <= cfg.exact_max_size:
        assert spec == "Flat"
    else:
        assert spec.endswith("np")  # no polysemous training
        nlist, m = int(spec.split(",")[0][3:]), int(spec.split(",")[1][2:-2])
        assert 384 % m == 0 and 4 * m <= 384 and nlist & (nlist - 1) == 0  # m divides the dim; nlist a power of 2
        assert 39 * nlist <= cfg.train_size and nlist >= min(2 * np.sqrt(n), cfg.train_size / 78)


def test_gpu_setting_follows_what_faiss_sees(monkeypatch):
    import faiss

    from dinov2.curation.faiss_index import num_gpus

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    assert num_gpus("auto") == 0 and num_gpus(False) == 0
    with pytest.raises(RuntimeError, match="index.gpu is true, but faiss sees no GPU"):
        num_gpus(True)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 4)
    assert num_gpus("auto") == 4 and num_gpus(True) == 4 and num_gpus(False) == 0


def test_searching_past_the_index_size_returns_no_ids():
    from dinov2.curation.faiss_index import VectorIndex

    index = VectorIndex(4)
    vectors = np.eye(4, dtype=np.float32)[:3]
    index.add(vectors, np.array([10, 20, 30]))
    sims, ids = index.search(vectors[:1], 5)
    assert ids[0, 0] == 10 and set(ids[0, 1:3].tolist()) == {20, 30} and (ids[0, 3:] == -1).all()
    assert sims[0, 0] == pytest.approx(1.0) and np.isneginf(sims[0, 3:]).all()


def test_copies_just_above_the_threshold_survive_the_quantisation_bias(tmp_path):
    """PQ scores are biased low; the measured shortfall keeps copies at 0.90-0.93 among the candidates
    even with no margin of our own (threshold 0.9, rerank_margin 0)."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(4000, 64))
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    picked = rng.choice(4000, 200, replace=False)
    copies, sources = picked[:100], picked[100:]
    target = rng.uniform(0.905, 0.93, size=100)  # exact cosine of each planted pair
    noise = rng.normal(size=(100, 64))
    noise -= np.einsum("nd,nd->n", noise, base[sources])[:, None] * base[sources]  # orthogonal to the source
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    base[copies] = target[:, None] * base[sources] + np.sqrt(1 - target[:, None] ** 2) * noise
    store, _ = make_store_from(tmp_path / "s", base.astype(np.float32), chunk_size=1000)
    cfg = config("index.factory='IVF16,PQ16x4np'", "index.train_size=4000", "index.nprobe=16")
    index = dedup.build_index(store, cfg.index)
    shortfall = dedup.quantisation_shortfall(store, index, 11)
    assert shortfall > 0.02  # 4-bit codes lose a lot: without it the floor would sit inside the copies' range
    i, j, _ = dedup.duplicate_pairs(store, index, k=10, threshold=0.9, rerank_margin=0.0, shortfall=shortfall)
    exact = store.read(np.arange(4000)) @ store.read(np.arange(4000)).T
    expected = {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(exact >= 0.9, 1)))}
    assert len(expected) >= 100 and set(zip(i.tolist(), j.tolist())) == expected


def test_copies_of_a_large_evaluation_set_are_found_through_an_approximate_index(tmp_path):
    """An evaluation store searched through IVF-PQ: copies at 0.905-0.93 (threshold 0.9) are scored low
    by the quantisation; re-scoring the candidates exactly finds exactly the brute-force set."""
    rng = np.random.default_rng(7)
    evals = rng.normal(size=(4000, 64))
    evals /= np.linalg.norm(evals, axis=1, keepdims=True)
    pool = rng.normal(size=(300, 64))
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    sources = rng.choice(4000, 100, replace=False)
    target = rng.uniform(0.905, 0.93, size=100)  # exact cosine of each planted copy to its source
    noise = rng.normal(size=(100, 64))
    noise -= np.einsum("nd,nd->n", noise, evals[sources])[:, None] * evals[sources]
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    pool[:100] = target[:, None] * evals[sources] + np.sqrt(1 - target[:, None] ** 2) * noise
    pool_store, _ = make_store_from(tmp_path / "pool", pool.astype(np.float32), chunk_size=100)
    eval_store, _ = make_store_from(tmp_path / "eval", evals.astype(np.float32), chunk_size=1000)
    cfg = config("index.factory='IVF16,PQ16x4np'", "index.train_size=4000", "index.nprobe=16")
    assert not dedup.build_index(eval_store, cfg.index).exact
    removed, counts = dedup.eval_contamination(pool_store, {"val": eval_store}, 0.9, cfg.index, rerank_margin=0.0)
    exact = pool_store.read(np.arange(300)) @ eval_store.read(np.arange(4000)).T
    expected = exact.max(axis=1) >= 0.9
    assert expected[:100].all() and counts == {"val": int(expected.sum())}
    np.testing.assert_array_equal(removed, expected)


def test_an_index_factory_too_big_for_a_small_store_gives_way_to_the_automatic_choice(tmp_path):
    """index.factory sized for the pool also reaches the evaluation sets' indexes; faiss cannot train
    IVF<n> on fewer than n vectors nor an 8-bit PQ on fewer than 256."""
    cfg = config("index.factory='IVF64,PQ4x4np'", "index.train_size=5000").index
    assert factory_string(10_000, 16, cfg) == "IVF64,PQ4x4np"
    assert factory_string(40, 16, cfg) == "Flat"  # fewer vectors than IVF lists
    assert factory_string(200, 16, config("index.factory='PQ4'").index) == "Flat"  # fewer than 256 PQ codes
    with pytest.raises(ValueError, match=r"'PQ4' needs at least 256 training vectors, but index.train_size is 100"):
        factory_string(10_000, 16, config("index.factory='PQ4'", "index.train_size=100").index)
    rng = np.random.default_rng(3)
    evals = rng.normal(size=(40, 16))
    pool = rng.normal(size=(200, 16))
    pool[:5] = evals[:5] + 0.02 * rng.normal(size=(5, 16))  # five near-copies of evaluation images
    evals, pool = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in (evals, pool))
    pool_store, _ = make_store_from(tmp_path / "pool", pool.astype(np.float32), chunk_size=64)
    eval_store, _ = make_store_from(tmp_path / "eval", evals.astype(np.float32))
    removed, counts = dedup.eval_contamination(pool_store, {"val": eval_store}, 0.9, cfg)
    expected = (pool @ evals.T).max(axis=1) >= 0.9
    assert expected[:5].all() and counts == {"val": int(expected.sum())}
    np.testing.assert_array_equal(removed, expected)


def test_uniform_images_are_unit_vectors_and_copies_of_each_other_only(tmp_path):
    """Blank pictures are the commonest copies of a crawl; with their channel means removed a
    thumbnail has nothing left, and a zero vector is similar to nothing (not even itself)."""
    from PIL import Image

    write_pool(tmp_path / "pool", 6)
    for name, colour in [("white.png", (255, 255, 255)), ("black.png", (0, 0, 0)), ("red.png", (200, 10, 10))]:
        Image.new("RGB", (48, 40), colour).save(tmp_path / "pool" / name)
    Image.new("RGB", (48, 40), (255, 255, 255)).save(tmp_path / "pool" / "white_copy.jpg", quality=60)
    cfg = config()
    store = embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg.embed.model, chunk_size=4)
    vectors = store.read(np.arange(len(store)))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
    names = [Path(p).name for p in store.paths()]
    blank = np.array([not n.startswith("img_") for n in names])
    sims = vectors @ vectors.T
    assert (sims[np.ix_(blank, blank)] > 0.99).all() and (np.abs(sims[np.ix_(blank, ~blank)]) < 1e-3).all()
    keep, report = dedup.self_deduplicate(store, cfg.index, k=8, threshold=0.8, rerank_margin=0.05)
    assert sorted(n for n, k in zip(names, keep) if k) == ["black.png", *(f"img_{i:04d}.png" for i in range(6))]
    assert report["removed"] == 3
