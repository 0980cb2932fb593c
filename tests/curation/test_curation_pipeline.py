"""The whole pipeline from a config: stages, skipping, changed settings, the report, and training on its FileList."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from curation_images import write_pool
from test_curation_store_embed import MICRO_OPTS, _age

from dinov2.curation.__main__ import main
from dinov2.curation.pipeline import StageError
from dinov2.curation.store import EmbeddingStore, StoreError
from dinov2.data.datasets import FileList
from dinov2.utils.config import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))


def opts(tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"pool={tmp_path / 'pool'}",
        f"embed.model.opts=[{','.join(MICRO_OPTS)}]", "embed.model.config_file=''",
        "embed.model.resize_size=32", "embed.model.crop_size=32", "embed.num_workers=0", "embed.chunk_size=16",
        "dedup.copy_detection={kind: thumbnail}", "dedup.threshold=0.8", "dedup.k=8",
        f"dedup.eval_datasets=[{tmp_path / 'val'}]", "dedup.eval_threshold=0.8",
        "clustering.levels=[6,2]", "clustering.max_train_points=1000",
        f"retrieval.seeds=[{{name: mine, dataset: {tmp_path / 'seeds'}, mode: nn, per_seed: 2}}]",
        "retrieval.balanced_size=12", *extra,
    ]  # fmt: skip


@pytest.fixture
def images(tmp_path):
    pool = write_pool(tmp_path / "pool", 40, {2: ("jpeg", "cropped"), 7: ("resized",)})
    (tmp_path / "pool" / "broken.png").write_bytes(b"\x89PNG truncated")
    write_pool(tmp_path / "val", 2, first_seed=30)  # pictures 30 and 31 of the pool are evaluation images
    write_pool(tmp_path / "seeds", 3, first_seed=500)
    _age(tmp_path)  # a settled pool: times recorded right after its writing are unsure, and a rerun lists it again
    return pool


def test_the_pipeline_curates_a_file_list_that_trains(tmp_path, images):
    out = tmp_path / "out"
    report = main(["run", "--output-dir", str(out), *opts(tmp_path)])
    sizes = report["sizes"]
    assert sizes["listed"] == 44 and sizes["embedded"] == 43 and sizes["unreadable"] == 1
    assert sizes["removed_as_copies"] == 3 and sizes["removed_as_eval_copies"] == {str(tmp_path / "val"): 2}
    assert sizes["after_dedup"] == 38
    assert str(tmp_path / "pool" / "broken.png") in report["stages"]["embed"]["pool"]["unreadable_images"]
    curated = FileList(str(out / "curated.txt"))
    paths = [curated.get_image_path(i) for i in range(len(curated))]
    assert len(paths) == sizes["curated"] == len(set(paths)) >= 12
    groups = {p: g for p, g in images.items()}
    assert len({groups[p] for p in paths}) == len(paths)  # no two copies of one picture
    assert not {groups[p] for p in paths} & {30, 31}  # nothing that copies the evaluation set
    retrieved = report["stages"]["retrieve"]
    assert retrieved["seeds"]["mine"]["retrieved"] <= 6 and retrieved["balanced"]["sampled"] == 12
    assert json.loads((out / "report.json").read_text())["sizes"] == sizes

    from test_train_loop import TINY

    from dinov2.train.train import main as train_main

    overrides = [o for o in TINY if not o.startswith("train.dataset_path")]
    train_main(["--output-dir", str(tmp_path / "train"), *overrides, f"train.dataset_path=FileList:path={out / 'curated.txt'}",
                "train.stop_at_iteration=2"])  # fmt: skip
    lines = (tmp_path / "train" / "training_metrics.json").read_text().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_a_rerun_skips_finished_stages_and_changed_settings_are_named(tmp_path, images):
    out = tmp_path / "out"
    main(["run", "--output-dir", str(out), *opts(tmp_path)])
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "log.txt"}
    main(["run", "--output-dir", str(out), *opts(tmp_path)])
    after = {p: p.stat().st_mtime_ns for p in stamps}
    changed = sorted(str(p.relative_to(out)) for p in stamps if stamps[p] != after[p])
    assert changed == ["config.yaml", "report.json"]  # no stage ran again
    with pytest.raises(StageError, match=r"stage 'cluster' .*settings changed: clustering.levels.*--redo cluster"):
        main(["run", "--output-dir", str(out), *opts(tmp_path, "clustering.levels=[5]")])
    report = main(["run", "--output-dir", str(out), "--redo", "cluster", *opts(tmp_path, "clustering.levels=[5]")])
    assert report["stages"]["cluster"]["levels"][0]["clusters"] == 5
    assert (out / "embed" / "done.json").stat().st_mtime_ns == stamps[out / "embed" / "done.json"]
    assert (out / "dedup" / "keep.npy").stat().st_mtime_ns == stamps[out / "dedup" / "keep.npy"]
    main(["run", "--output-dir", str(tmp_path / "fresh"), *opts(tmp_path, "clustering.levels=[5]")])
    assert (out / "curated.txt").read_text() == (tmp_path / "fresh" / "curated.txt").read_text()


def test_single_stages_need_the_earlier_ones(tmp_path, images):
    out = tmp_path / "out"
    with pytest.raises(StageError, match="stage 'cluster' needs stage 'embed' first"):
        main(["cluster", "--output-dir", str(out), *opts(tmp_path)])
    main(["embed", "--output-dir", str(out), *opts(tmp_path)])
    assert (out / "embed" / "done.json").is_file() and not (out / "dedup").exists()
    main(["dedup", "--output-dir", str(out), *opts(tmp_path)])
    assert np.load(out / "dedup" / "keep.npy").sum() == 38


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'clustering.level'.*did you mean 'clustering.levels'"):
        main(["run", "--output-dir", str(tmp_path), "pool=x", "clustering.level=[3]"])
    with pytest.raises(ValueError, match="unknown key dedup.copy_detection.kin"):
        main(["run", "--output-dir", str(tmp_path), "pool=x", "dedup.copy_detection={kin: thumbnail}"])
    with pytest.raises(Exception, match="pool"):
        main(["run", "--output-dir", str(tmp_path)])  # the pool is required


BAD_VALUES = [  # (override, what the error says); each used to pass the config and fail late, or silently do nothing
    ("retrieval.sampling=far", "retrieval.sampling must be one of"),
    ("clustering.levels=[4,8]", "clustering.levels must be positive and non-increasing"),
    ("clustering.init=bogus", "clustering.init must be one of"),
    ("clustering.resampling_steps=2", None),  # valid: the default resample_size is 10
    ("embed.model.kind=foo", "embed.model.kind must be one of"),
    ("dedup.copy_detection={kind: backbone, pooling: max}", "dedup.copy_detection.pooling must be one of"),
    ("index.gpu=maybe", "index.gpu must be one of"),  # was taken for true
    ("dedup.k=0", "dedup.k must be an integer >= 1"),  # searched only each image itself: nothing removed
    ("dedup.eval_threshold=1.5", r"dedup.eval_threshold is a cosine similarity and must lie in \[-1, 1\]"),
    ("retrieval.balanced_size=-3", "retrieval.balanced_size must be an integer >= 1 or null"),
    ("index.nprobe=0", "index.nprobe must be an integer >= 1"),
    ("clustering.niter=2.5", "clustering.niter must be an integer >= 1"),
    ("--config=quickstart", "no value for embed.model.pretrained_weights"),  # was found by the embed stage
]


@pytest.mark.parametrize(("override", "message"), BAD_VALUES)
def test_bad_values_stop_the_run_before_anything_is_embedded(tmp_path, override, message):
    out = tmp_path / "out"
    args = ["run", "--output-dir", str(out), f"pool={tmp_path / 'missing'}", override]
    if message is None:  # the config is fine; the missing pool is what stops it, in the embed stage
        with pytest.raises(FileNotFoundError, match="missing"):
            main(args)
        return
    with pytest.raises(ValueError, match=message):
        main(args)
    assert not out.exists()


THUMBS = ["embed.model.kind=thumbnail", "embed.model.thumbnail_size=8", "embed.num_workers=0", "dedup.k=4",
          "dedup.threshold=0.8", "dedup.copy_detection={kind: thumbnail, thumbnail_size: 16}"]  # fmt: skip


def test_a_source_changed_after_the_embed_stage_is_named_and_a_touched_one_is_not(tmp_path):
    write_pool(tmp_path / "pool", 5)
    listing = tmp_path / "seeds.txt"
    listing.write_text("".join(f"{tmp_path / 'pool' / f'img_000{i}.png'}\n" for i in (0, 1)))
    args = ["embed", "--output-dir", str(tmp_path / "out"), f"pool={tmp_path / 'pool'}", *THUMBS,
            f"retrieval.seeds=[{{name: s, dataset: {listing}}}]"]  # fmt: skip
    main(args)
    chunk = tmp_path / "out" / "embeddings" / "pool" / "chunk_00000.npy"
    stamp = chunk.stat().st_mtime_ns
    time.sleep(0.05)  # past the file system's timestamp granularity
    (tmp_path / "pool" / "notes.txt").write_text("not an image")  # the folder's time moves, its image list not
    main(args)
    assert chunk.stat().st_mtime_ns == stamp
    write_pool(tmp_path / "extra", 1, first_seed=90)
    (tmp_path / "extra" / "img_0000.png").rename(tmp_path / "pool" / "new.png")
    with pytest.raises(StageError, match=r"pool source .* changed .*5 images when embedded and lists 6 now "
                                         r"\(1 new, 0 gone\).*--redo embed"):  # fmt: skip
        main(args)
    (tmp_path / "pool" / "new.png").unlink()
    main(args)  # back as embedded: accepted again
    time.sleep(0.05)
    listing.write_text(listing.read_text() + f"{tmp_path / 'pool' / 'img_0002.png'}\n")
    with pytest.raises(StageError, match=r"seeds/s source .* lists 3 now \(1 new, 0 gone\)") as info:
        main(args)
    assert "seeds/s and pass --redo retrieve" in str(info.value) and "pool's embeddings are kept" in str(info.value)
    import shutil

    shutil.rmtree(tmp_path / "out" / "embeddings" / "seeds" / "s")  # as the message says: that set alone
    main([*args, "--redo", "retrieve"])
    assert len(EmbeddingStore(tmp_path / "out" / "embeddings" / "seeds" / "s")) == 3
    assert chunk.stat().st_mtime_ns == stamp  # the pool was not embedded again


def test_turning_deduplication_on_after_the_embed_stage_embeds_only_the_new_stores(tmp_path):
    write_pool(tmp_path / "pool", 6, {1: ("jpeg",)})
    write_pool(tmp_path / "val", 1, first_seed=3)  # picture 3 of the pool
    args = ["--output-dir", str(tmp_path / "out"), f"pool={tmp_path / 'pool'}", *THUMBS,
            f"dedup.eval_datasets=[{tmp_path / 'val'}]"]  # fmt: skip
    main(["embed", *args, "dedup.enabled=false"])
    chunk = tmp_path / "out" / "embeddings" / "pool" / "chunk_00000.npy"
    stamp = chunk.stat().st_mtime_ns
    assert not (tmp_path / "out" / "embeddings" / "copy").exists()
    main(["embed", *args])  # the copy and evaluation stores are made, the pool's is kept
    main(["dedup", *args])
    assert chunk.stat().st_mtime_ns == stamp
    keep = np.load(tmp_path / "out" / "dedup" / "keep.npy")
    names = [Path(p).name for p in EmbeddingStore(tmp_path / "out" / "embeddings" / "pool").paths()]
    # the copy of picture 1 is first in pool order and stays; picture 3 copies the evaluation image
    assert sorted(n for n, k in zip(names, keep) if not k) == ["img_0001.png", "img_0003.png"]


def test_a_seed_set_added_after_the_embed_stage_embeds_that_set_alone(tmp_path):
    # The seed sets used to be part of the embed stage's fingerprint: adding one stopped the rerun, and
    # the way out (--redo embed) embedded the whole pool again, days at web scale.
    write_pool(tmp_path / "pool", 5)
    write_pool(tmp_path / "seeds", 2, first_seed=40)
    args = ["embed", "--output-dir", str(tmp_path / "out"), f"pool={tmp_path / 'pool'}", *THUMBS]
    main(args)
    chunk = tmp_path / "out" / "embeddings" / "pool" / "chunk_00000.npy"
    stamp = chunk.stat().st_mtime_ns
    main([*args, f"retrieval.seeds=[{{name: s, dataset: {tmp_path / 'seeds'}}}]"])
    assert chunk.stat().st_mtime_ns == stamp
    assert len(EmbeddingStore(tmp_path / "out" / "embeddings" / "seeds" / "s")) == 2
    done = json.loads((tmp_path / "out" / "embed" / "done.json").read_text())
    assert set(done["report"]) - {"seconds"} == {"pool", "copy", "seeds/s"}


def test_an_embed_stage_recorded_with_the_sets_in_its_fingerprint_still_resumes(tmp_path):
    # Runs finished before the seed and evaluation sets left the embed fingerprint recorded them in it.
    import hashlib

    write_pool(tmp_path / "pool", 4)
    write_pool(tmp_path / "val", 1, first_seed=70)
    args = ["embed", "--output-dir", str(tmp_path / "out"), f"pool={tmp_path / 'pool'}", *THUMBS,
            f"dedup.eval_datasets=[{tmp_path / 'val'}]"]  # fmt: skip
    main(args)
    path = tmp_path / "out" / "embed" / "done.json"
    done = json.loads(path.read_text())
    old_settings = {**done["settings"], "eval_datasets": [str(tmp_path / "val")], "seeds": []}
    old = hashlib.sha256(json.dumps([old_settings], sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert old != done["fingerprint"]
    path.write_text(json.dumps({**done, "settings": old_settings, "fingerprint": old}))
    chunk = tmp_path / "out" / "embeddings" / "pool" / "chunk_00000.npy"
    stamp = chunk.stat().st_mtime_ns
    main(args)  # skipped as done, not "finished with other settings"
    assert chunk.stat().st_mtime_ns == stamp and json.loads(path.read_text())["fingerprint"] == old


def test_an_override_may_replace_a_free_form_section_a_config_file_set():
    # dedup.copy_detection is null (free-form) in the default; quickstart sets it to a thumbnail section.
    # Overrides were checked against quickstart's section, so another embedder's keys or null were refused.
    from dinov2.curation.pipeline import load_curation_config

    given = ["pool=/data/pool", "embed.model.pretrained_weights=w.pth"]
    swap = "dedup.copy_detection={kind: backbone, config_file: vits14_pretrain}"
    backbone = load_curation_config("quickstart", [*given, swap])
    assert backbone.dedup.copy_detection.kind == "backbone"
    assert backbone.dedup.copy_detection.config_file == "vits14_pretrain"
    assert load_curation_config("quickstart", [*given, "dedup.copy_detection=null"]).dedup.copy_detection is None
    with pytest.raises(ValueError, match="dedup.copy_detection.thumbnial_size"):
        load_curation_config("quickstart", [*given, "dedup.copy_detection.thumbnial_size=8"])


def test_a_store_deleted_to_embed_it_again_without_redo_does_not_leave_a_stale_stage(tmp_path):
    """A seed set's store deleted (its images changed) and the pipeline rerun without --redo retrieve
    embedded the new set and then skipped the finished retrieve stage: curated.txt stayed the old
    set's retrievals, silently. The rerun now stops and names the stage to redo."""
    import shutil

    write_pool(tmp_path / "pool", 8)
    listing = tmp_path / "seeds.txt"
    listing.write_text(f"{tmp_path / 'pool' / 'img_0000.png'}\n")
    args = ["run", "--output-dir", str(tmp_path / "out"), f"pool={tmp_path / 'pool'}", *THUMBS,
            "clustering.levels=[2]", f"retrieval.seeds=[{{name: s, dataset: {listing}, per_seed: 1}}]"]  # fmt: skip
    main(args)
    assert (tmp_path / "out" / "curated.txt").read_text() == f"{tmp_path / 'pool' / 'img_0000.png'}\n"
    listing.write_text(f"{tmp_path / 'pool' / 'img_0005.png'}\n")
    shutil.rmtree(tmp_path / "out" / "embeddings" / "seeds" / "s")
    with pytest.raises(StageError, match=r"seeds/s store .* stage 'retrieve', which read it, .*--redo retrieve"):
        main(args)
    main([*args, "--redo", "retrieve"])
    assert (tmp_path / "out" / "curated.txt").read_text() == f"{tmp_path / 'pool' / 'img_0005.png'}\n"
    shutil.rmtree(tmp_path / "out" / "embeddings" / "pool")
    with pytest.raises(StageError, match=r"pool store .* stage 'dedup', which read it, .*--redo dedup"):
        main(args)


