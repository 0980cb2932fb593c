"""Regression tests from an audit of the curation pipeline: resampling k-means, pool ids through a
second (copy-detection) store, and the edges of clustering and balanced sampling."""

from __future__ import annotations

import numpy as np
import pytest
from curation_images import write_pool
from test_curation_dedup import config, make_store_from

from dinov2.curation import clustering
from dinov2.curation.__main__ import main


def _skewed_mixture(seed: int, dim: int = 8):
    """One dense component of 4,000 unit vectors and nine sparse ones of 40."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(10, dim))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    labels = np.repeat(np.arange(10), [4000] + [40] * 9)
    x = means[labels] + 0.15 * rng.normal(size=(len(labels), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), means


@pytest.mark.parametrize("seed", [0, 1])
def test_resampling_steps_move_centroids_out_of_the_dense_region(seed):
    """Vo et al.'s resampling: k-means on the r vectors nearest each centroid spreads the centroids
    over the components; without it most of them sit in the dense one."""
    x, means = _skewed_mixture(seed)

    def centroids_per_component(steps):
        cfg = config("clustering.niter=20", f"clustering.resampling_steps={steps}", "clustering.resample_size=10")
        centroids = clustering.kmeans_level(x, 20, cfg.clustering, seed=0, gpus=0)
        nearest_mean = np.argmax(centroids @ means.T, axis=1)  # independent of the code's own labels
        return np.bincount(nearest_mean, minlength=10)

    plain = centroids_per_component(0)
    assert plain[0] >= 10  # the setting is skewed: plain k-means crowds the dense component
    resampled = centroids_per_component(10)
    assert resampled[0] <= 5, resampled
    assert np.count_nonzero(resampled[1:]) >= 8, resampled  # the sparse components get centroids


def test_resampling_with_too_few_vectors_stops_instead_of_failing():
    """Repeated vectors leave clusters empty; the resampled set is then smaller than k."""
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(6, 8))
    distinct /= np.linalg.norm(distinct, axis=1, keepdims=True)
    x = np.repeat(distinct, 20, axis=0).astype(np.float32)  # 6 distinct vectors, 8 clusters
    cfg = config("clustering.resampling_steps=2", "clustering.resample_size=1").clustering
    centroids = clustering.kmeans_level(x, 8, cfg, seed=0, gpus=0)
    assert centroids.shape == (8, 8)
    with pytest.raises(ValueError, match="clustering.resample_size must be an integer >= 1"):
        clustering.kmeans_level(x, 8, config("clustering.resampling_steps=1", "clustering.resample_size=0").clustering,
                                seed=0, gpus=0)  # fmt: skip


def test_hierarchical_kmeans_and_sampling_are_deterministic_given_a_seed(tmp_path):
    x, _ = _skewed_mixture(3)
    store, _ = make_store_from(tmp_path / "s", x[::4], chunk_size=300)
    cfg = config("clustering.levels=[12,3]", "clustering.resampling_steps=2", "clustering.resample_size=5").clustering
    a = clustering.hierarchical_kmeans(store, None, cfg)
    b = clustering.hierarchical_kmeans(store, None, cfg)
    for x_a, x_b in zip(a.centroids + a.labels, b.centroids + b.labels):
        np.testing.assert_array_equal(x_a, x_b)
    np.testing.assert_array_equal(
        clustering.balanced_sample(a, 100, seed=1), clustering.balanced_sample(b, 100, seed=1)
    )


def test_a_pool_image_listed_twice_keeps_one_entry_with_a_separate_copy_detection_store(tmp_path):
    """Copies are found in embeddings/copy and carried to the pool's ids: the second listing of a file
    is a copy of the first, and exactly one of the two must stay (as without copy_detection)."""
    groups = write_pool(tmp_path / "pool", 6)
    paths = sorted(groups)
    listing = tmp_path / "pool.txt"
    listing.write_text("".join(p + "\n" for p in [*paths, paths[2]]))  # img_0002 listed twice
    common = [f"pool={listing}", "embed.model.kind=thumbnail", "embed.model.thumbnail_size=8", "embed.num_workers=0",
              "dedup.threshold=0.8", "dedup.k=4"]  # fmt: skip
    for name, extra in (("plain", []), ("copy", ["dedup.copy_detection={kind: thumbnail, thumbnail_size: 16}"])):
        out = tmp_path / name
        main(["embed", "--output-dir", str(out), *common, *extra])
        main(["dedup", "--output-dir", str(out), *common, *extra])
        keep = np.load(out / "dedup" / "keep.npy")
        assert keep.tolist() == [True] * 6 + [False], (name, keep)  # the first listing stays


def test_nprobe_reaches_every_replica_of_an_index_on_several_gpus(monkeypatch):
    """faiss puts an index on several GPUs as an IndexReplicas of per-GPU copies, each copied from the
    CPU index (nprobe included); the replicas object has no nprobe of its own. Simulated on the CPU
    with replicas of CPU clones, which is what index_cpu_to_all_gpus builds, device aside."""
    import faiss

    from dinov2.curation.faiss_index import VectorIndex

    copies = []
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", CloneOptions, raising=False)  # faiss-gpu only

    def to_all_gpus(index, co, ngpu):
        replicas = faiss.IndexReplicas(index.d)
        for _ in range(ngpu):
            copies.append(faiss.clone_index(index))  # kept alive here: the replicas do not own them
            replicas.addIndex(copies[-1])
        return replicas

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_all_gpus)
    index = VectorIndex(16, "IVF8,PQ4np", gpus=2, nprobe=5)
    assert len(copies) == 2 and [faiss.extract_index_ivf(c).nprobe for c in copies] == [5, 5]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index.train(x)
    index.add(x, np.arange(800) + 1000)
    _, ids = index.search(x[:3], 1)
    assert ids.shape == (3, 1) and (ids >= 1000).all()


class CloneOptions:
    """faiss-gpu's GpuMultipleClonerOptions, as far as the curation indexes set it."""

    useFloat16 = False


