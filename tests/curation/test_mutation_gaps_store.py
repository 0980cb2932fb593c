"""Gaps a mutation audit of dinov2/curation/store.py and dinov2/curation/planted.py found in the other
curation tests: the store's refusals of bad inputs (chunk size 0, no images, a carriage return in a path,
rows that do not match paths, a one-dimensional or unreadable chunk, a chunk without its path list,
vectors that are slightly off unit norm or NaN, a manifest key the new settings drop), the order of the
atomic writes that makes an interrupted ``create`` or ``write_chunk`` safe to rerun, the storage dtype,
the caches of a store object across a rewritten chunk, ``dim`` past an all-failed chunk, ``sample_ids``
and ``paths`` at chunk boundaries; and the documented sizes, crops and encodings of the planted copies.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dinov2.curation import store as store_module
from dinov2.curation.planted import altered_copy, random_picture
from dinov2.curation.store import EmbeddingStore, StoreError

INFO = {"source": "test", "embedder": {"kind": "test"}, "dtype": "float32"}


def unit_rows(count: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).normal(size=(count, dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def written_store(directory, sizes: list[int], info: dict = INFO) -> EmbeddingStore:
    """A complete store whose chunk ``c`` holds ``sizes[c]`` unit rows with paths ``/img/c_r.png``."""
    chunk_size = max(sizes)
    sources = [f"/img/{c}_{r}.png" for c in range(len(sizes)) for r in range(chunk_size)]
    store = EmbeddingStore.create(directory, sources, chunk_size, info)
    for c, n in enumerate(sizes):
        store.write_chunk(c, unit_rows(n, seed=c), [f"/img/{c}_{r}.png" for r in range(n)], {})
    return store


# Creating a store ------------------------------------------------------------------------------------
def test_a_chunk_size_below_one_or_no_images_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(StoreError, match=r"chunk_size must be >= 1, got 0"):
        EmbeddingStore.create(tmp_path / "a", ["/a.png"], 0, INFO)
    with pytest.raises(StoreError, match=r"no images to embed into"):
        EmbeddingStore.create(tmp_path / "b", [], 2, INFO)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_path_with_a_carriage_return_is_refused_as_a_line_break(tmp_path):
    with pytest.raises(StoreError, match=r"contains a line break"):
        EmbeddingStore.create(tmp_path, ["/a.png", "/b\r.png"], 2, INFO)
    assert not (tmp_path / "manifest.json").exists()


def test_a_setting_the_old_manifest_holds_and_the_new_one_drops_is_a_difference(tmp_path):
    EmbeddingStore.create(tmp_path, ["/a.png"], 2, {**INFO, "pooling": "cls"})
    with pytest.raises(StoreError, match=r"other settings \(pooling differ"):
        EmbeddingStore.create(tmp_path, ["/a.png"], 2, INFO)


@pytest.mark.parametrize("failing_call", [1, 2])
def test_a_create_interrupted_at_either_write_is_finished_by_a_rerun(tmp_path, monkeypatch, failing_call):
    """``sources.txt`` is written before ``manifest.json``: a directory with a manifest is a store whose
    list is complete, so a rerun after a crash at either write makes the store instead of failing."""
    calls = []

    def failing(real):
        def write(*args, **kwargs):
            calls.append(args[0])
            if len(calls) == failing_call:
                raise OSError("disk full")
            return real(*args, **kwargs)

        return write

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "write_text_atomic", failing(store_module.write_text_atomic))
        patch.setattr(store_module, "write_json_atomic", failing(store_module.write_json_atomic))
        with pytest.raises(OSError, match="disk full"):
            EmbeddingStore.create(tmp_path, ["/a.png", "/b.png", "/c.png"], 2, INFO)
    store = EmbeddingStore.create(tmp_path, ["/a.png", "/b.png", "/c.png"], 2, INFO)
    assert store.num_images == 3 and store.sources() == ["/a.png", "/b.png", "/c.png"]
    assert store.missing_chunks() == [0, 1]


# Writing chunks ----------------------------------------------------------------------------------------
def test_a_chunk_with_more_embeddings_than_paths_is_refused_and_not_written(tmp_path):
    store = EmbeddingStore.create(tmp_path, ["/a.png", "/b.png", "/c.png"], 3, INFO)
    with pytest.raises(StoreError, match=r"chunk_00000: 3 embeddings for 2 paths"):
        store.write_chunk(0, unit_rows(3), ["/a.png", "/b.png"], {})
    assert store.missing_chunks() == [0] and not list(tmp_path.glob("chunk_*"))


@pytest.mark.parametrize(
    "info, expected",
    [({**INFO, "dtype": "float16"}, np.float16), ({"source": "elsewhere"}, np.float16), (INFO, np.float32)],
)
def test_chunks_are_stored_in_the_manifests_dtype_half_precision_when_it_names_none(tmp_path, info, expected):
    store = EmbeddingStore.create(tmp_path, ["/a.png", "/b.png"], 2, info)
    store.write_chunk(0, unit_rows(2).astype(np.float64), ["/a.png", "/b.png"], {})
    stored = np.load(tmp_path / "chunk_00000.npy")
    assert stored.dtype == expected and stored.shape == (2, 4)
    assert EmbeddingStore(tmp_path).read(np.array([1, 0])).dtype == np.float32


def test_a_chunk_interrupted_before_its_array_is_written_is_not_done(tmp_path, monkeypatch):
    """The ``.npy`` is renamed into place last: a crash while writing the path list leaves the chunk to redo."""
    store = EmbeddingStore.create(tmp_path, ["/a.png", "/b.png"], 2, INFO)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "write_text_atomic", fail)
        with pytest.raises(OSError, match="disk full"):
            store.write_chunk(0, unit_rows(2), ["/a.png", "/b.png"], {})
    assert not store.is_done(0) and store.missing_chunks() == [0]
    store.write_chunk(0, unit_rows(2), ["/a.png", "/b.png"], {})
    assert len(EmbeddingStore(tmp_path)) == 2


def test_a_store_object_sees_a_chunk_it_rewrites(tmp_path):
    store = written_store(tmp_path, [3, 3])
    assert len(store) == 6 and list(store.offsets) == [0, 3, 6]  # the counts are cached now
    store.write_chunk(1, unit_rows(1, seed=7), ["/img/1_2.png"], {"/img/1_0.png": "bad", "/img/1_1.png": "bad"})
    assert len(store) == 4 and list(store.offsets) == [0, 3, 4]
    np.testing.assert_array_equal(store.read(np.array([3])), unit_rows(1, seed=7))
    assert store.paths(np.array([3])) == ["/img/1_2.png"]


# Reading chunks ----------------------------------------------------------------------------------------
def test_a_one_dimensional_chunk_is_a_store_error_not_a_crash(tmp_path):
    store = written_store(tmp_path, [2, 2])
    np.save(tmp_path / "chunk_00001.npy", np.array([1.0, 0.0], dtype=np.float32))  # another tool's flat array
    with pytest.raises(StoreError, match=r"chunk_00001 .*does not match its path list: \(2,\) embeddings"):
        EmbeddingStore(tmp_path).load_chunk(1)
    with pytest.raises(StoreError, match=r"chunk_00001"):
        len(EmbeddingStore(tmp_path))
    assert store.load_chunk(0).shape == (2, 4)


def test_a_chunk_that_is_not_an_array_file_is_a_store_error_naming_it(tmp_path):
    written_store(tmp_path, [2, 2])
    (tmp_path / "chunk_00001.npy").write_bytes(b"this is not an npy file at all")
    with pytest.raises(StoreError, match=r"chunk_00001 in .* cannot be read"):
        len(EmbeddingStore(tmp_path))


def test_a_chunk_without_its_path_list_is_a_store_error_naming_it(tmp_path):
    written_store(tmp_path, [2, 2])
    (tmp_path / "chunk_00000.paths.txt").unlink()
    with pytest.raises(StoreError, match=r"chunk_00000 in .* has embeddings but no chunk_00000.paths.txt"):
        len(EmbeddingStore(tmp_path))


@pytest.mark.parametrize(
    "row, norm, refused", [(0, 1.05, True), (0, 0.97, True), (0, 1.005, False), (5, 2.0, True), (0, np.nan, True)]
)
def test_every_one_of_the_first_eight_rows_must_be_a_unit_vector_within_one_percent(tmp_path, row, norm, refused):
    store = EmbeddingStore.create(tmp_path, [f"/{i}.png" for i in range(6)], 6, INFO)
    vectors = unit_rows(6)
    vectors[row] *= norm
    store.write_chunk(0, vectors, [f"/{i}.png" for i in range(6)], {})
    if refused:
        with pytest.raises(StoreError, match=rf"chunk_00000 .*row {row} has norm"):
            len(EmbeddingStore(tmp_path))
    else:
        assert len(EmbeddingStore(tmp_path)) == 6


def test_a_store_whose_first_chunk_all_failed_takes_its_dim_from_a_later_chunk(tmp_path):
    """The embed stage writes a chunk whose every image failed as a ``(0, 0)`` array."""
    store = EmbeddingStore.create(tmp_path, ["/a.png", "/b.png", "/c.png", "/d.png"], 2, INFO)
    store.write_chunk(0, np.zeros((0, 0), dtype=np.float32), [], {"/a.png": "bad", "/b.png": "bad"})
    store.write_chunk(1, unit_rows(2), ["/c.png", "/d.png"], {})
    store = EmbeddingStore(tmp_path)
    assert store.dim == 4 and len(store) == 2
    np.testing.assert_array_equal(store.read(np.array([1, 0])), unit_rows(2)[[1, 0]])
    assert store.failed() == {"/a.png": "bad", "/b.png": "bad"}


def test_a_store_where_every_image_failed_has_no_dim(tmp_path):
    store = EmbeddingStore.create(tmp_path, ["/a.png", "/b.png"], 1, INFO)
    for c, path in enumerate(["/a.png", "/b.png"]):
        store.write_chunk(c, np.zeros((0, 0), dtype=np.float32), [], {path: "bad"})
    with pytest.raises(StoreError, match=r"holds no embeddings \(every image failed to load\)"):
        _ = EmbeddingStore(tmp_path).dim


def test_an_unfinished_store_names_its_first_missing_chunk(tmp_path):
    store = EmbeddingStore.create(tmp_path, [f"/{i}.png" for i in range(6)], 2, INFO)
    store.write_chunk(0, unit_rows(2), ["/0.png", "/1.png"], {})
    with pytest.raises(StoreError, match=r"2 of 3 chunks are not written yet \(e.g. chunk_00001\)"):
        len(EmbeddingStore(tmp_path))


def test_paths_of_the_first_id_of_each_chunk_come_from_that_chunk(tmp_path):
    store = written_store(tmp_path, [3, 2, 3])  # offsets 0, 3, 5, 8
    assert store.paths(np.array([5, 3, 0])) == ["/img/0_0.png", "/img/1_0.png", "/img/2_0.png"]
    assert store.paths(np.array([2, 4, 7])) == ["/img/0_2.png", "/img/1_1.png", "/img/2_2.png"]


def test_a_sample_is_sorted_distinct_and_drawn_only_from_the_kept_ids(tmp_path):
    store = written_store(tmp_path, [6, 6, 6])
    keep = np.zeros(18, dtype=bool)
    keep[[1, 4, 5, 9, 11, 12, 16]] = True
    for seed in range(5):
        sample = store.sample_ids(4, seed, keep)
        assert len(sample) == 4 and len(set(sample.tolist())) == 4
        assert np.all(np.diff(sample) > 0) and keep[sample].all()
        free = store.sample_ids(10, seed)
        assert len(free) == 10 and np.all(np.diff(free) > 0) and free.min() >= 0 and free.max() < 18
    np.testing.assert_array_equal(store.sample_ids(7, 0, keep), np.nonzero(keep)[0])  # all of them
    np.testing.assert_array_equal(store.sample_ids(50, 0), np.arange(18))


# Planted copies -------------------------------------------------------------------------------------
def gradient(width: int, height: int) -> Image.Image:
    """An RGB image whose pixels are all distinct, to see which of them a copy kept."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    return Image.fromarray(np.stack([x, y, (x * 7 + y * 3) % 256], axis=-1).astype(np.uint8))


