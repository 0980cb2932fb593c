"""Shared test setup: automatic skips for hardware markers, deterministic seeds, tiny models."""

from __future__ import annotations

import logging

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


@pytest.fixture(autouse=True)
def _restore_tf32():
    """Training and eval entry points switch TF32 on for CUDA (a run-start setting); a later fp32
    comparison on a GPU must not inherit it from whichever test ran before."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


_PROCESS_GROUP_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _no_leaked_process_group_variables():
    """A test that sets torchrun's variables in this process must not make later in-process runs
    try to join a process group that does not exist: restore them after every test."""
    import os

    saved = {k: os.environ.get(k) for k in _PROCESS_GROUP_VARS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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


@pytest.fixture(scope="session")
def dist_common():
    """tests/distributed/dist_common.py (the tiny training config, a free port, the world size) for
    tests outside that folder, loaded from its file without touching sys.path."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "dist_common", Path(__file__).parent / "distributed" / "dist_common.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def dinov2_logger():
    """The ``dinov2`` logger, its handlers, propagation and level given back after the test (entry
    points configure it; later tests and caplog need the original). Handlers the test added are closed."""
    logger = logging.getLogger("dinov2")
    state = (list(logger.handlers), logger.propagate, logger.level)
    yield logger
    for handler in set(logger.handlers) - set(state[0]):
        handler.close()
    logger.handlers[:], logger.propagate, logger.level = state


class _Messages(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def log_messages():
    """``log_messages(name)``: the list of messages the logger ``name`` handles from then on (DEBUG
    and up; ``""`` is the root logger). The handler is removed and the level given back after the test."""
    attached: list[tuple[logging.Logger, _Messages, int]] = []

    def collect(name: str = "dinov2") -> list[str]:
        logger = logging.getLogger(name)
        handler = _Messages()
        attached.append((logger, handler, logger.level))
        logger.addHandler(handler)
        if name:  # the root logger's level stays: it decides for every logger without its own
            logger.setLevel(logging.DEBUG)
        return handler.messages

    yield collect
    for logger, handler, level in reversed(attached):
        logger.removeHandler(handler)
        logger.setLevel(level)
