"""Embedding stores and the embed stage: chunk files, validation, resuming, unreadable images, ranks."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from curation_images import write_pool
from omegaconf import OmegaConf

from dinov2.curation import embed as embed_module
from dinov2.curation.embed import embed_images, list_images
from dinov2.curation.pipeline import load_curation_config
from dinov2.curation.store import EmbeddingStore, StoreError
from dinov2.data.datasets import load_image
from dinov2.data.transforms import make_classification_eval_transform

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from eval_micro import MICRO_OPTS, micro_vit  # noqa: E402

INFO = {"source": "test", "embedder": {"kind": "test"}, "dtype": "float32"}


def micro_model_cfg(weights: Path | None = None):
    """The ``embed.model`` section for the evaluation tests' micro ViT (32 px; ``weights``: a backbone file)."""
    opts = [f"embed.model.opts=[{','.join(MICRO_OPTS)}]", "embed.model.resize_size=32", "embed.model.crop_size=32"]
    if weights is not None:
        opts.append(f"embed.model.pretrained_weights={weights}")
    return load_curation_config(None, ["pool=unused", *opts]).embed.model


def make_store(directory: Path, sizes: list[int], dim: int = 4, seed: int = 0) -> tuple[EmbeddingStore, np.ndarray]:
    rng = np.random.default_rng(seed)
    chunk_size = max(sizes)
    sources = [f"/img/{c}_{r}.png" for c, n in enumerate(sizes) for r in range(chunk_size)]
    store = EmbeddingStore.create(directory, sources, chunk_size, INFO)
    rows = []
    for c, n in enumerate(sizes):
        vectors = rng.normal(size=(n, dim))
        vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
        store.write_chunk(c, vectors, [f"/img/{c}_{r}.png" for r in range(n)], {})
        rows.append(vectors)
    return EmbeddingStore(directory), np.concatenate(rows)


def test_store_ids_follow_chunk_order_and_reads_match_the_written_rows(tmp_path):
    store, written = make_store(tmp_path / "s", [5, 3, 5])
    assert len(store) == 13 and store.dim == 4 and list(store.offsets) == [0, 5, 8, 13]
    ids = np.array([12, 0, 6, 5, 7])
    np.testing.assert_array_equal(store.read(ids), written[ids])
    seen = np.concatenate([ids for ids, _ in store.iter_chunks()])
    np.testing.assert_array_equal(seen, np.arange(13))
    keep = np.zeros(13, dtype=bool)
    keep[[1, 9]] = True
    (ids_a, vec_a), (ids_b, vec_b) = list(store.iter_chunks(keep))
    assert ids_a.tolist() == [1] and ids_b.tolist() == [9]
    np.testing.assert_array_equal(vec_b, written[[9]])
    assert store.paths(np.array([6, 0])) == ["/img/0_0.png", "/img/1_1.png"]