def test_a_finished_embed_stage_from_a_run_directory_is_kept_after_the_run_saves_a_newer_checkpoint(tmp_path):
    """``embed.model.pretrained_weights: OUT`` embeds with the run's latest checkpoint and the store
    records that step. Rerunning the finished pipeline after the run saved another checkpoint keeps
    the stage (it is done); a seed set added then is refused at the pool's store, whose vectors came
    from the older step, instead of being embedded with the newer model next to it."""
    from test_curation_store_embed import save_run_checkpoint

    write_pool(tmp_path / "pool", 4)
    write_pool(tmp_path / "seeds", 2, first_seed=40)
    step2, _ = save_run_checkpoint(tmp_path / "run", 2, seed=1)
    args = ["embed", "--output-dir", str(tmp_path / "out"), f"pool={tmp_path / 'pool'}", "dedup.enabled=false",
            f"embed.model.opts=[{','.join(MICRO_OPTS)}]", "embed.model.resize_size=32", "embed.model.crop_size=32",
            f"embed.model.pretrained_weights={tmp_path / 'run'}", "embed.num_workers=0"]  # fmt: skip
    main(args)
    pool = tmp_path / "out" / "embeddings" / "pool"
    assert EmbeddingStore(pool).manifest["embedder"]["pretrained_weights"] == str(step2)
    stamp = (pool / "chunk_00000.npy").stat().st_mtime_ns
    save_run_checkpoint(tmp_path / "run", 4, seed=2)
    assert main(args) is not None  # skipped as done, not refused
    assert (pool / "chunk_00000.npy").stat().st_mtime_ns == stamp
    with pytest.raises(StoreError, match=r"embedder differ.*step_0000002"):
        main([*args, f"retrieval.seeds=[{{name: s, dataset: {tmp_path / 'seeds'}}}]"])
    assert not (tmp_path / "out" / "embeddings" / "seeds").exists()


