"""What every benchmark script under scripts/ records beside its figures: the device, the software,
the commit, the date and the command, and where the JSON report goes."""

from __future__ import annotations

import contextlib
import datetime
import gc
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def cpu_name() -> str:
    """``model name`` from /proc/cpuinfo, else what :mod:`platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    """Short hash of the checkout's HEAD (None outside a git checkout), whatever the working directory."""
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, check=True)
        return out.stdout.decode().strip() or None
    return None


def command_line(script: str | None = None, argv: Sequence[str] | None = None) -> str:
    """The command that ran: ``script`` (a path, shown relative to the repository) with ``argv``
    when given (a script's ``main(argv)`` called from Python), else this process's ``sys.argv``."""
    if argv is None:
        return shlex.join([sys.executable, *sys.argv])
    path = Path(script or sys.argv[0]).resolve()
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return shlex.join([sys.executable, str(shown), *argv])


def environment(device: torch.device, script: str | None = None, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Device, software versions, thread count, commit, date and command line of this run
    (:func:`command_line` of ``script`` and ``argv``)."""
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "num_threads": torch.get_num_threads(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(script, argv),
    }


def xformers_skip_reason(device: torch.device) -> str | None:
    """Why a benchmark cannot time the ``xformers`` attention backend on ``device``, or None when it
    can: xFormers has kernels on CUDA only, and must import (``DINOV2_DISABLE_XFORMERS`` unset)."""
    from dinov2.ops.xformers import xformers_import_error

    if device.type != "cuda":
        return f"xformers has no kernels for device {device.type!r} (needs CUDA)"
    error = xformers_import_error()
    return None if error is None else f"xformers cannot be imported ({error})"


def usable_backends(backends: Sequence[str], device: torch.device, script: str) -> tuple[list[str], dict[str, str]]:
    """``(backends to time, {skipped backend: reason})`` for a benchmark's requested attention
    ``backends``: an ``xformers`` that cannot run on ``device`` (:func:`xformers_skip_reason`) is left
    out with a note, and is not a failed row. When nothing is left, ``SystemExit`` naming ``script``:
    zero rows and exit status 0 would read as a run that measured nothing wrong."""
    reason = xformers_skip_reason(device) if "xformers" in backends else None
    if reason is None:
        return list(backends), {}
    print(f"note: skipping the xformers backend: {reason}", flush=True)
    left = [b for b in backends if b != "xformers"]
    if not left:
        raise SystemExit(f"{script}: no backend left to time: {reason}")
    return left, {"xformers": reason}


def release(device: torch.device) -> None:
    """Free what a finished or failed benchmark row left allocated, before the next row."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_report(path: Path, report: dict[str, Any], quiet: bool = False) -> None:
    """Write the JSON report atomically (folders created; a reader never sees half a file) and say where."""
    from dinov2.eval.metrics import write_json_atomic  # the one atomic JSON writer

    write_json_atomic(Path(path), report)
    if not quiet:
        print(f"wrote {path}")