def test_a_chunk_whose_rows_and_paths_differ_is_an_error_naming_it(tmp_path):
    store, _ = make_store(tmp_path / "s", [4, 4])
    paths_file = tmp_path / "s" / "chunk_00001.paths.txt"
    paths_file.write_text("".join(paths_file.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(
        StoreError, match=r"chunk_00001 .*does not match its path list: \(4, 4\) embeddings but 3 paths"
    ):
        len(EmbeddingStore(tmp_path / "s"))


def test_a_store_of_vectors_that_are_not_unit_vectors_is_refused_naming_the_chunk(tmp_path):
    make_store(tmp_path / "s", [3, 3])
    EmbeddingStore(tmp_path / "s").write_chunk(1, 2 * np.eye(4, dtype=np.float32)[:3], ["/a", "/b", "/c"], {})
    with pytest.raises(StoreError, match=r"chunk_00001 .*row 0 has norm 2; a store holds L2-normalised vectors"):
        len(EmbeddingStore(tmp_path / "s"))
    EmbeddingStore(tmp_path / "s").write_chunk(1, np.eye(4, dtype=np.float16)[:3], ["/a", "/b", "/c"], {})
    assert len(EmbeddingStore(tmp_path / "s")) == 6


def test_a_store_written_elsewhere_without_its_counts_or_sources_is_named_incomplete(tmp_path):
    (tmp_path / "manifest.json").write_text('{"num_images": 3}')
    with pytest.raises(StoreError, match=r"not a complete embedding store \(manifest.json has no chunk_size"):
        EmbeddingStore(tmp_path)
    (tmp_path / "manifest.json").write_text('{"num_images": 3, "chunk_size": 3}')
    with pytest.raises(StoreError, match=r"not a complete embedding store \(no sources.txt"):
        EmbeddingStore(tmp_path)


@pytest.mark.parametrize(
    "text, problem", [("[1, 2]", "holds a JSON list, not an object"), ('{"num_im', "not valid JSON")]
)
def test_a_manifest_that_is_not_a_json_object_is_a_store_error_naming_the_file(tmp_path, text, problem):
    (tmp_path / "manifest.json").write_text(text)
    for open_store in (lambda: EmbeddingStore(tmp_path), lambda: EmbeddingStore.create(tmp_path, ["/a.png"], 2, INFO)):
        with pytest.raises(StoreError, match=rf"manifest.json .*{problem}"):
            open_store()


def test_a_store_refuses_other_images_or_another_embedder(tmp_path):
    EmbeddingStore.create(tmp_path, ["/a.png", "/b.png"], 2, INFO)
    with pytest.raises(StoreError, match="another list of images"):
        EmbeddingStore.create(tmp_path, ["/a.png", "/c.png"], 2, INFO)
    with pytest.raises(StoreError, match="embedder"):
        EmbeddingStore.create(tmp_path, ["/a.png", "/b.png"], 2, {**INFO, "embedder": {"kind": "other"}})
    assert EmbeddingStore.create(tmp_path, ["/a.png", "/b.png"], 2, INFO).num_images == 2  # the same: reused
    for other in (["/a.png"], ["/a.png", "/b.png", "/c.png"]):  # a list file edited by hand, shorter or longer
        (tmp_path / "sources.txt").write_text("".join(p + "\n" for p in other))
        with pytest.raises(StoreError, match="another list of images"):
            EmbeddingStore.create(tmp_path, ["/a.png", "/b.png"], 2, INFO)
    with pytest.raises(StoreError, match="not written yet"):
        len(EmbeddingStore(tmp_path))


def test_backbone_embeddings_are_the_models_normalised_cls_features(tmp_path):
    groups = write_pool(tmp_path / "pool", 7)
    model = micro_vit().eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    cfg = micro_model_cfg(tmp_path / "backbone.pth")
    store = embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, batch_size=3, chunk_size=4, dtype="float32")
    assert store.num_chunks == 2 and len(store) == 7
    transform = make_classification_eval_transform(32, 32)
    paths = sorted(groups)
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        expected = F.normalize(model.forward_features(images)["x_norm_clstoken"], dim=1)
    assert store.paths() == paths
    np.testing.assert_allclose(store.read(np.arange(7)), expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(store.read(np.arange(7)), axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("size", [(3000, 3), (2, 900), (40, 30)])
def test_a_banner_image_is_cut_to_its_centre_before_the_evaluation_resize(size, monkeypatch):
    """The evaluation transform resizes the shorter side to resize_size and keeps the centre crop: a
    1 x 20,000 web banner became a 256 x 5.1M-pixel image (GBs in a decoding worker, which then dies,
    and again on every rerun). Only the centre, at most 8:1, is resized now, to the same result up to
    a sub-pixel shift."""
    from PIL import Image
    from torchvision import transforms

    from dinov2.curation.embed import BackboneEmbedder

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    resized, forward = [], transforms.Resize.forward
    monkeypatch.setattr(transforms.Resize, "forward", lambda self, img: resized.append(img.size) or forward(self, img))
    embedder = BackboneEmbedder(micro_model_cfg(), device="cpu")
    got = embedder.transform(image)
    assert max(resized[0]) <= 8 * min(resized[0]) and min(resized[0]) == min(size)
    whole = transforms.Compose(  # the whole image resized, as before the cut (built here, not the library's)
        [transforms.Resize(32, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
         transforms.CenterCrop(32), transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )  # fmt: skip
    expected = whole(image)
    assert got.shape == expected.shape == (3, 32, 32)
    assert torch.allclose(got, expected, atol=0.1) and (got - expected).abs().mean() < 0.01


def test_unreadable_images_are_skipped_and_listed(tmp_path):
    write_pool(tmp_path / "pool", 5)
    (tmp_path / "pool" / "img_0002.png").write_bytes(b"not a png")
    (tmp_path / "pool" / "zero.jpg").write_bytes(b"")
    cfg = load_curation_config(None, ["pool=x", "embed.model.kind=thumbnail"]).embed.model
    store = embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, chunk_size=3)
    assert len(store) == 4 and store.num_images == 6
    failed = store.failed()
    assert sorted(Path(p).name for p in failed) == ["img_0002.png", "zero.jpg"]
    assert "zero-byte" in failed[str(tmp_path / "pool" / "zero.jpg")]
    assert not any(Path(p).name in ("img_0002.png", "zero.jpg") for p in store.paths())


def test_an_interrupted_embedding_resumes_without_redoing_or_duplicating_chunks(tmp_path, monkeypatch):
    write_pool(tmp_path / "pool", 10)
    cfg = load_curation_config(None, ["pool=x", "embed.model.kind=thumbnail"]).embed.model
    reference = embed_images(str(tmp_path / "pool"), tmp_path / "ref", cfg, chunk_size=3)
    calls = []
    original = embed_module._embed_chunk

    def failing_on_third(embedder, paths, *args):
        calls.append(paths[0])
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(embedder, paths, *args)

    monkeypatch.setattr(embed_module, "_embed_chunk", failing_on_third)
    with pytest.raises(KeyboardInterrupt):
        embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, chunk_size=3)
    partial = EmbeddingStore(tmp_path / "emb")
    assert partial.missing_chunks() == [2, 3]
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "emb").iterdir())
    calls.clear()
    store = embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, chunk_size=3)
    assert [Path(p).name for p in calls] == ["img_0006.png", "img_0009.png"]  # only the two missing chunks
    assert store.paths() == reference.paths()
    np.testing.assert_array_equal(store.read(np.arange(10)), reference.read(np.arange(10)))


