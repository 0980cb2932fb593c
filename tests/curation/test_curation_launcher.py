"""The SLURM launcher of the curation pipeline: argument splitting, early config errors, and a real
two-task job through submitit's local executor (both tasks embed, rank 0 finishes the pipeline)."""

from __future__ import annotations

import re
import time

import pytest
from curation_images import write_pool

from dinov2.curation.store import EmbeddingStore
from dinov2.run import submit as launcher
from dinov2.run.curation import curate

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
THUMBNAILS = ["embed.model.kind=thumbnail", "embed.num_workers=0", "embed.chunk_size=4", "clustering.levels=[3]",
              "retrieval.balanced_size=6", "dedup.threshold=0.8"]  # fmt: skip


def test_slurm_options_are_split_from_the_pipeline_arguments(tmp_path):
    argv = ["--nodes", "2", "run", "--output-dir", str(tmp_path), "--partition", "P", "pool=/x", "--redo", "cluster"]
    slurm, entry_argv, entry_args = launcher.parse_launcher_args(curate.ENTRY, argv)
    assert (slurm.nodes, slurm.partition) == (2, "P") and "--partition" not in entry_argv
    assert (entry_args.stage, entry_args.redo, entry_args.opts) == ("run", "cluster", ["pool=/x"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--output-dir", "o", "clustering.level=[3]"], "clustering.level"),
        (["run", "--output-dir", "o", "--config", "no_such_curation"], "no_such_curation"),
        (["run", "--output-dir", "o", "retrieval.seeds=[{dataset: d, mode: knn}]"], "mode must be one of"),
    ],
)
def test_config_mistakes_fail_before_submission(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=re.escape(message)):
        curate.main([*argv, "--slurm-output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_the_pipeline_on_two_local_tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    write_pool(tmp_path / "pool", 14, {1: ("jpeg",)})
    out = tmp_path / "%j"
    job = curate.main(["--executor", "local", "--ngpus", "2", "--cpus-per-task", "1", "run", "--output-dir", str(out),
                       f"pool={tmp_path / 'pool'}", *THUMBNAILS])  # fmt: skip
    deadline = time.monotonic() + 120
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"job still running:\n{job.stdout()}\n{job.stderr()}")
        time.sleep(0.2)
    reports = job.results()
    assert reports[1] is None and reports[0]["sizes"]["removed_as_copies"] == 1
    assert reports[0]["sizes"]["curated"] == 6
    output_dir = tmp_path / job.job_id
    assert len((output_dir / "curated.txt").read_text().splitlines()) == 6
    assert len(EmbeddingStore(output_dir / "embeddings" / "pool")) == 15
    assert (output_dir / "log.rank1.txt").is_file()  # the second task took part