def test_every_store_of_one_embed_stage_uses_the_same_checkpoint_of_a_run_directory(tmp_path, monkeypatch):
    """The stage resolves ``OUT`` to a checkpoint once: a checkpoint the training run saves while the
    pool is embedded (days at scale) must not embed the seed set, whose vectors retrieval compares
    with the pool's."""
    from test_curation_store_embed import save_run_checkpoint

    from dinov2.curation import pipeline

    write_pool(tmp_path / "pool", 4)
    write_pool(tmp_path / "seeds", 2, first_seed=40)
    step2, _ = save_run_checkpoint(tmp_path / "run", 2, seed=1)
    embed = pipeline.embed_images

    def embed_then_save(*args, **kwargs):  # the run saves step 4 right after the pool's store is made
        store = embed(*args, **kwargs)
        if not (tmp_path / "run" / "checkpoints" / "step_0000004").exists():
            save_run_checkpoint(tmp_path / "run", 4, seed=2)
        return store

    monkeypatch.setattr(pipeline, "embed_images", embed_then_save)
    main(["embed", "--output-dir", str(tmp_path / "out"), f"pool={tmp_path / 'pool'}", "dedup.enabled=false",
          f"embed.model.opts=[{','.join(MICRO_OPTS)}]", "embed.model.resize_size=32", "embed.model.crop_size=32",
          f"embed.model.pretrained_weights={tmp_path / 'run'}", "embed.num_workers=0",
          f"retrieval.seeds=[{{name: s, dataset: {tmp_path / 'seeds'}}}]"])  # fmt: skip
    assert (tmp_path / "run" / "checkpoints" / "step_0000004").is_dir()  # the newer checkpoint was there
    stores = tmp_path / "out" / "embeddings"
    used = {
        EmbeddingStore(d).manifest["embedder"]["pretrained_weights"] for d in (stores / "pool", stores / "seeds" / "s")
    }
    assert used == {str(step2)}