def test_pool_sources_folder_list_file_and_dataset_string_agree(tmp_path):
    groups = write_pool(tmp_path / "pool", 4)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(p + "\n" for p in sorted(groups)))
    expected = sorted(groups)
    assert list_images(str(tmp_path / "pool")) == expected
    assert list_images(str(listing)) == expected
    assert list_images(f"ImageFolder:root={tmp_path / 'pool'}") == expected
    with pytest.raises(ValueError, match="Synthetic, which has no image files"):
        list_images("Synthetic:split=TRAIN:num_images=4")


@pytest.mark.parametrize("name", ["a,b.png", "tab\there.png"])
def test_a_pool_path_that_a_file_list_would_misread_fails_before_embedding(tmp_path, name):
    write_pool(tmp_path / "pool", 2)
    write_pool(tmp_path / "tmp", 1)
    (tmp_path / "tmp" / "img_0000.png").rename(tmp_path / "pool" / name)
    cfg = load_curation_config(None, ["pool=x", "embed.model.kind=thumbnail"]).embed.model
    embed_images(str(tmp_path / "pool"), tmp_path / "other", cfg)  # fine where no FileList is written
    with pytest.raises(ValueError, match=r"cannot be listed in the curated FileList"):
        embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, for_file_list=True)
    assert not (tmp_path / "emb").exists()


def test_an_image_name_that_is_not_utf8_is_named_instead_of_failing_to_encode(tmp_path):
    """A web pool with a Latin-1 file name (bytes that are no UTF-8; Python lists it with a lone
    surrogate) failed with a bare UnicodeEncodeError while writing sources.txt, naming no file. The
    stores and the curated FileList are UTF-8, so the name is refused, naming it."""
    write_pool(tmp_path / "pool", 2)
    os.rename(tmp_path / "pool" / "img_0001.png", os.fsencode(tmp_path / "pool") + b"/caf\xe9.png")
    cfg = load_curation_config(None, ["pool=x", "embed.model.kind=thumbnail"]).embed.model
    with pytest.raises(StoreError, match=r"image path '.*caf\\udce9.png' is not valid UTF-8.*rename it"):
        embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, num_workers=0)
    assert not (tmp_path / "emb" / "manifest.json").exists()
    (tmp_path / "pool" / "ok_\u00e9t\u00e9.png").write_bytes((tmp_path / "pool" / "img_0000.png").read_bytes())
    os.remove(os.fsencode(tmp_path / "pool") + b"/caf\xe9.png")
    store = embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, num_workers=0)  # UTF-8 accents are fine
    assert sorted(Path(p).name for p in store.paths()) == ["img_0000.png", "ok_\u00e9t\u00e9.png"]


def _embed_rank(rank, port, pool, out, cfg_yaml):
    from dist_common import join_group

    join_group(rank, port)
    embed_images(pool, out, OmegaConf.create(cfg_yaml), chunk_size=2, progress=False)
    try:  # a store rank 0 refuses (another chunk size): every rank stops with an error, none waits
        embed_images(pool, out, OmegaConf.create(cfg_yaml), chunk_size=3, progress=False)
    except StoreError as error:
        assert "chunk_size" in str(error) and (rank == 0 or "failed on rank 0: StoreError: " in str(error))
    else:
        raise AssertionError("a mismatched store was accepted")


