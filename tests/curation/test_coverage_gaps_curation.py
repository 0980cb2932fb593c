"""Curation refusals that a line-coverage pass of the suite found unexercised, each naming what is
wrong: an empty image source, a thumbnail under 2 px, an embedding dtype other than float16/32,
hierarchy levels that are not a list of integers, curation without faiss installed, vectors and ids
of different counts, and an unknown stage."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from test_curation_dedup import config

from dinov2.curation import clustering, faiss_index
from dinov2.curation.embed import ThumbnailEmbedder, embed_images, list_images
from dinov2.curation.pipeline import Curation


def test_an_empty_image_source_is_refused_and_says_what_a_source_is():
    with pytest.raises(ValueError, match=r"no image source given \(a folder, a list file or a dataset string\)"):
        list_images("")


def test_a_thumbnail_under_two_pixels_is_refused_and_two_is_enough():
    with pytest.raises(ValueError, match="thumbnail_size must be >= 2, got 1"):
        ThumbnailEmbedder(1)
    assert ThumbnailEmbedder(2).size == 2


def test_an_embedding_dtype_other_than_float16_or_float32_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "pool").mkdir()
    with pytest.raises(ValueError, match="embedding dtype must be float16 or float32, got 'bfloat16'"):
        embed_images(str(tmp_path / "pool"), tmp_path / "emb", config().embed.model, dtype="bfloat16")
    assert not (tmp_path / "emb").exists()


@pytest.mark.parametrize("levels", [8, "8,2", [8, True], [8, 2.0]])
def test_hierarchy_levels_that_are_not_a_list_of_integers_are_refused(levels):
    with pytest.raises(ValueError, match=r"clustering.levels must be a list of integers \(level 1 first\), got"):
        clustering.check_levels(levels)


def test_curation_without_faiss_says_which_package_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # as if faiss were not installed
    with pytest.raises(ImportError, match="data curation needs faiss: pip install faiss-cpu .* or faiss-gpu"):
        faiss_index.import_faiss()


def test_vectors_and_ids_of_different_counts_are_refused_and_nothing_is_added():
    index = faiss_index.VectorIndex(dim=4)
    with pytest.raises(ValueError, match="3 vectors for 2 ids"):
        index.add(np.eye(3, 4, dtype=np.float32), np.array([0, 1]))
    assert index.index.ntotal == 0


def test_an_unknown_stage_is_refused_naming_the_stages(tmp_path):
    with pytest.raises(ValueError, match="unknown stage 'cluster_all'; stages: embed, dedup, cluster, retrieve"):
        Curation(config(), tmp_path).run("cluster_all")
    assert list(tmp_path.iterdir()) == []