@pytest.mark.parametrize(
    "spec, half", [("Flat", False), ("IVF8,PQ4np", True), ("PQ4", True), ("OPQ4,IVF8,Flat", False)]
)
def test_a_pq_index_goes_to_the_gpus_with_float16_lookup_tables_and_a_flat_one_stays_float32(monkeypatch, spec, half):
    """faiss-gpu refuses IVF-PQ with 64 8-bit sub-quantisers (the automatic PQ64) when its lookup
    tables are float32: 64 KiB of shared memory, above a block's 48 KiB. Flat storage stays exact."""
    import faiss

    from dinov2.curation.faiss_index import VectorIndex

    passed = []
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", CloneOptions, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", lambda index, co, ngpu: passed.append(co) or index)
    VectorIndex(16, spec, gpus=1)
    assert len(passed) == 1 and passed[0].useFloat16 is half


def test_a_missing_pool_path_is_named_as_missing(tmp_path):
    from dinov2.curation.embed import list_images

    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(FileNotFoundError, match=r"no_such_folder' is neither an existing folder or list file"):
        list_images(missing)
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        main(["run", "--output-dir", str(tmp_path / "out"), f"pool={missing}", "embed.model.kind=thumbnail"])
    with pytest.raises(ValueError, match="Synthetic, which has no image files"):  # dataset strings still parse
        list_images("Synthetic:split=TRAIN:num_images=4")


def test_more_level_one_clusters_than_vectors_names_the_setting(tmp_path):
    x, _ = _skewed_mixture(0)
    store, _ = make_store_from(tmp_path / "s", x[:50], chunk_size=50)
    keep = np.arange(50) < 30
    with pytest.raises(ValueError, match=r"clustering.levels\[0\] = 40 clusters.*30 vectors \(30 left after"):
        clustering.hierarchical_kmeans(store, keep, config("clustering.levels=[40]").clustering)