@pytest.mark.distributed
def test_two_ranks_share_the_chunks_and_write_what_one_process_writes(tmp_path):
    import torch.multiprocessing as mp

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
    from dist_common import free_port

    write_pool(tmp_path / "pool", 7)
    cfg = load_curation_config(None, ["pool=x", "embed.model.kind=thumbnail"]).embed.model
    single = embed_images(str(tmp_path / "pool"), tmp_path / "one", cfg, chunk_size=2)
    args = (free_port(), str(tmp_path / "pool"), str(tmp_path / "two"), OmegaConf.to_yaml(cfg))
    mp.spawn(_embed_rank, args=args, nprocs=2, join=True)
    two = EmbeddingStore(tmp_path / "two")
    assert two.paths() == single.paths()
    np.testing.assert_array_equal(two.read(np.arange(7)), single.read(np.arange(7)))
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["num_images"] == 7 and manifest["embedder"]["kind"] == "thumbnail"


PG_TIMEOUT_S = 60  # a regression waits this long in a collective, then fails (the default is 30 min)


def _failing_rank(rank, port, pool, out, cfg_yaml, fault, results):
    """One rank of a 2-rank embedding where one rank fails; writes what it raised to ``results``."""
    from datetime import timedelta

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                       "LOCAL_RANK": str(rank)})  # fmt: skip
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=PG_TIMEOUT_S))
    if fault == "prepare" and rank == 0:  # an error that is neither a ValueError nor an OSError

        def bad_listing(source):
            raise KeyError(f"no such dataset field in {source!r}")

        embed_module.list_images = bad_listing
    start = time.perf_counter()
    try:
        embed_images(pool, out, OmegaConf.create(cfg_yaml), chunk_size=2, progress=False)
        outcome = {"type": None, "message": ""}
    except Exception as error:
        outcome = {"type": type(error).__name__, "message": str(error)}
    outcome["seconds"] = time.perf_counter() - start
    Path(results, f"rank{rank}.json").write_text(json.dumps(outcome))
    # Stay alive until the other rank is done too: a failed rank whose process lives on (NCCL, a
    # launcher that does not kill the others) must not leave its peer waiting; with gloo an exit
    # would also reset the peer's connection, which hides the wait.
    deadline = time.perf_counter() + PG_TIMEOUT_S + 10
    while not Path(results, f"rank{1 - rank}.json").exists() and time.perf_counter() < deadline:
        time.sleep(0.05)
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("fault", ["prepare", "chunk"])
def test_a_rank_that_fails_stops_every_rank_promptly_naming_that_rank_and_its_error(tmp_path, fault):
    """``prepare``: rank 0 fails listing the pool (a KeyError); ``chunk``: rank 1 cannot write its
    chunk (chunk 1 of 4, dealt to rank 1; a folder stands where its file goes). Every rank must raise
    at once: the failing rank its own error, the other one an error naming that rank and its cause."""

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
    from dist_common import free_port, spawn_bounded

    write_pool(tmp_path / "pool", 7)
    if fault == "chunk":
        (tmp_path / "emb" / "chunk_00001.npy").mkdir(parents=True)
    (tmp_path / "results").mkdir()
    cfg = load_curation_config(None, ["pool=x", "embed.model.kind=thumbnail"]).embed.model
    args = (free_port(), str(tmp_path / "pool"), str(tmp_path / "emb"), OmegaConf.to_yaml(cfg), fault,
            str(tmp_path / "results"))  # fmt: skip
    start = time.perf_counter()
    spawn_bounded(_failing_rank, args, seconds=PG_TIMEOUT_S + 30)  # a hang fails the test, not the suite
    elapsed = time.perf_counter() - start
    outcomes = [json.loads((tmp_path / "results" / f"rank{r}.json").read_text()) for r in range(2)]
    failing, other = (0, 1) if fault == "prepare" else (1, 0)
    own = outcomes[failing]
    if fault == "prepare":
        assert own["type"] == "KeyError" and "no such dataset field" in own["message"], own
    else:
        assert own["type"] == "IsADirectoryError" and "chunk_00001.npy" in own["message"], own
    told = outcomes[other]
    assert told["type"] == ("StoreError" if fault == "prepare" else "EmbedError"), told
    assert f"rank {failing}" in told["message"] and own["type"] in told["message"], told
    assert own["message"].strip("'\"")[:40] in told["message"], told
    assert all(o["seconds"] < PG_TIMEOUT_S / 3 for o in outcomes) and elapsed < PG_TIMEOUT_S / 2, (elapsed, outcomes)