def test_the_dedup_array_is_never_left_half_written(tmp_path, images, monkeypatch):
    """A write that stops midway (a node crash) must not leave a truncated keep.npy for the next stage to load
    (selected.npy is written the same way)."""
    out = tmp_path / "out"
    main(["embed", "--output-dir", str(out), *opts(tmp_path)])
    real_save = np.save

    def save_half_then_fail(file, arr, *args, **kwargs):
        real_save(file, arr, *args, **kwargs)
        if hasattr(file, "truncate"):  # a file object: cut what was written, as a crash would
            file.truncate(10)
        else:
            with open(file, "r+b") as handle:
                handle.truncate(10)
        raise OSError("disk gone")

    monkeypatch.setattr(np, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk gone"):
        main(["dedup", "--output-dir", str(out), *opts(tmp_path)])
    assert not (out / "dedup" / "keep.npy").exists()


def _rank_of_a_failing_start(rank: int, port: int, root: str) -> None:
    """One of 2 gloo ranks running the pipeline; rank 0 cannot write the run's config.yaml."""
    import datetime
    import os

    import torch.distributed as dist

    from dinov2.curation import pipeline

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank)})
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    if rank == 0:

        def disk_full(path, text):
            raise OSError(28, "No space left on device", str(path))

        pipeline.write_text_atomic = disk_full
    start = time.perf_counter()
    try:
        pipeline.run_pipeline(pipeline.load_curation_config(None, opts(Path(root))), Path(root) / "out")
        outcome = "finished"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test compares
        outcome = f"{type(error).__name__}: {error}"
    (Path(root) / f"rank{rank}.txt").write_text(f"{time.perf_counter() - start:.1f}\n{outcome}")
    # alive until the peer is done: a failed rank whose process lives on (NCCL, a launcher that does
    # not kill the others) must not leave its peer waiting (an exit would reset gloo's connection)
    deadline = time.perf_counter() + 70
    while not (Path(root) / f"rank{1 - rank}.txt").exists() and time.perf_counter() < deadline:
        time.sleep(0.05)
    dist.destroy_process_group()


