"""The submitit launcher: behaviour a mutation audit found untested (``--redo=STAGE`` among other
arguments, a job SLURM requeued by itself, job shapes without GPUs, the requeue limit, the printed
output directory, evaluations submitted without ``--output-dir``, and a SLURM submission from a
machine without srun)."""

from __future__ import annotations

import re
import signal

import pytest
from test_launchers import FakeJobEnv

from dinov2.run import submit as launcher
from dinov2.run.curation import curate as run_curate
from dinov2.run.eval import knn as run_knn
from dinov2.run.train import train as run_train


def test_an_inline_redo_among_other_arguments_drops_only_itself():
    options = run_curate.ENTRY.start_over
    argv = ["embed", "--redo=embed", "--output-dir", "o", "pool=p"]
    assert launcher.drop_start_over(argv, options) == ["embed", "--output-dir", "o", "pool=p"]
    argv = ["run", "--redo", "dedup", "--output-dir", "o"]
    assert launcher.drop_start_over(argv, options) == ["run", "--output-dir", "o"]


# the first task of a one-node job
FIRST_TASK = dict(job_id="777", hostnames=("node-a",), num_nodes=1, num_tasks=1, global_rank=0, local_rank=0)


@pytest.mark.parametrize(("restarts", "kept"), [("0", True), ("1", False), ("3", False)])
def test_a_job_slurm_requeued_by_itself_drops_no_resume(clean_dist_env, monkeypatch, restarts, kept):
    from dinov2.train import train as train_module

    monkeypatch.setattr(launcher.submitit, "JobEnvironment", lambda: FakeJobEnv(**FIRST_TASK))
    monkeypatch.setenv("SLURM_RESTART_COUNT", restarts)
    seen = []
    monkeypatch.setattr(train_module, "main", lambda argv: seen.append(list(argv)))
    launcher.Launched(run_train.ENTRY, ["--no-resume", "--output-dir", "runs/%j"])()
    assert seen == [(["--no-resume"] if kept else []) + ["--output-dir", "runs/777"]]


def test_a_negative_gpu_count_is_refused_before_submission(tmp_path):
    with pytest.raises(SystemExit, match=re.escape("--ngpus >= 0, got 1 and -1")):
        launcher.submit(run_train.ENTRY, ["--ngpus", "-1", "--output-dir", "o", "--slurm-output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_a_cpu_job_asks_for_one_task_per_node_and_no_gpus(tmp_path, stand_in_slurm, capsys):
    out = tmp_path / "runs" / "%j"
    run_train.main(["--nodes", "2", "--ngpus", "0", "--max-num-timeout", "5", "--output-dir", str(out)])
    sbatch = (tmp_path / "runs" / "4242" / "slurm" / "4242_submission.sh").read_text()
    assert "#SBATCH --ntasks-per-node=1\n" in sbatch and "#SBATCH --nodes=2\n" in sbatch
    assert "--gpus-per-node" not in sbatch and "--gres" not in sbatch
    printed = capsys.readouterr().out
    assert f"  output dir: {tmp_path / 'runs' / '4242'}\n" in printed  # %j resolved in what is printed
    assert "(dinov2-train, slurm, 2 task(s))" in printed


def test_the_requeue_limit_reaches_the_slurm_executor(tmp_path, stand_in_slurm):
    slurm, _, _ = launcher.parse_launcher_args(run_train.ENTRY, ["--max-num-timeout", "5", "--output-dir", "o"])
    executor = launcher.make_executor(slurm, tmp_path / "s", "name")
    assert executor._executor.max_num_timeout == 5


def test_an_evaluation_without_an_output_dir_is_refused_not_written_to_the_working_directory(tmp_path):
    argv = ["--train-dataset", "Synthetic:split=TRAIN", "--val-dataset", "Synthetic:split=VAL"]
    slurm, _, entry_args = launcher.parse_launcher_args(run_knn.ENTRY, argv)
    with pytest.raises(SystemExit, match="--output-dir is required"):
        launcher.check_submission(run_knn.ENTRY, slurm, entry_args)


@pytest.mark.parametrize(
    ("error", "stops", "with_failure"),
    [
        (SystemExit(3), True, True),  # a failed task: its peers go, told why
        (RuntimeError("boom"), True, True),
        (SystemExit(launcher.LOCAL_REQUEUE_RETURN_CODE), True, False),  # a requeue: peers restart, no failure
        (KeyboardInterrupt(), False, False),  # the controller's own SIGINT, sent to every task
        (SystemExit(0), False, False),
    ],
)
def test_a_local_task_stops_its_peers_only_when_it_fails_or_is_requeued(
    clean_dist_env, monkeypatch, error, stops, with_failure
):
    from dinov2.train import train as train_module

    monkeypatch.setattr(
        launcher.submitit,
        "JobEnvironment",
        lambda: FakeJobEnv(**{**FIRST_TASK, "job_id": "55", "num_tasks": 2, "cluster": "local"}),
    )
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # leave this process's handlers alone
    calls = []
    monkeypatch.setattr(launcher, "stop_local_peers", lambda job_env, failure: calls.append(failure))

    def failing(argv):
        raise error

    monkeypatch.setattr(train_module, "main", failing)
    with pytest.raises(type(error)):
        launcher.Launched(run_train.ENTRY, ["--output-dir", "o"])()
    assert len(calls) == int(stops)
    if stops:
        assert (calls[0] is not None) == with_failure
        if with_failure:
            assert type(error).__name__ in calls[0]  # the traceback names the error


def test_stopped_peers_get_the_failure_as_their_result_unless_they_wrote_their_own(tmp_path, monkeypatch):
    import pickle
    import subprocess
    import sys
    from types import SimpleNamespace

    from submitit.core.utils import JobPaths

    peers = {task: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for task in (1, 2)}
    monkeypatch.setattr(launcher, "_local_peer_tasks", lambda job_id: {t: p.pid for t, p in peers.items()})
    job_env = SimpleNamespace(job_id="55", global_rank=0, paths=SimpleNamespace(folder=tmp_path))
    own = JobPaths(tmp_path, "55", 1).result_pickle
    own.write_bytes(pickle.dumps(("success", 5)))
    try:
        stopped = launcher.stop_local_peers(job_env, "Traceback: ValueError: bad", wait_s=10)
    finally:
        for process in peers.values():
            process.kill()
            process.wait()
    assert stopped == [1, 2]
    assert all(process.returncode == -9 for process in peers.values())
    assert pickle.loads(own.read_bytes()) == ("success", 5)  # the result it wrote itself stays
    status, message = pickle.loads(JobPaths(tmp_path, "55", 2).result_pickle.read_bytes())
    assert status == "error" and "task 0 of job 55 failed" in message and "ValueError: bad" in message
    assert "ValueError: bad" in JobPaths(tmp_path, "55", 2).stderr.read_text()


def test_submitting_to_slurm_where_there_is_no_srun_says_to_run_locally(tmp_path, monkeypatch):
    import argparse

    monkeypatch.setenv("PATH", str(tmp_path))  # no srun, no sbatch on it
    args = argparse.Namespace(executor="slurm", max_num_timeout=3)
    with pytest.raises(SystemExit, match=r"cannot submit to SLURM from here \(.*srun.*\); --executor local runs"):
        launcher.make_executor(args, tmp_path / "slurm", "a job")