def _stale_rank(rank, port, pool, out):
    """One of 2 ranks whose view of the chunks the other rank wrote is stale (NFS caches a lookup that
    found a file missing, and each rank looked every chunk up before they were written)."""
    from dist_common import join_group

    from dinov2 import distributed
    from dinov2.curation import pipeline
    from dinov2.curation.pipeline import load_curation_config, run_pipeline

    join_group(rank, port)
    real_is_done, outcomes = EmbeddingStore.is_done, {}

    def outcome(action) -> str:
        try:
            action()
        except Exception as error:  # noqa: BLE001 - the outcome is what the test compares
            return f"{type(error).__name__}: {error}"
        return "ok"

    # rank 1 does not see rank 0's chunks (0 and 2) yet: rank 0 sees them all, so the stage is done
    if rank == 1:
        EmbeddingStore.is_done = lambda self, c: c % 2 == 1 and real_is_done(self, c)
    opts = [f"pool={pool}", "embed.model.kind=thumbnail", "embed.chunk_size=2", "embed.num_workers=0"]
    cfg = load_curation_config(None, opts)
    outcomes["pipeline"] = outcome(lambda: run_pipeline(cfg, Path(out) / "run", stages=("embed",)))
    # a rerun: rank 1 lists the pool again and its stale listing differs; rank 0 finds the stage done
    if rank == 1:
        pipeline.source_change = lambda source, store, refresh=True: "a stale listing differs"
    outcomes["rerun"] = outcome(lambda: run_pipeline(cfg, Path(out) / "run", stages=("embed",)))
    # rank 0 does not see rank 1's chunk 1: every rank stops, none goes on alone
    EmbeddingStore.is_done = (lambda self, c: c != 1 and real_is_done(self, c)) if rank == 0 else real_is_done
    outcomes["unseen"] = outcome(lambda: embed_images(pool, Path(out) / "emb", cfg.embed.model, chunk_size=2,
                                                      progress=False))  # fmt: skip
    EmbeddingStore.is_done = real_is_done
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcomes))
    distributed.shutdown()  # a barrier first: a rank leaving while its peer still exchanges aborts it


@pytest.mark.distributed
def test_whether_every_chunk_is_written_is_rank_zeros_decision(tmp_path):
    """After the ranks embedded their chunks, one rank's stale listing must neither stop that rank
    alone (rank 0 going on, or waiting for it in the next store's collectives) nor let the others go on
    without a rank 0 that found a chunk missing; on a rerun, whether the finished stage's sources are
    unchanged is rank 0's answer too."""

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
    from dist_common import free_port, spawn_bounded

    write_pool(tmp_path / "pool", 7)
    spawn_bounded(
        _stale_rank, (free_port(), str(tmp_path / "pool"), str(tmp_path)), seconds=120
    )  # a hang fails the test, not the suite
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(o["pipeline"], o["rerun"]) for o in outcomes] == [("ok", "ok")] * 2, outcomes
    done = json.loads((tmp_path / "run" / "embed" / "done.json").read_text())
    assert (done["report"]["pool"]["images"], done["report"]["pool"]["embedded"]) == (7, 7)
    own, told = outcomes[0]["unseen"], outcomes[1]["unseen"]
    assert own.startswith("StoreError: ") and "chunk_00001" in own, own
    assert told.startswith("StoreError: checking the chunks of ") and "failed on rank 0: StoreError: " in told, told


def _age(tree: Path, seconds: float = 60.0) -> None:
    """Date every file and folder of ``tree`` ``seconds`` back: well before any listing that follows."""
    then = time.time_ns() - int(seconds * 1e9)
    for path in [tree, *tree.rglob("*")]:
        os.utime(path, ns=(then, then))


def test_a_source_stamp_moves_when_an_image_is_added_or_removed_anywhere_in_a_folder_tree(tmp_path):
    from dinov2.curation.embed import source_stamp, stamp_changed

    write_pool(tmp_path / "pool" / "a" / "b", 2)
    write_pool(tmp_path / "pool" / "c", 1, first_seed=5)
    _age(tmp_path / "pool")
    source = str(tmp_path / "pool")
    stamp = source_stamp(source, list_images(source))
    assert sorted(stamp["folders"]) == sorted(str(tmp_path / "pool" / d) for d in ("", "a", "a/b", "c"))
    assert not stamp_changed(stamp)
    time.sleep(0.05)  # past the file system's timestamp granularity
    deep_removal = (tmp_path / "pool" / "a" / "b" / "img_0001.png").unlink
    new_folder = (tmp_path / "pool" / "a" / "new").mkdir  # a new folder moves its parent's time
    for edit in (deep_removal, new_folder):
        edit()
        assert stamp_changed(stamp)
        _age(tmp_path / "pool")
        stamp = source_stamp(source, list_images(source))
        assert not stamp_changed(stamp)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'pool' / 'c' / 'img_0000.png'}\n")
    _age(listing)
    stamp = source_stamp(f"FileList:path={listing}", [])
    assert list(stamp["files"]) == [str(listing)] and not stamp["folders"]
    time.sleep(0.05)
    listing.write_text(listing.read_text() * 2)
    assert stamp_changed(stamp)