@pytest.mark.distributed
def test_rank_zero_failing_to_prepare_the_output_stops_every_rank_at_once(tmp_path):

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
    from dist_common import free_port, spawn_bounded

    spawn_bounded(_rank_of_a_failing_start, (free_port(), str(tmp_path)), seconds=100)  # a hang fails the test
    (seconds0, own), (seconds1, told) = [(tmp_path / f"rank{r}.txt").read_text().split("\n", 1) for r in range(2)]
    assert own.startswith("OSError: [Errno 28] No space left on device"), own
    assert told.startswith("StageError: preparing ") and "failed on rank 0: OSError: [Errno 28]" in told, told
    assert float(seconds0) < 20 and float(seconds1) < 20  # not the process-group timeout


def _store_of(directory: Path, sources: list[str], chunk_size: int, unreadable=(), dim: int = 4, seed: int = 0):
    """A store of ``sources`` whose ``unreadable`` paths (every entry of each) failed to load."""
    store = EmbeddingStore.create(directory, sources, chunk_size, {"source": "s", "embedder": {}, "dtype": "float32"})
    rng = np.random.default_rng(seed)
    for c in range(store.num_chunks):
        paths = [p for p in store.chunk_sources(c) if p not in unreadable]
        vectors = rng.normal(size=(len(paths), dim))
        failed = {p: "broken" for p in store.chunk_sources(c) if p in unreadable}
        store.write_chunk(c, vectors / np.linalg.norm(vectors, axis=1, keepdims=True), paths, failed)
    return EmbeddingStore(directory)


