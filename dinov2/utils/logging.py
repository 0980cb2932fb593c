"""Run logging: a console + file logger, and the per-iteration metrics stream.

:class:`MetricsWriter` appends one JSON object per logged iteration to
``OUTPUT/training_metrics.json`` (JSON lines, like the original) and mirrors scalars to TensorBoard
when the ``tensorboard`` package is installed. Only the main process writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

LOGGER_NAME = "dinov2"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Formatter(logging.Formatter):
    """A formatter whose lines always encode: a file name that is not valid UTF-8 reaches Python as
    lone surrogates (``caf\\udce9.png``), which a UTF-8 stream refuses, so the warning naming that
    file would be dropped with a "Logging error". Such characters are written as escapes."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).encode("utf-8", "backslashreplace").decode("utf-8")


def setup_logging(
    output_dir: str | os.PathLike | None = None, rank: int = 0, level: int = logging.INFO
) -> logging.Logger:
    """Configure the ``dinov2`` logger: console on rank 0 (warnings only elsewhere) and
    ``OUTPUT/log.txt`` (``log.rank{N}.txt`` on other ranks). Idempotent: old handlers are replaced."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.setFormatter(_Formatter(_FORMAT, datefmt="%H:%M:%S"))
    logger.addHandler(console)
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        name = "log.txt" if rank == 0 else f"log.rank{rank}.txt"
        file_handler = logging.FileHandler(Path(output_dir) / name, encoding="utf-8")
        file_handler.setFormatter(_Formatter(_FORMAT))
        logger.addHandler(file_handler)
    return logger


def format_duration(seconds: float) -> str:
    """``3725`` -> ``1:02:05``; ``93784`` -> ``1 day, 2:03:04``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(max(seconds, 0.0)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days} day{'s' if days > 1 else ''}, {clock}" if days else clock


class MetricsWriter:
    """JSON-lines metrics file (plus TensorBoard when available); a no-op when not ``enabled``."""

    def __init__(self, output_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(output_dir) / "training_metrics.json"
        self._tb_dir = Path(output_dir) / "tensorboard"
        self._tb = None
        self._tb_enabled = enabled and tensorboard  # the writer is opened at the first record
        self._purge_step: int | None = None

    def _tensorboard(self):
        """The SummaryWriter (None without the tensorboard package), opened on first use so that a
        resume's :meth:`truncate_after` can still hand it ``purge_step``."""
        if self._tb is None and self._tb_enabled:
            self._tb_enabled = False  # one attempt
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                return None
            self._tb = SummaryWriter(log_dir=str(self._tb_dir), purge_step=self._purge_step)
        return self._tb

    def truncate_after(self, iteration: int) -> None:
        """Drop records logged after ``iteration`` (a resumed run rewrites them), and any line that
        is not a whole record (the last one, torn when a run was killed while appending it). The
        file is replaced atomically: an interruption here leaves the old file, never a partial one.
        TensorBoard drops its events after ``iteration`` too (``purge_step``), once this run logs."""
        if not self.enabled:
            return
        if self._tb is None:
            self._purge_step = int(iteration) + 1
        if not self.path.is_file():
            return
        kept, torn = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                keep = int(record["iteration"]) <= iteration
            except (ValueError, TypeError, KeyError):
                torn += 1
                continue
            if keep:
                kept.append(line)
        if torn:
            logging.getLogger(LOGGER_NAME).warning(
                "%s: dropped %d line(s) that are not whole records (a run killed while writing)", self.path, torn
            )
        from dinov2.checkpoint.training import atomic_write  # the project's one atomic replace

        text = "".join(line + "\n" for line in kept).encode()
        atomic_write(self.path, lambda handle: handle.write(text))

    def write(self, iteration: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"iteration": int(iteration), **metrics}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and math.isfinite(value):
                    tb.add_scalar(key, value, iteration)
            tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def describe_error(error: BaseException, limit: int = 500) -> str:
    """One line for a log or a report: the exception's type and the first line of its message."""
    message = str(error).strip()
    first = message.splitlines()[0] if message else ""
    return f"{type(error).__name__}: {first}"[:limit]