THUMBNAIL = ["pool=x", "embed.model.kind=thumbnail", "embed.model.thumbnail_size=8"]


def test_an_image_added_while_the_pool_is_listed_is_not_taken_as_embedded(tmp_path, monkeypatch):
    from dinov2.curation.embed import source_change

    write_pool(tmp_path / "pool", 3)
    write_pool(tmp_path / "late", 1, first_seed=9)
    _age(tmp_path / "pool")
    real_list_images = embed_module.list_images

    def listing_then_a_new_image(source):  # another process adds an image just after the listing
        paths = real_list_images(source)
        (tmp_path / "late" / "img_0000.png").rename(tmp_path / "pool" / "late.png")
        return paths

    monkeypatch.setattr(embed_module, "list_images", listing_then_a_new_image)
    cfg = load_curation_config(None, THUMBNAIL).embed.model
    store = embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, progress=False)
    monkeypatch.setattr(embed_module, "list_images", real_list_images)
    assert store.num_images == 3  # what was listed; the stamp must not vouch for the folder as it is now
    change = source_change(str(tmp_path / "pool"), store)
    assert change is not None and "lists 4 now (1 new, 0 gone)" in change


def test_a_relative_source_that_leads_elsewhere_from_another_folder_is_listed_again(tmp_path, monkeypatch):
    from dinov2.curation.embed import source_change

    write_pool(tmp_path / "a" / "pool", 2)
    write_pool(tmp_path / "b" / "pool", 3, first_seed=4)
    _age(tmp_path)
    monkeypatch.chdir(tmp_path / "a")
    cfg = load_curation_config(None, THUMBNAIL).embed.model
    store = embed_images("pool", tmp_path / "emb", cfg, progress=False)
    assert source_change("pool", store) is None
    monkeypatch.chdir(tmp_path / "b")  # the same name, the other pool: its stamp's folders are unchanged
    change = source_change("pool", store)
    assert change is not None and "lists 3 now (3 new, 2 gone)" in change


def _as_rank(monkeypatch, rank: int, world: int) -> None:
    """Make ``embed_images`` run as ``rank`` of ``world`` in this process (each collective is a no-op)."""
    from types import SimpleNamespace

    fake = SimpleNamespace(get_rank=lambda: rank, get_world_size=lambda: world, is_main_process=lambda: rank == 0,
                           on_every_rank=lambda action, what, error_type: action())  # fmt: skip
    monkeypatch.setattr(embed_module, "distributed", fake)


def test_an_embedding_rank_reads_only_its_own_chunks_paths_and_the_ranks_make_one_processs_store(tmp_path, monkeypatch):
    """At web scale (100M paths, ~14 GB as a list of str) every rank used to read the whole of
    sources.txt into a list, 8 copies on an 8-GPU node, to embed 1/8 of the chunks. A rank now
    reads its chunks' lines one chunk at a time; the ranks' chunks together are one process's store,
    unreadable images included."""
    write_pool(tmp_path / "pool", 9)
    (tmp_path / "pool" / "img_0004.png").write_bytes(b"not a png")  # in chunk 2 (rank 0's)
    cfg = load_curation_config(None, ["pool=x", "embed.model.kind=thumbnail"]).embed.model
    single = embed_images(str(tmp_path / "pool"), tmp_path / "one", cfg, chunk_size=2, progress=False)
    sources = single.sources()

    def no_whole_list(self):
        raise AssertionError("an embedding rank read the whole sources.txt")

    embedded: list[list[str]] = []
    original = embed_module._embed_chunk
    monkeypatch.setattr(
        embed_module, "_embed_chunk", lambda e, paths, *a: embedded.append(paths) or original(e, paths, *a)
    )
    _as_rank(monkeypatch, 0, 2)  # rank 0 makes the store (lists the pool, writes sources.txt)
    info = {"source": str(tmp_path / "pool"), "embedder": embed_module.describe_embedder(cfg), "dtype": "float16"}
    embed_module._prepare_on_rank_zero(str(tmp_path / "pool"), tmp_path / "two", 2, info, False)
    monkeypatch.setattr(EmbeddingStore, "sources", no_whole_list)
    for rank in (1, 0):  # rank 1 first: rank 0's check that every chunk is written comes last
        embedded.clear()
        _as_rank(monkeypatch, rank, 2)
        embed_images(str(tmp_path / "pool"), tmp_path / "two", cfg, chunk_size=2, progress=False)
        mine = [c for c in range(5) if c % 2 == rank]
        assert embedded == [sources[2 * c : 2 * c + 2] for c in mine]
    two = EmbeddingStore(tmp_path / "two")
    assert two.paths() == single.paths() and len(two) == 8
    assert two.failed() == single.failed() and list(two.failed()) == [str(tmp_path / "pool" / "img_0004.png")]
    np.testing.assert_array_equal(two.read(np.arange(8)), single.read(np.arange(8)))


