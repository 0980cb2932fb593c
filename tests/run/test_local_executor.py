"""A job of submitit's local executor stops as docs/distributed.md says: ``kill JOB_ID``."""

from __future__ import annotations

import os
import signal
import time

import pytest

from dinov2.run import submit as launcher

LOCAL = ["--executor", "local", "--ngpus", "1", "--cpus-per-task", "1"]


@pytest.fixture
def local_jobs(monkeypatch):
    """One thread per task, and no process-group variables from the test process."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


SLOW_ENTRY = """
import argparse, pathlib, time


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(add_help=add_help)
    parser.add_argument("marker")
    return parser


def main(argv):
    pathlib.Path(argv[0]).touch()
    time.sleep(120)
"""


def test_kill_job_id_stops_a_local_job(tmp_path, local_jobs, monkeypatch):
    """docs/distributed.md: a local job is stopped with ``kill JOB_ID`` (SIGTERM to submitit's controller,
    which forwards it to the tasks; submitit's task handler would ignore it, as on SLURM)."""
    (tmp_path / "slow_entry.py").write_text(SLOW_ENTRY)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    slurm_args = launcher.get_slurm_args_parser().parse_args(LOCAL)
    executor = launcher.make_executor(slurm_args, tmp_path / "logs", "slow")
    marker = tmp_path / "started"
    job = executor.submit(launcher.Launched(launcher.EntryPoint("slow_entry", "slow", main_takes_argv=True),
                                            [str(marker)]))  # fmt: skip
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert not job.done() and time.monotonic() < deadline, f"the task did not start:\n{job.stderr()}"
        time.sleep(0.05)
    os.kill(int(job.job_id), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = job.done()
    if not stopped:
        job.cancel()
    assert stopped, "the job still runs 10 s after kill JOB_ID"