DUPLICATED = ["/p/a.png", "/p/b.png", "/p/a.png", "/p/c.png", "/p/b.png", "/p/d.png"]


def test_copy_detection_ids_map_to_the_pools_without_listing_the_paths_when_both_stores_hold_the_same_rows(
    tmp_path, monkeypatch
):
    """With dedup.copy_detection, rank 0 carried the copy store's keep mask to the pool's ids by
    building both stores' path lists and a set of entries: tens of GB at web scale, for a mapping
    that is the identity when both stores hold the same path at every id (one image list, read alike)."""
    from dinov2.curation import pipeline

    pool = _store_of(tmp_path / "pool", DUPLICATED, 4, dim=8, seed=1)
    copies = _store_of(tmp_path / "copy", DUPLICATED, 4, dim=4, seed=2)
    copy_keep = np.array([True, True, False, True, False, False])  # the later a and b, and d, removed
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "_same_paths", lambda a, b: False, raising=False)  # the general mapping
        general = pipeline._to_pool_ids(pool, copies, copy_keep)
    np.testing.assert_array_equal(general, copy_keep)

    def no_listing(self, ids=None):
        raise AssertionError("the paths were listed")

    monkeypatch.setattr(EmbeddingStore, "paths", no_listing)
    assert pipeline._to_pool_ids(pool, copies, copy_keep) is copy_keep