def test_chunk_sources_come_one_chunk_at_a_time_from_one_pass_and_a_short_list_is_named(tmp_path):
    sources = [f"/img/{i}.png" for i in range(11)]
    store = EmbeddingStore.create(tmp_path / "s", sources, 3, INFO)
    assert [store.chunk_length(c) for c in range(4)] == [3, 3, 3, 2]
    chunks = store.iter_chunk_sources([3, 1, 1])
    assert next(chunks) == (1, sources[3:6])  # increasing order, each chunk once
    assert next(chunks) == (3, sources[9:11])
    assert next(chunks, None) is None
    assert [store.chunk_sources(c) for c in range(4)] == [sources[i : i + 3] for i in range(0, 11, 3)]
    (tmp_path / "s" / "sources.txt").write_text("".join(p + "\n" for p in sources[:10]))  # cut short
    assert next(EmbeddingStore(tmp_path / "s").iter_chunk_sources([0, 2]))[1] == sources[:3]
    with pytest.raises(StoreError, match=r"sources.txt has fewer lines than the 11 images that manifest.json lists"):
        list(EmbeddingStore(tmp_path / "s").iter_chunk_sources([3]))


def test_rank_zero_checks_a_rerun_against_sources_txt_without_a_second_copy_of_the_list(tmp_path, monkeypatch):
    """On a rerun rank 0 held the pool's list twice (the listing and sources.txt read back whole)."""
    from dinov2.curation import store as store_module

    sources = [f"/img/{i}.png" for i in range(5)]
    EmbeddingStore.create(tmp_path, sources, 2, INFO)
    monkeypatch.setattr(store_module, "_read_lines", lambda path: pytest.fail(f"{path} was read whole"))
    assert EmbeddingStore.create(tmp_path, sources, 2, INFO).num_images == 5
    with pytest.raises(StoreError, match="another list of images"):
        EmbeddingStore.create(tmp_path, [*sources[:4], "/img/x.png"], 2, INFO)


def test_a_path_with_a_character_splitlines_breaks_at_stays_one_path(tmp_path):
    """sources.txt and the chunks' path lists were read back with str.splitlines, which also splits at
    a form feed, U+0085 and U+2028: such a (legal) file name became two paths, shifting every later
    path by one, so the pool's last image was never embedded and a rerun found "another list of images"."""
    write_pool(tmp_path / "pool", 3)
    odd = tmp_path / "pool" / "line\u2028sep\x0cand\x85nel.png"
    (tmp_path / "pool" / "img_0001.png").rename(odd)
    cfg = load_curation_config(None, ["pool=x", "embed.model.kind=thumbnail"]).embed.model
    store = embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, chunk_size=2, progress=False)
    expected = sorted(str(p) for p in (tmp_path / "pool").iterdir())
    assert store.sources() == expected and store.paths() == expected and store.failed() == {}
    assert embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, chunk_size=2, progress=False).paths() == expected


def save_run_checkpoint(run: Path, step: int, seed: int):
    """A training run's sharded checkpoint ``run/checkpoints/step_N`` holding a micro ViT teacher."""
    from torch import nn

    from dinov2.checkpoint.sharded import save_checkpoint

    torch.manual_seed(seed)
    teacher = micro_vit().eval()
    module = nn.ModuleDict({"teacher": nn.ModuleDict({"backbone": teacher})})
    path = save_checkpoint(run / "checkpoints", step, module, torch.optim.SGD(module.parameters(), lr=0.1), {}, {})
    return Path(path), teacher