def _thumbnail_run(tmp_path, name: str, *extra: str) -> list[str]:
    return ["run", "--output-dir", str(tmp_path / name), "embed.model.kind=thumbnail", "embed.model.thumbnail_size=8",
            "embed.num_workers=0", "embed.chunk_size=4", "dedup.threshold=0.8", "dedup.k=4", "clustering.levels=[2]",
            *extra]  # fmt: skip


def test_a_file_listed_twice_is_curated_once_even_without_deduplication(tmp_path):
    """The same path twice in a pool list is one image: with dedup.enabled false too, the later
    entries leave at the dedup stage, and curated.txt names each file once."""
    paths = sorted(write_pool(tmp_path / "pool", 6))
    listing = [paths[0], paths[3], paths[1], paths[3], paths[2], paths[0], paths[4], paths[5], paths[3]]
    (tmp_path / "pool.txt").write_text("".join(p + "\n" for p in listing))
    expected = [p not in listing[:n] for n, p in enumerate(listing)]  # first listing of each file
    for enabled in ("false", "true"):
        out = f"out_{enabled}"
        report = main(_thumbnail_run(tmp_path, out, f"pool={tmp_path / 'pool.txt'}", f"dedup.enabled={enabled}",
                                     "retrieval.balanced_size=100"))  # fmt: skip
        assert np.load(tmp_path / out / "dedup" / "keep.npy").tolist() == expected
        curated = (tmp_path / out / "curated.txt").read_text().splitlines()
        assert sorted(curated) == sorted(set(listing)) and report["sizes"]["curated"] == 6
        assert report["stages"]["dedup"]["repeated_paths"] == report["sizes"]["repeated_paths"] == 3


@pytest.mark.parametrize("role", ["seeds/mine", "eval/0", "pool"])
def test_a_source_of_which_no_image_can_be_read_stops_the_embed_stage_naming_it(tmp_path, role):
    """A seed set whose every image fails to load retrieved nothing and left an empty or smaller
    curated list without a word; an evaluation set or pool like that failed later, in the dedup stage."""
    from dinov2.curation.pipeline import StageError

    write_pool(tmp_path / "good", 6)
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"b{i}.png").write_bytes(b"not a png")
    source = {r: tmp_path / ("bad" if r == role else "good") for r in ("seeds/mine", "eval/0", "pool")}
    argv = _thumbnail_run(tmp_path, "out", f"pool={source['pool']}", f"dedup.eval_datasets=[{source['eval/0']}]",
                          f"retrieval.seeds=[{{name: mine, dataset: {source['seeds/mine']}}}]")  # fmt: skip
    with pytest.raises(StageError, match=rf"the {role} source '{tmp_path / 'bad'}': none of its 3 images could be "
                                         r"read \(b0.png: .*\); .*delete .*embeddings"):  # fmt: skip
        main(argv)
    assert not (tmp_path / "out" / "embed" / "done.json").exists()


def test_redoing_a_stage_before_the_one_stage_asked_for_is_refused_before_deleting_it(tmp_path, capsys):
    """`cluster --redo dedup` deleted the finished dedup stage (hours at web scale) and then failed:
    'cluster' needs 'dedup', which a single-stage command does not run."""
    write_pool(tmp_path / "pool", 5)
    args = _thumbnail_run(tmp_path, "out", f"pool={tmp_path / 'pool'}")[1:]
    main(["embed", *args])
    main(["dedup", *args])
    with pytest.raises(SystemExit):
        main(["cluster", *args, "--redo", "dedup"])
    assert "--redo dedup deletes stage 'dedup', which 'cluster' needs" in capsys.readouterr().err
    assert (tmp_path / "out" / "dedup" / "done.json").is_file()
    main(["dedup", *args, "--redo", "dedup"])  # redoing the stage run, or a later one, is fine
    main(["dedup", *args, "--redo", "retrieve"])
