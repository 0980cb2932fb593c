"""scripts/benchmark_data.py on CPU: the transform table and one loader row per source, tiny sizes."""

from __future__ import annotations

import json

import pytest
import torch

TINY = ["--workers", "0", "--batch-size", "2", "--images", "3", "--synthetic-size", "64", "--jpeg-count", "2"]
TINY += ["--jpeg-size", "80", "60", "--transform-reps", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def bench(script):
    threads = torch.get_num_threads()
    yield script("benchmark_data.py", "benchmark_data")
    torch.set_num_threads(threads)  # the script sets it for the whole process


def test_rows_count_decoded_images_after_the_warm_up(bench, tmp_path):
    """--images 3 at batch 2 times ceil(3 / 2) = 2 batches (4 images) after one warm-up batch; images/s
    is those images over the timed seconds; the JSON records the commit and the command."""
    output = tmp_path / "data.json"
    bench.main([*TINY, "--output", str(output)])
    report = json.loads(output.read_text())
    assert report["git_commit"] and report["command"].endswith(f"--output {output}")
    assert [r["dataset"] for r in report["rows"]] == ["synthetic 64px", "jpeg 80x60"]
    for row in report["rows"]:
        assert row["workers"] == 0 and row["timed_images"] == 4
        assert row["img_s"] == pytest.approx(4 / row["timed_s"], rel=0.05, abs=0.5)  # timed_s is rounded
        assert row["img_s_per_worker"] == row["img_s"]  # the main process counts as one worker
    steps = {r["step"]: r["ms"] for r in report["transforms"]}
    assert steps["decode jpeg"] > 0 and "gaussian_blur 224" in steps and "solarize 96" in steps
    assert report["modelled_augmentation_ms_per_image"] > steps["random_resized_crop 224"]


@pytest.mark.parametrize(
    "argv, flag",
    [(["--transform-reps", "0"], "--transform-reps"), (["--batch-size", "0"], "--batch-size"),
     (["--workers", "0", "-2"], "--workers"), (["--jpeg-count", "0"], "--jpeg-count")],
)  # fmt: skip
def test_bad_arguments_fail_with_a_message_naming_them(bench, capsys, argv, flag):
    """--transform-reps 0 used to end in a StatisticsError after the JPEGs were written; --jpeg-count 0 in
    a StopIteration (no image to time the transforms on)."""
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(argv)
    assert stopped.value.code == 2 and flag in capsys.readouterr().err
