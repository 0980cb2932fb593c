"""dinov2/ops/xformers.py: a probe of an xFormers op that raises says why it falls back to the native path."""

from __future__ import annotations

import logging

import torch

import dinov2.ops.xformers as xf


def test_a_probe_that_raises_is_logged_with_its_reason(monkeypatch):
    """Both probes used to return False silently (a bare ``except Exception``): on a GPU machine an
    xFormers release with a renamed op fell back to the native path with no trace of why."""
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("dinov2")
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel, not the attribute: it also clears the logger's level cache
    logger.addHandler(handler)
    try:
        monkeypatch.setattr(xf, "xformers_available", lambda: True)

        class NoIndexing:  # a release without xformers.ops.indexing
            @staticmethod
            def import_module(name):
                raise ModuleNotFoundError(f"No module named {name!r}")

        monkeypatch.setattr(xf, "importlib", NoIndexing)
        assert xf.scaled_index_add_usable.__wrapped__() is False  # uncached: the cached probe is untouched

        class Ops:  # a release whose dispatcher takes other arguments
            SwiGLUEagerOp = object()

            def SwiGLUOpDispatch(**kwargs):  # noqa: N802 - xFormers' name
                raise TypeError("__init__() got an unexpected keyword argument 'packed_weights'")

        monkeypatch.setattr(xf, "xformers_ops", lambda: Ops)
        assert xf.fused_swiglu_usable.__wrapped__("cuda", torch.bfloat16, True) is False
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert [r.getMessage() for r in records] == [
        "xFormers' scaled_index_add cannot be used (ModuleNotFoundError: No module named 'xformers.ops.indexing'): "
        "the native index_add_ runs",
        "xFormers' SwiGLUOpDispatch cannot be used (TypeError: __init__() got an unexpected keyword argument "
        "'packed_weights'): the native SwiGLU runs",
    ]
