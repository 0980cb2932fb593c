"""scripts/benchmark_backbone.py on CPU: a ViT-Ti/16 on 32 px inputs (4 patches), one row per mode."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

TINY = ["--archs", "vit_tiny", "--patch-size", "16", "--img-size", "32", "--resolutions", "32"]
TINY += ["--batch-sizes", "2", "--dtypes", "fp32", "--backends", "sdpa", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="module")
def bench(script):
    threads = torch.get_num_threads()
    yield script("benchmark_backbone.py", "benchmark_backbone")
    torch.set_num_threads(threads)  # --threads sets it for the whole process


def test_rows_images_per_second_and_the_environment(bench, tmp_path):
    """images/s = batch / median of the timed iterations (warm-up excluded); the JSON records the
    commit and the command that was run. (Without --compare-hf: importing transformers alone takes
    seconds; the script checks its HF weight mapping itself, ``max_abs_cls_diff_vs_hf``.)"""
    output = tmp_path / "backbone.json"
    argv = [*TINY, "--modes", "forward", "forward_backward", "--warmup", "1", "--iters", "3", "--no-compare-hf"]
    bench.main([*argv, "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["git_commit"] and report["command"].endswith(" ".join(argv + ["--output", str(output)]))
    assert [r["mode"] for r in report["rows"]] == ["forward", "forward_backward"]
    for row in report["rows"]:
        times = row["ours_times_s"]
        assert len(times) == 3  # the warm-up iteration is not among them
        assert row["ours_img_s"] == pytest.approx(2 / statistics.median(times))
        assert row["ours_best_img_s"] == pytest.approx(2 / min(times))
        assert row["ours_ms_iter"] == pytest.approx(1e3 * statistics.median(times))
        assert "hf_img_s" not in row and row["ours_peak_mem_mib"] > 0


@pytest.mark.parametrize(
    "argv, flag",
    [(["--iters", "0"], "--iters"), (["--warmup", "-1"], "--warmup"), (["--batch-sizes", "4", "0"], "--batch-sizes")],
)
def test_bad_arguments_fail_with_a_message_naming_them(bench, capsys, argv, flag):
    """--iters 0 used to end in a StatisticsError (median of no times) after the models were built."""
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(argv)
    assert stopped.value.code == 2 and flag in capsys.readouterr().err


def test_a_failing_row_is_recorded_and_the_others_still_run(bench, tmp_path, monkeypatch):
    """Out of memory (or an xFormers kernel that does not run on the GPU) in one row used to end the
    run before the JSON, written only at the end, held anything: now the row carries the error, the
    next row is timed, and the report (rewritten after every row) counts the failed row."""
    real = bench.bench_row
    seen = []

    def out_of_memory_forward(models, cfg, args):
        if cfg["mode"] == "forward":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(models, cfg, args)

    def progress_spy(path, report, quiet=False):
        seen.append((report["complete"], [r["mode"] for r in report["rows"]]))
        write(path, report, quiet)

    write = bench.write_report
    monkeypatch.setattr(bench, "bench_row", out_of_memory_forward)
    monkeypatch.setattr(bench, "write_report", progress_spy)
    output = tmp_path / "backbone.json"
    argv = [*TINY, "--modes", "forward", "forward_backward", "--warmup", "0", "--iters", "1", "--no-compare-hf"]
    report = bench.main([*argv, "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["complete"] and saved["failed_rows"] == 1 == report["failed_rows"]
    failed, timed = saved["rows"]
    assert failed["mode"] == "forward" and failed["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert timed["mode"] == "forward_backward" and "error" not in timed and timed["ours_img_s"] > 0
    assert seen[:2] == [(False, ["forward"]), (False, ["forward", "forward_backward"])]  # kept as each row lands


def test_a_skipped_xformers_is_in_the_report_and_xformers_alone_stops(bench, tmp_path):
    """The skip used to be a console note only (no ``skipped_backends`` in the JSON, unlike the attention
    and training benchmarks), and ``--backends xformers`` on CPU wrote zero rows with exit status 0."""
    output = tmp_path / "backbone.json"
    argv = [*TINY, "--modes", "forward", "--warmup", "0", "--iters", "1", "--no-compare-hf", "--output", str(output)]
    report = bench.main([*argv, "--backends", "sdpa", "xformers"])
    assert [row["backend"] for row in report["rows"]] == ["sdpa"] and report["failed_rows"] == 0
    assert "'cpu' (needs CUDA)" in json.loads(output.read_text())["skipped_backends"]["xformers"]
    with pytest.raises(SystemExit, match=r"benchmark_backbone: no backend left to time: xformers .*'cpu'"):
        bench.main([*argv, "--backends", "xformers"])