def test_a_run_directory_as_weights_is_recorded_as_its_latest_step_and_a_newer_one_refuses_a_resume(tmp_path):
    """``pretrained_weights: OUT`` means the run's latest checkpoint. The manifest recorded ``OUT`` as
    given, so a half-embedded store resumed after the run saved a newer checkpoint mixed the two
    models' vectors in one store, silently; each rank also resolved the step itself."""
    groups = write_pool(tmp_path / "pool", 6)
    run = tmp_path / "run"
    save_run_checkpoint(run, 2, seed=1)
    step4, teacher = save_run_checkpoint(run, 4, seed=2)
    cfg = micro_model_cfg(run)
    store = embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, chunk_size=3, dtype="float32", progress=False)
    assert store.manifest["embedder"]["pretrained_weights"] == str(step4)
    assert cfg.pretrained_weights == str(run)  # the caller's config is left as given
    transform = make_classification_eval_transform(32, 32)
    images = torch.stack([transform(load_image(p)) for p in sorted(groups)])
    with torch.no_grad():
        expected = F.normalize(teacher.forward_features(images)["x_norm_clstoken"], dim=1)
    np.testing.assert_allclose(store.read(np.arange(6)), expected.numpy(), atol=1e-5)
    kept = np.load(tmp_path / "emb" / "chunk_00000.npy")

    step6, _ = save_run_checkpoint(run, 6, seed=3)  # the run went on; chunk 1 is to be embedded again
    for chunk_file in (tmp_path / "emb").glob("chunk_00001*"):
        chunk_file.unlink()
    assert EmbeddingStore(tmp_path / "emb").missing_chunks() == [1]
    with pytest.raises(StoreError, match="other settings") as info:
        embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, chunk_size=3, dtype="float32", progress=False)
    message = str(info.value)
    assert "embedder differ" in message and str(step4) in message and str(step6) in message
    assert EmbeddingStore(tmp_path / "emb").missing_chunks() == [1]  # nothing written with step 6's model
    np.testing.assert_array_equal(np.load(tmp_path / "emb" / "chunk_00000.npy"), kept)
    assert f"set pretrained_weights to the checkpoint that embedded it, {step4}" in message
    # the step the store names resumes it
    pinned = micro_model_cfg(step4)
    store = embed_images(
        str(tmp_path / "pool"), tmp_path / "emb", pinned, chunk_size=3, dtype="float32", progress=False
    )
    np.testing.assert_allclose(store.read(np.arange(6)), expected.numpy(), atol=1e-5)


def test_a_store_that_records_the_run_directory_alone_is_not_resumed_from_its_latest_checkpoint(tmp_path):
    """A store embedded before the step was recorded names ``OUT`` only: which checkpoint made it is
    unknown, so resuming it from the latest one could mix two models; the refusal says so."""
    write_pool(tmp_path / "pool", 4)
    run = tmp_path / "run"
    save_run_checkpoint(run, 2, seed=1)
    cfg = micro_model_cfg(run)
    embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, chunk_size=2, dtype="float32", progress=False)
    manifest = json.loads((tmp_path / "emb" / "manifest.json").read_text())
    manifest["embedder"]["pretrained_weights"] = str(run)  # as the store was recorded before
    (tmp_path / "emb" / "manifest.json").write_text(json.dumps(manifest))
    for chunk_file in (tmp_path / "emb").glob("chunk_00001*"):
        chunk_file.unlink()
    with pytest.raises(StoreError, match="embedder differ.*records the run directory alone"):
        embed_images(str(tmp_path / "pool"), tmp_path / "emb", cfg, chunk_size=2, dtype="float32", progress=False)
    assert EmbeddingStore(tmp_path / "emb").missing_chunks() == [1]


def _stale_checkpoints_rank(rank, port, pool, out, run):
    """One of 2 ranks embedding from the run directory ``run``; rank 1 lists its checkpoints stale
    (step 2 alone, after the run saved step 4)."""
    from dist_common import join_group

    from dinov2 import distributed
    from dinov2.checkpoint import sharded

    join_group(rank, port)
    if rank == 1:
        real_list = sharded.list_checkpoints
        sharded.list_checkpoints = lambda directory: [p for p in real_list(directory) if p[0] == 2]
    embed_images(pool, out, micro_model_cfg(Path(run)), chunk_size=1, dtype="float32", progress=False)
    distributed.shutdown()


@pytest.mark.distributed
def test_ranks_embed_with_rank_zeros_latest_checkpoint_of_a_run_directory(tmp_path):
    """Each rank resolved ``pretrained_weights: OUT`` itself: a rank whose listing of the run was stale
    wrote its chunks with an older checkpoint's model into the same store."""

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
    from dist_common import free_port, spawn_bounded

    write_pool(tmp_path / "pool", 4)
    run = tmp_path / "run"
    save_run_checkpoint(run, 2, seed=1)
    step4, _ = save_run_checkpoint(run, 4, seed=2)
    single = embed_images(str(tmp_path / "pool"), tmp_path / "one", micro_model_cfg(step4), chunk_size=1,
                          dtype="float32", progress=False)  # fmt: skip
    args = (free_port(), str(tmp_path / "pool"), str(tmp_path / "two"), str(run))
    spawn_bounded(_stale_checkpoints_rank, args, seconds=120)  # a hang fails the test, not the suite
    two = EmbeddingStore(tmp_path / "two")
    assert two.paths() == single.paths()
    np.testing.assert_array_equal(two.read(np.arange(4)), single.read(np.arange(4)))  # rank 1's chunks too
    assert two.manifest["embedder"]["pretrained_weights"] == str(step4)