def test_copy_detection_ids_of_stores_that_read_other_images_are_mapped_by_path(tmp_path):
    """The same sources.txt is not the same rows: an image only the copy embedding could not read
    shifts its later ids (the identity would misplace every later flag, and is one flag short)."""
    from dinov2.curation import pipeline

    pool = _store_of(tmp_path / "pool", DUPLICATED, 4)
    copies = _store_of(tmp_path / "copy", DUPLICATED, 4, unreadable={"/p/c.png"})
    assert (tmp_path / "pool" / "sources.txt").read_bytes() == (tmp_path / "copy" / "sources.txt").read_bytes()
    assert not pipeline._same_paths(pool, copies)
    # copy rows a b a | b d; the later a and b removed -> pool rows a b a c | b d
    keep = pipeline._to_pool_ids(pool, copies, np.array([True, True, False, False, True]))
    assert keep.tolist() == [True, True, False, True, False, True]
    # the same rows in other chunks are still the same ids
    other_chunks = _store_of(tmp_path / "chunks3", DUPLICATED, 3)
    assert not pipeline._same_paths(pool, other_chunks)
    mask = np.array([False, True, True, False, True, False])
    np.testing.assert_array_equal(pipeline._to_pool_ids(pool, other_chunks, mask), mask)
    assert pipeline._same_paths(pool, _store_of(tmp_path / "again", DUPLICATED, 4, dim=2))