def test_a_random_picture_has_the_size_asked_for(tmp_path):
    assert random_picture(3).size == (64, 64)
    assert random_picture(3, size=40).size == (40, 40) and random_picture(3, size=40).mode == "RGB"


def test_random_pictures_hold_flat_filled_shapes_over_the_smooth_field():
    """Six filled shapes, each at least 7 x 7 pixels before clipping: some colour covers a patch of many
    pixels, where a bicubic field interpolated from random colours repeats a colour on a few pixels."""
    for seed in range(6):
        pixels = np.asarray(random_picture(seed)).reshape(-1, 3)
        _, counts = np.unique(pixels, axis=0, return_counts=True)
        assert counts.max() >= 40, seed


def test_an_exact_copy_is_a_new_image_with_the_same_pixels():
    original = random_picture(1)
    copy = altered_copy(original, "exact")
    assert copy is not original and np.array_equal(np.asarray(copy), np.asarray(original))
    before = original.getpixel((0, 0))
    copy.putpixel((0, 0), tuple(255 - c for c in before))  # drawing on the copy leaves the original alone
    assert original.getpixel((0, 0)) == before


def test_a_jpeg_copy_is_the_image_re_encoded_at_quality_60():
    original = random_picture(2)
    buffer = io.BytesIO()
    original.save(buffer, "JPEG", quality=60)
    expected = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    copy = altered_copy(original, "jpeg")
    assert copy.mode == "RGB" and np.array_equal(np.asarray(copy), expected)


