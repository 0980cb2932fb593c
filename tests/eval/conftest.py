"""Evaluation test fixtures: the micro ViT registered as an architecture, one-thread torch, logger reset."""

from __future__ import annotations

import logging

import pytest
import torch
from eval_micro import MICRO_ARCH, MICRO_OPTS, micro_arch_builder

from dinov2.models.vision_transformer import ARCHS


@pytest.fixture
def micro_arch(monkeypatch):
    """Registers the micro ViT (dim 32, depth 2) as an architecture for this test; returns the config
    overrides that select it."""
    monkeypatch.setitem(ARCHS, MICRO_ARCH, micro_arch_builder)
    return list(MICRO_OPTS)


@pytest.fixture
def one_thread():
    """Single-threaded torch for the test: small ops on a busy 2-core machine are far faster so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _restore_dinov2_logger():
    """Entry points configure the ``dinov2`` logger; give later tests (and caplog) the original back."""
    logger = logging.getLogger("dinov2")
    state = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = state
