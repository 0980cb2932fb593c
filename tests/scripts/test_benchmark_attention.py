"""scripts/benchmark_attention.py on CPU: tiny token groups, one timed iteration per row."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

import dinov2.ops

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "benchmark_attention.py"

# vit_small's geometry (6 heads of 64) on 2 x 2 crops of 1 + (32/8)^2 = 17 tokens and 2 x 2 of 1 + (16/8)^2 = 5.
TINY = ["--archs", "vit_small", "--patch-size", "8", "--global-size", "32", "--local-size", "16", "--n-local", "2"]
TINY += ["--batch-sizes", "2", "--dtypes", "fp32", "--modes", "forward", "--warmup", "0", "--iters", "1"]
TINY += ["--device", "cpu"]


@pytest.fixture(scope="module")
def bench(script):
    return script("benchmark_attention.py", "benchmark_attention")


def run_as_script(argv: list[str], monkeypatch) -> int:
    """Run scripts/benchmark_attention.py as ``python scripts/benchmark_attention.py ARGV``; its exit status."""
    monkeypatch.setattr("sys.argv", ["benchmark_attention.py", *argv])
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    return stopped.value.code


def test_xformers_that_cannot_run_is_skipped_with_its_reason(tmp_path, monkeypatch):
    """On CPU (no xFormers kernels, and no xFormers here) the xformers backend is skipped up front; the
    sdpa row is still timed and written, and a skipped backend is not a failure (exit status 0)."""
    output = tmp_path / "attention.json"
    status = run_as_script([*TINY, "--backends", "sdpa", "xformers", "--output", str(output)], monkeypatch)
    report = json.loads(output.read_text())
    assert status == 0 and report["complete"] and report["failed_rows"] == 0
    (row,) = report["rows"]
    assert row["backend"] == "sdpa" and "error" not in row and row["median_ms"] > 0
    assert row["groups"] == [[4, 17], [4, 5]]
    reason = report["skipped_backends"]["xformers"]
    assert "cannot be imported" in reason or "needs CUDA" in reason


def test_a_failing_row_is_recorded_the_others_still_run_and_the_exit_status_is_1(tmp_path, monkeypatch):
    """A backend whose kernel fails on the device (here: math, made to raise) becomes a row with an error;
    the rows after it are timed, the JSON holds them all, and the script exits with status 1."""
    real = dinov2.ops.nested_attention

    def math_fails(q, k, v, shapes, backend="auto"):
        if backend == "math":
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return real(q, k, v, shapes, backend=backend)

    monkeypatch.setattr(dinov2.ops, "nested_attention", math_fails)  # the script imports it from here
    output = tmp_path / "attention.json"
    status = run_as_script([*TINY, "--backends", "math", "sdpa", "--output", str(output)], monkeypatch)
    report = json.loads(output.read_text())
    assert status == 1 and report["complete"] and report["failed_rows"] == 1
    failed, timed = report["rows"]
    assert failed["backend"] == "math" and failed["error"].startswith("RuntimeError: CUDA error: no kernel image")
    assert "median_ms" not in failed
    assert timed["backend"] == "sdpa" and "error" not in timed and timed["median_ms"] > 0


def test_rows_already_timed_survive_a_run_stopped_midway(bench, tmp_path, monkeypatch):
    """A run killed at a time limit (here: interrupted in its second row) leaves the first row on disk."""
    real = bench.time_backend

    def stop_at_sdpa(shapes, heads, dim, dtype, backend, mode, args):
        if backend == "sdpa":
            raise KeyboardInterrupt  # not a row failure: the run itself stops
        return real(shapes, heads, dim, dtype, backend, mode, args)

    monkeypatch.setattr(bench, "time_backend", stop_at_sdpa)
    output = tmp_path / "attention.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main([*TINY, "--backends", "math", "sdpa", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["complete"] is False and [r["backend"] for r in saved["rows"]] == ["math"]
    assert saved["rows"][0]["median_ms"] > 0


@pytest.mark.parametrize("argv", [["--iters", "0"], ["--warmup", "-1"], ["--batch-sizes", "8", "0"]])
def test_bad_arguments_fail_with_a_message_naming_them(bench, capsys, argv):
    """--iters 0 used to make every row fail with a StatisticsError (median of no times) and exit 1."""
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args([*argv, "--device", "cpu"])
    assert stopped.value.code == 2 and argv[0] in capsys.readouterr().err


def test_the_report_records_the_command_of_main_argv(bench, tmp_path, monkeypatch):
    # main(argv) called from Python (as here) must record argv, not the pytest process's sys.argv.
    monkeypatch.setattr("sys.argv", ["pytest", "-q", "unrelated"])
    output = tmp_path / "attention.json"
    argv = [*TINY, "--backends", "sdpa", "--output", str(output)]
    bench.main(argv)
    command = json.loads(output.read_text())["environment"]["command"]
    assert command.endswith("scripts/benchmark_attention.py " + " ".join(argv)) and "unrelated" not in command


def test_xformers_alone_where_it_cannot_run_stops_with_the_reason(tmp_path, monkeypatch):
    """``--backends xformers`` on CPU used to time nothing, write an empty table and exit 0, which reads
    as a clean run; it now stops before any row with the reason (as scripts/benchmark_train.py does)."""
    output = tmp_path / "attention.json"
    status = run_as_script([*TINY, "--backends", "xformers", "--output", str(output)], monkeypatch)
    assert isinstance(status, str) and status.startswith("benchmark_attention: no backend left to time: xformers")
    assert "'cpu' (needs CUDA)" in status
    assert not output.exists()
