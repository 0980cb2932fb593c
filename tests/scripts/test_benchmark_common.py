"""dinov2/utils/benchmark.py: the one decision every benchmark makes about a requested xformers backend,
and what each report records of the machine and the command."""

from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dinov2.ops.xformers as xformers_module
from dinov2.utils.benchmark import (
    REPO,
    command_line,
    cpu_name,
    device_name,
    git_commit,
    usable_backends,
    write_report,
    xformers_skip_reason,
)

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


def test_the_cpu_is_named_by_its_model_name_line_with_the_thread_count():
    # /proc/cpuinfo lists "model : 1" before "model name : ..." on x86: only the latter is the name
    info = Path("/proc/cpuinfo")
    names = [line for line in info.read_text().splitlines() if line.startswith("model name")] if info.is_file() else []
    expected = names[0].split(":", 1)[1].strip() if names else platform.processor() or platform.machine() or "cpu"
    assert cpu_name() == expected
    assert device_name(torch.device("cpu")) == f"{expected} ({torch.get_num_threads()} threads)"


def test_the_commit_is_the_checkouts_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git checkout
    if not (REPO / ".git").exists():
        assert git_commit() is None
        return
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert git_commit() == head.stdout.strip() and "\n" not in git_commit()


def test_the_command_line_quotes_its_arguments_and_shows_scripts_relative_to_the_repository(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scripts/benchmark_train.py", "--name", "two words"])
    assert shlex.split(command_line()) == [sys.executable, "scripts/benchmark_train.py", "--name", "two words"]
    called = command_line(str(REPO / "scripts" / "benchmark_data.py"), ["--batch-size", "8", "a b"])
    assert shlex.split(called) == [sys.executable, "scripts/benchmark_data.py", "--batch-size", "8", "a b"]
    outside = tmp_path / "mine.py"
    assert shlex.split(command_line(str(outside), [])) == [sys.executable, str(outside)]


def test_the_report_is_written_whole_and_said_unless_quiet(tmp_path, capsys):
    report = {"rows": [{"images_per_s": 12.5}], "environment": {"device": "cpu"}}
    write_report(tmp_path / "deep" / "report.json", report)
    assert json.loads((tmp_path / "deep" / "report.json").read_text()) == report
    assert capsys.readouterr().out == f"wrote {tmp_path / 'deep' / 'report.json'}\n"
    write_report(tmp_path / "quiet.json", report, quiet=True)
    assert capsys.readouterr().out == "" and (tmp_path / "quiet.json").is_file()
