"""dinov2/utils/benchmark.py: the one decision every benchmark makes about a requested xformers backend."""

from __future__ import annotations

import pytest
import torch

import dinov2.ops.xformers as xformers_module
from dinov2.utils.benchmark import usable_backends, xformers_skip_reason

CUDA = torch.device("cuda", 0)  # only compared by type: nothing here touches a GPU


def test_the_reason_names_the_device_or_the_import_error(monkeypatch):
    monkeypatch.setattr(xformers_module, "xformers_import_error", lambda: None)
    assert xformers_skip_reason(CUDA) is None
    assert xformers_skip_reason(torch.device("cpu")) == "xformers has no kernels for device 'cpu' (needs CUDA)"
    monkeypatch.setattr(xformers_module, "xformers_import_error", lambda: "disabled by DINOV2_DISABLE_XFORMERS=1")
    assert xformers_skip_reason(CUDA) == "xformers cannot be imported (disabled by DINOV2_DISABLE_XFORMERS=1)"


def test_xformers_is_dropped_with_its_reason_and_nothing_left_stops(monkeypatch, capsys):
    monkeypatch.setattr(xformers_module, "xformers_import_error", lambda: "ModuleNotFoundError: No module named 'x'")
    assert usable_backends(["sdpa", "math"], CUDA, "bench") == (["sdpa", "math"], {})  # not asked for: not checked
    backends, skipped = usable_backends(["xformers", "sdpa", "varlen"], CUDA, "bench")
    assert backends == ["sdpa", "varlen"]
    assert skipped == {"xformers": "xformers cannot be imported (ModuleNotFoundError: No module named 'x')"}
    assert "note: skipping the xformers backend: xformers cannot be imported" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"^bench: no backend left to time: xformers cannot be imported \("):
        usable_backends(["xformers"], CUDA, "bench")
    monkeypatch.setattr(xformers_module, "xformers_import_error", lambda: None)
    assert usable_backends(["xformers", "sdpa"], CUDA, "bench") == (["xformers", "sdpa"], {})


def test_the_disable_variable_reaches_the_reason(monkeypatch):
    """``DINOV2_DISABLE_XFORMERS=1`` (read once per process, so the cache is cleared around it) is named."""
    monkeypatch.setenv(xformers_module.DISABLE_VARIABLE, "1")
    xformers_module._try_import.cache_clear()
    try:
        assert xformers_module.xformers_import_error() == "disabled by DINOV2_DISABLE_XFORMERS=1"
        assert xformers_skip_reason(CUDA) == "xformers cannot be imported (disabled by DINOV2_DISABLE_XFORMERS=1)"
    finally:
        monkeypatch.undo()  # the variable as it was (set, under scripts/device/gpu_checks.py's GPU tests)
        xformers_module._try_import.cache_clear()
