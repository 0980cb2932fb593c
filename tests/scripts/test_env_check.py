"""scripts/device/env_check.py: what it has found is on disk before it runs xFormers' kernels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def test_the_report_is_written_before_the_xformers_probe_can_crash_the_process(tmp_path):
    """An xFormers built for another torch may kill the process inside its kernel (a segfault): the
    software part of the report must already be on disk, marked incomplete."""
    output = tmp_path / "env.json"
    crash = f"""
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("env_check", {str(SCRIPTS / "device" / "env_check.py")!r})
env_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(env_check)
env_check.resolve_backend = env_check.attention_failure = lambda *args, **kwargs: os._exit(139)  # a crash
env_check.main(["--output", {str(output)!r}])
"""
    proc = subprocess.run([sys.executable, "-c", crash], cwd=SCRIPTS.parent, capture_output=True, text=True)
    assert proc.returncode == 139, proc.stderr
    report = json.loads(output.read_text())
    assert report["complete"] is False and report["versions"]["torch"] and "xformers_importable" in report


def test_a_part_that_raises_is_recorded_and_the_report_completes(script, tmp_path, monkeypatch):
    env_check = script("device/env_check.py", "env_check_for_test")

    def broken(*args, **kwargs):
        raise RuntimeError("no operator for this device")

    monkeypatch.setattr(env_check, "resolve_backend", broken)
    report = env_check.main(["--output", str(tmp_path / "env.json")])
    on_disk = json.loads((tmp_path / "env.json").read_text())
    assert on_disk["complete"] is True and "auto_backend" not in on_disk
    assert "no operator for this device" in on_disk["errors"]["auto_backend"]
    assert report["errors"] == on_disk["errors"]


def test_the_report_says_why_xformers_does_not_import(script, tmp_path, monkeypatch, capsys):
    """``xformers_importable: false`` alone sent a device session looking for the cause (a CUDA runtime
    the wheel lacks, a torch it was not built for); the import error itself is now in the report."""
    env_check = script("device/env_check.py", "env_check_for_import_error")
    why = "ImportError: libcudart.so.12: cannot open shared object file"
    monkeypatch.setattr(env_check, "xformers_available", lambda: False)
    monkeypatch.setattr(env_check, "xformers_import_error", lambda: why)
    env_check.main(["--output", str(tmp_path / "env.json")])
    on_disk = json.loads((tmp_path / "env.json").read_text())
    assert on_disk["xformers_importable"] is False and on_disk["xformers_import_error"] == why
    assert f"xformers_import_error: {why}" in capsys.readouterr().out