def test_a_resized_copy_is_seventy_percent_of_each_side():
    assert altered_copy(gradient(64, 64), "resized").size == (44, 44)  # 44.8 rounded down
    assert altered_copy(gradient(100, 50), "resized").size == (70, 35)


def test_a_cropped_copy_cuts_six_percent_of_the_width_from_the_left_and_bottom_and_half_that_elsewhere():
    original = gradient(100, 50)  # m = 6 (from the width): left 6, top 3, right 3, bottom 6
    copy = altered_copy(original, "cropped")
    assert copy.size == (91, 41)
    np.testing.assert_array_equal(np.asarray(copy), np.asarray(original)[3:44, 6:97])
    assert altered_copy(gradient(10, 10), "cropped").size == (9, 9)  # at least one pixel: left 1, top 0


def test_an_unknown_copy_kind_is_a_value_error_naming_the_kinds():
    with pytest.raises(ValueError, match=r"copy kind must be one of \('exact', 'jpeg', 'resized', 'cropped'\)"):
        altered_copy(random_picture(0), "rotated")


def test_ids_outside_the_store_are_a_store_error_naming_the_range(tmp_path):
    # read() used to report chunk_-0001 as unreadable for id -1; paths() dropped such ids silently
    store = written_store(tmp_path, [2, 1])  # 3 vectors: ids 0, 1, 2
    for ids, count, example in (([0, -1], 1, -1), ([3], 1, 3), ([2, 5, 9], 2, 5)):
        message = rf"holds 3 vectors \(ids 0 to 2\); {count} requested ids are outside that range, e.g. {example}"
        with pytest.raises(StoreError, match=message):
            store.read(np.array(ids))
        with pytest.raises(StoreError, match=r"outside that range"):
            store.paths(np.array(ids))
    assert store.paths(np.array([2, 0])) == ["/img/0_0.png", "/img/1_0.png"]
