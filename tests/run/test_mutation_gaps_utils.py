"""Run utilities: behaviour a mutation audit found untested (the logger's per-rank console level,
file name and isolation from the root logger, durations rounded to the second and days in the
singular, non-finite metrics kept out of TensorBoard, blank lines in the metrics file, one-line error
descriptions, and the CPU peak-memory figure in MiB)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_logging import _fake_tensorboard

from dinov2.utils.device import peak_memory_mb
from dinov2.utils.logging import MetricsWriter, describe_error, format_duration, setup_logging


def test_a_rank_other_than_0_logs_warnings_only_to_the_console_and_everything_to_its_own_file(
    tmp_path, capsys, dinov2_logger, log_messages
):
    root = log_messages("")
    logger = setup_logging(tmp_path, rank=3)
    logger.info("an info line")
    logger.warning("a warning line")
    for handler in logger.handlers:
        handler.flush()
    console = capsys.readouterr().out
    assert "a warning line" in console and "an info line" not in console
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.rank3.txt"]
    logged = (tmp_path / "log.rank3.txt").read_text()
    assert "an info line" in logged and "a warning line" in logged
    assert root == []  # not also handed to the root logger (each line would print twice)


def test_rank_0_logs_info_to_the_console(tmp_path, capsys, dinov2_logger):
    setup_logging(tmp_path, rank=0).info("an info line")
    assert "an info line" in capsys.readouterr().out


@pytest.mark.parametrize(
    "seconds, expected",
    [
        (59.6, "0:01:00"),  # rounded to the nearest second, not cut
        (3599.5, "1:00:00"),
        (86400 + 3725, "1 day, 1:02:05"),
        (2 * 86400 + 5, "2 days, 0:00:05"),
        (-3.0, "0:00:00"),
        (math.inf, "?"),
    ],
)
def test_durations_are_rounded_to_the_second_with_days_in_the_singular_and_plural(seconds, expected):
    assert format_duration(seconds) == expected


def test_non_finite_metrics_are_kept_out_of_tensorboard_but_written_to_the_file(tmp_path, monkeypatch):
    opened = _fake_tensorboard(monkeypatch)
    writer = MetricsWriter(tmp_path)
    writer.write(5, {"loss": 1.5, "grad_norm": math.nan, "lr": math.inf, "step": 2, "note": "x"})
    assert opened[0]["scalars"] == [("loss", 1.5, 5), ("step", 2, 5)]
    assert '"grad_norm": NaN' in writer.path.read_text()


def test_blank_lines_in_the_metrics_file_are_not_counted_as_torn_records(tmp_path, log_messages):
    messages = log_messages()
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.path.write_text('{"iteration": 1, "loss": 1.0}\n\n{"iteration": 2, "loss": 2.0}\n\n')
    writer.truncate_after(5)
    assert writer.path.read_text() == '{"iteration": 1, "loss": 1.0}\n{"iteration": 2, "loss": 2.0}\n'
    assert not [m for m in messages if "not whole records" in m]


def test_an_error_is_described_by_its_type_and_the_first_line_of_its_message():
    assert describe_error(ValueError("first line\nsecond line")) == "ValueError: first line"
    assert describe_error(RuntimeError("")) == "RuntimeError: "
    assert describe_error(OSError("x" * 900), limit=20) == "OSError: " + "x" * 11


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak from /proc (Linux)")
def test_the_cpu_peak_memory_is_the_process_peak_resident_size_in_mib():
    block = np.ones(64 * 2**20 // 8)  # touch 64 MiB, so that the peak is at least that
    peak = peak_memory_mb(torch.device("cpu"))
    block.sum()
    status = Path("/proc/self/status").read_text()
    high_water_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
    assert peak == pytest.approx(high_water_kib / 1024, rel=0.05)
    assert peak >= 64
