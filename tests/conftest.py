"""Shared test setup: automatic skips for hardware markers, deterministic seeds, tiny models."""

from __future__ import annotations

import pytest
import torch


def _xformers_usable() -> bool:
    from dinov2.ops.xformers import xformers_available

    return torch.cuda.is_available() and xformers_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_xformers = pytest.mark.skip(reason="needs xFormers on CUDA")
    has_cuda = torch.cuda.is_available()
    has_xformers = _xformers_usable() if any("xformers" in item.keywords for item in items) else False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)
        if "xformers" in item.keywords and not has_xformers:
            item.add_marker(skip_xformers)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


TINY_VIT = dict(
    img_size=32,
    patch_size=8,
    embed_dim=64,
    depth=2,
    num_heads=4,
    init_values=1.0,
    block_chunks=0,
)


@pytest.fixture
def tiny_vit_kwargs():
    return dict(TINY_VIT)
