"""The launch paths when something goes wrong: a local job of several tasks in which one task fails
(the others stop at once, as ``srun --kill-on-bad-exit=1`` makes them on SLURM, and the job's results
name the task that failed), a job that SLURM itself requeued (it continues instead of starting over),
and every launcher's ``--help`` without a process group or a GPU."""

from __future__ import annotations

import importlib
import os
import time

import pytest
import submitit

from dinov2.run import submit as launcher
from dinov2.run.curation import curate as run_curate
from dinov2.run.eval import knn as run_knn
from dinov2.run.eval import linear as run_linear
from dinov2.run.eval import log_regression as run_log_regression
from dinov2.run.train import train as run_train

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")

# Task 1 fails before it joins the process group; task 0 joins and waits for it there. Left running,
# task 0 would wait in the rendezvous until the process-group timeout (30 minutes for gloo).
FAILING_ENTRY = """
import argparse, os, torch
from dinov2 import distributed


def get_args_parser(add_help=True):
    return argparse.ArgumentParser(add_help=add_help)


def main(argv):
    if os.environ["RANK"] == "1":
        raise ValueError("only task 1 sees this bad value")
    distributed.init_from_env(torch.device("cpu"))
    distributed.barrier()
    return "task 0 finished"
"""


@pytest.fixture
def local_jobs(monkeypatch):
    """One thread per task, and no process-group variables from the test process (setenv first, so that
    monkeypatch also removes those that a job environment writes into this process)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in DIST_VARS:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


@pytest.mark.distributed
def test_a_failing_task_stops_the_others_and_is_named_in_the_results(tmp_path, local_jobs, monkeypatch):
    (tmp_path / "failing_entry.py").write_text(FAILING_ENTRY)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    slurm_args = launcher.get_slurm_args_parser().parse_args(["--executor", "local", "--ngpus", "2"])
    executor = launcher.make_executor(slurm_args, tmp_path / "logs", "failing")
    entry = launcher.EntryPoint("failing_entry", "failing", main_takes_argv=True)
    job = executor.submit(launcher.Launched(entry, []))
    deadline = time.monotonic() + 40  # the two tasks start in a few seconds; a hang would take 30 minutes
    while not job.done() and time.monotonic() < deadline:
        time.sleep(0.1)
    stopped = job.done()
    if not stopped:
        job.cancel()
    task0_log = tmp_path / "logs" / f"{job.job_id}_0_log.err"  # ID_T_log.err, as docs/distributed.md says
    assert stopped, f"task 0 still waits for the failed task 1:\n{task0_log.read_text()}"

    with pytest.raises(submitit.core.utils.FailedJobError) as raised:
        job.results()
    # the first task's result (what job.results() raises) is why it was stopped, with task 1's error
    assert f"stopped because task 1 of job {job.job_id} failed" in str(raised.value)
    assert "ValueError: only task 1 sees this bad value" in str(raised.value)
    assert "ValueError: only task 1 sees this bad value" in str(job._sub_jobs[1].exception())
    assert "stopped because task 1" in task0_log.read_text()  # in task 0's own log too


SLURM_TASK = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "8080", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
              "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "node7", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}  # fmt: skip


@pytest.mark.parametrize(
    "entry, argv, restarted",
    [
        (run_train.ENTRY, ["--no-resume", "--output-dir", "runs/%j", "a.b=1"], ["--output-dir", "runs/8080", "a.b=1"]),
        (run_curate.ENTRY, ["run", "--redo", "embed", "--output-dir", "o"], ["run", "--output-dir", "o"]),
    ],
)  # fmt: skip
def test_a_job_that_slurm_requeued_itself_continues_instead_of_starting_over(entry, argv, restarted, local_jobs,
                                                                             monkeypatch, capsys):  # fmt: skip
    """A preemption without SIGUSR2 (SLURM sends SIGTERM unless PreemptParameters=send_user_signal), a node
    failure or ``scontrol requeue`` rerun the submitted arguments: checkpoint() never rewrote them, so
    ``--no-resume`` would set the run aside and start over, ``--redo`` delete the finished stage again."""
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    target = importlib.import_module(entry.module)
    calls = []
    monkeypatch.setattr(target, "main", lambda received: calls.append(received))
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    launcher.Launched(entry, argv)()  # the first start: as submitted (%j resolved)
    assert calls.pop() == launcher.resolve_job_id(argv, "8080")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    launcher.Launched(entry, argv)()
    assert calls.pop() == launcher.resolve_job_id(argv, "8080")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    launched = launcher.Launched(entry, argv)
    launched()
    assert calls.pop() == restarted
    assert "dropped so that it resumes" in capsys.readouterr().out
    assert launched.checkpoint().function.argv == restarted  # and a later requeue keeps it that way


@pytest.mark.parametrize("module", [run_train, run_knn, run_linear, run_log_regression, run_curate])
def test_every_launcher_help_lists_the_job_and_the_entry_options(module, capsys):
    import torch.distributed as dist

    with pytest.raises(SystemExit) as exited:
        module.main(["--help"])
    assert exited.value.code == 0 and not dist.is_initialized()
    printed = capsys.readouterr().out
    for option in ("--nodes", "--ngpus", "--executor", "--max-num-timeout", "--output-dir"):  # job, then entry
        assert option in printed, option
    entry_only = {run_train: "--no-resume", run_knn: "--nb_knn", run_linear: "--save-checkpoint-frequency",
                  run_log_regression: "--train-dataset", run_curate: "--redo"}[module]  # fmt: skip
    assert entry_only in printed
