"""Evaluation test fixtures: the micro ViT's config overrides, one-thread torch, logger reset."""

from __future__ import annotations

import pytest
import torch
from eval_micro import MICRO_OPTS


@pytest.fixture
def micro_arch():
    """The config overrides that select the micro ViT (dim 32, depth 2, patch 8, 32 px)."""
    return list(MICRO_OPTS)


@pytest.fixture
def one_thread():
    """Single-threaded torch for the test: small ops on a busy 2-core machine are far faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_dinov2_logger(dinov2_logger):
    """Every evaluation test gives the ``dinov2`` logger back as it found it (tests/conftest.py)."""
