"""The submitit launchers: argument splitting, the process-group environment, sbatch parameters
(with stand-in ``sbatch``/``srun`` commands), and real jobs through submitit's local executor:
training with ``%j``, a k-NN evaluation on two tasks (a gloo group built from our environment), and a
preempted training job that submitit requeues and that resumes from its checkpoint."""

from __future__ import annotations

import importlib
import json
import os
import pickle
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import submitit

from dinov2.checkpoint import find_latest_checkpoint
from dinov2.run import submit as launcher
from dinov2.run.curation import curate as run_curate
from dinov2.run.eval import knn as run_knn
from dinov2.run.eval import linear as run_linear
from dinov2.run.eval import log_regression as run_log_regression
from dinov2.run.train import train as run_train

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
LOCAL = ["--executor", "local", "--ngpus", "1", "--cpus-per-task", "1"]
TINY_TRAIN = [  # training options first: the first key=value starts the overrides (argparse.REMAINDER)
    "--config", "quickstart", "optim.epochs=1", "train.OFFICIAL_EPOCH_LENGTH=100", "train.batch_size_per_gpu=4",
    "train.num_workers=0", "train.log_period=1", "student.depth=2", "evaluation.knn.train_dataset=",
    "evaluation.knn.val_dataset=", "dino.head_n_prototypes=128", "ibot.head_n_prototypes=128",
    "dino.head_hidden_dim=128", "ibot.head_hidden_dim=128", "crops.local_crops_number=2",
    "train.dataset_path=Synthetic:split=TRAIN:num_images=64:image_size=32",
]  # fmt: skip
MICRO_KNN = [
    "--train-dataset", "Synthetic:split=TRAIN:num_images=32:image_size=32",
    "--val-dataset", "Synthetic:split=VAL:num_images=16:image_size=32",
    "--resize-size", "32", "--crop-size", "32", "--batch-size", "8", "--num-workers", "0", "--device", "cpu",
    "--nb_knn", "5", "--no-progress", "student.arch=vit_small", "student.embed_dim=32", "student.depth=2",
    "student.num_heads=2", "student.patch_size=8", "crops.global_crops_size=32",
]  # fmt: skip


@dataclass
class FakeJobEnv:
    """What submitit.JobEnvironment() tells a task (here task 11 of a 2-node SLURM job)."""

    job_id: str = "4242"
    hostnames: tuple = ("node-a", "node-b")
    num_nodes: int = 2
    num_tasks: int = 16
    global_rank: int = 11
    local_rank: int = 3
    cluster: str = "slurm"


@pytest.fixture
def local_jobs(monkeypatch):
    """Jobs of the local executor inherit this environment: one thread per task on a 2-core machine,
    and no process-group variables from the test process."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in DIST_VARS:
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


def wait_for(job, timeout_s: float = 60.0) -> list:
    """The job's results (one per task), failing the test with its logs if it does not finish in time."""
    deadline = time.monotonic() + timeout_s
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"job {job.job_id} still running after {timeout_s} s:\n{job.stdout()}\n{job.stderr()}")
        time.sleep(0.2)
    return job.results()


def metrics_iterations(output_dir: Path) -> list[int]:
    lines = (output_dir / "training_metrics.json").read_text().splitlines()
    return [json.loads(line)["iteration"] for line in lines if line and "eval" not in json.loads(line)]


# ------------------------------------------------------------------------ the process-group environment
def test_setup_distributed_env_describes_the_job(clean_dist_env, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "1")  # inherited from the submitting shell: must be replaced
    variables = launcher.setup_distributed_env(FakeJobEnv())
    expected = {"MASTER_ADDR": "node-a", "WORLD_SIZE": "16", "RANK": "11", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}
    assert {k: os.environ[k] for k in expected} == expected
    assert variables == {k: os.environ[k] for k in DIST_VARS}
    port = int(os.environ["MASTER_PORT"])
    assert launcher.PORT_BASE <= port < launcher.PORT_BASE + launcher.PORT_SPAN
    # every task of the job derives the same port; another job gets another one
    other_task = launcher.setup_distributed_env(FakeJobEnv(global_rank=0, local_rank=0))
    assert int(other_task["MASTER_PORT"]) == port and other_task["RANK"] == "0"
    assert launcher.master_port("4243") != port


def test_setup_distributed_env_single_node_and_bad_shapes(clean_dist_env):
    variables = launcher.setup_distributed_env(FakeJobEnv(hostnames=("vm",), num_nodes=1, num_tasks=4, global_rank=2))
    assert variables["MASTER_ADDR"] == "127.0.0.1" and variables["LOCAL_WORLD_SIZE"] == "4"
    with pytest.raises(ValueError, match="same number of tasks on each node"):
        launcher.setup_distributed_env(FakeJobEnv(num_nodes=2, num_tasks=3))


@pytest.mark.parametrize("job_id", ["0", "9999", "123456789", "77_3", "abc"])
def test_master_port_is_deterministic_and_in_range(job_id):
    port = launcher.master_port(job_id)
    assert port == launcher.master_port(job_id)
    assert launcher.PORT_BASE <= port < launcher.PORT_BASE + launcher.PORT_SPAN


# ------------------------------------------------------------------------------------ argument handling
def test_slurm_arguments_are_split_from_the_training_arguments():
    argv = ["--nodes", "4", "--config", "vitl16_short", "--partition", "P", "--output-dir", "runs/%j",
            "--no-resume", "--comment", "c", "optim.epochs=1", "train.batch_size_per_gpu=2", "--exclude", "n[1-2]"]  # fmt: skip
    slurm, entry_argv, entry_args = launcher.parse_launcher_args(run_train.ENTRY, argv)
    assert (slurm.nodes, slurm.ngpus, slurm.partition, slurm.comment, slurm.exclude) == (4, 8, "P", "c", "n[1-2]")
    assert (slurm.timeout, slurm.cpus_per_task, slurm.executor, slurm.slurm_output_dir) == (2800, 10, "slurm", None)
    assert entry_argv == ["--config", "vitl16_short", "--output-dir", "runs/%j", "--no-resume", "optim.epochs=1",
                          "train.batch_size_per_gpu=2"]  # fmt: skip
    assert entry_args.opts == ["optim.epochs=1", "train.batch_size_per_gpu=2"]
    assert entry_args.no_resume and entry_args.config == "vitl16_short" and entry_args.output_dir == "runs/%j"


def test_slurm_flags_are_not_abbreviations_of_entry_flags():
    """``--no-resume`` is not taken for ``--nodes``; a misspelt SLURM flag is an error, not a silent default."""
    slurm, entry_argv, _ = launcher.parse_launcher_args(run_train.ENTRY, ["--no-resume", "--output-dir", "o"])
    assert slurm.nodes == 1 and "--no-resume" in entry_argv
    with pytest.raises(SystemExit):
        launcher.parse_launcher_args(run_train.ENTRY, ["--node", "4", "--output-dir", "o"])


def test_percent_j_becomes_the_job_id(tmp_path):
    argv = ["--output-dir", "runs/%j", "train.output_dir=/x/%j/y", "--config", "a"]
    resolved = ["--output-dir", "runs/991", "train.output_dir=/x/991/y", "--config", "a"]
    assert launcher.resolve_job_id(argv, "991") == resolved
    out = str(tmp_path / "runs" / "%j")
    slurm, _, _ = launcher.parse_launcher_args(run_train.ENTRY, ["--output-dir", out])
    assert launcher.submitit_folder(slurm, out) == tmp_path / "runs" / "%j" / "slurm"  # submitit resolves it
    slurm.executor = "local"  # submitit's local controller cannot: the folder drops the %j part
    assert launcher.submitit_folder(slurm, out) == tmp_path / "runs" / "submitit_local"
    slurm.slurm_output_dir = str(tmp_path / "logs")
    assert launcher.submitit_folder(slurm, out) == tmp_path / "logs"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "quickstart"], "--output-dir is required"),
        (["optim.epochs=1", "--output-dir", "o"], "--output-dir came after a key=value override"),
        (["--output-dir", "o", "optim.epoch=3"], "optim.epoch"),
        (["--output-dir", "o", "--config", "no_such_config"], "no_such_config"),
        (["--output-dir", "o", "--executor", "local", "--nodes", "2"], "--nodes 1"),
        (["--output-dir", "o", "train.batch_size_per_gpu=abc"], "'train.batch_size_per_gpu' expects a number"),
        (["--output-dir", "o", "crops.global_crops_scale=[0.3,1.0"], "crops.global_crops_scale=[0.3,1.0"),
        (["--output-dir", "o", "optim.min_lr=${optim.baselr}"], "'optim.min_lr'"),
        (["--ngpu", "2", "--output-dir", "o"], "--ngpu: did you mean --ngpus"),  # a misspelt job option
        (["--output-dir", "o", "--node=2"], "--node: did you mean --nodes"),
    ],
)
def test_mistakes_fail_before_submission(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=re.escape(message)):
        launcher.submit(run_train.ENTRY, [*argv, "--slurm-output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing was submitted


def test_local_executor_refuses_more_gpus_than_the_machine_has(monkeypatch, tmp_path):
    """Tasks beyond the machine's GPUs would share one (LOCAL_RANK modulo the count) and NCCL would
    stop the job; without CUDA (this machine) local tasks run on the CPU whatever --ngpus says."""
    import torch

    argv = ["--output-dir", str(tmp_path / "out"), "--executor", "local", "--slurm-output-dir", str(tmp_path / "s")]
    slurm, _, entry_args = launcher.parse_launcher_args(run_train.ENTRY, [*argv, "--ngpus", "2"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    launcher.check_submission(run_train.ENTRY, slurm, entry_args)  # CPU tasks: no SystemExit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match=re.escape("--ngpus 2, but this machine has 1 GPU(s)")):
        launcher.check_submission(run_train.ENTRY, slurm, entry_args)
    slurm.ngpus = 1
    launcher.check_submission(run_train.ENTRY, slurm, entry_args)


def test_a_valid_interpolation_passes_the_submission_check(tmp_path):
    argv = ["--output-dir", str(tmp_path / "%j"), "--config", "vitl14", "optim.min_lr=${optim.base_lr}"]
    slurm, _, entry_args = launcher.parse_launcher_args(run_train.ENTRY, argv)
    launcher.check_submission(run_train.ENTRY, slurm, entry_args)  # no SystemExit


@pytest.mark.parametrize("module", [run_knn, run_linear, run_log_regression])
def test_eval_launchers_call_their_main_with_the_parsed_arguments(module, monkeypatch, tmp_path):
    target = importlib.import_module(module.ENTRY.module)
    assert target.__name__ == "dinov2.eval." + Path(module.__file__).stem
    argv = ["--ngpus", "2", "--config-file", "vitl14_pretrain", "--output-dir", str(tmp_path), "--batch-size", "7",
            "--partition", "P", "student.drop_path_rate=0.0"]  # fmt: skip
    slurm, entry_argv, entry_args = launcher.parse_launcher_args(module.ENTRY, argv)
    assert slurm.ngpus == 2 and slurm.partition == "P" and "--partition" not in entry_argv
    assert entry_args.batch_size == 7 and entry_args.opts == ["student.drop_path_rate=0.0"]
    calls = []
    monkeypatch.setattr(target, "main", lambda args: calls.append(args) or {"ok": True})
    assert module.ENTRY.run(entry_argv) == {"ok": True}
    assert vars(calls[0]) == vars(target.get_args_parser().parse_args(entry_argv))
    assert calls[0].config_file == "vitl14_pretrain" and calls[0].output_dir == str(tmp_path)


def test_the_training_launcher_passes_the_argument_list(monkeypatch):
    from dinov2.train import train as train_module

    calls = []
    monkeypatch.setattr(train_module, "main", lambda argv: calls.append(argv) or {"iteration": 0})
    run_train.ENTRY.run(("--config", "quickstart", "optim.epochs=2"))
    assert calls == [["--config", "quickstart", "optim.epochs=2"]]


# --------------------------------------------------------------------------- the callable and its requeue
def test_launched_sets_the_environment_and_checkpoint_requeues_without_no_resume(clean_dist_env, monkeypatch):
    """__call__ inside a (simulated) submitit task, then the checkpoint submitit takes on preemption."""
    from dinov2.train import train as train_module

    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "5151", "SUBMITIT_LOCAL_NTASKS": "2",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_GLOBALID": "1",
                       "SUBMITIT_LOCAL_LOCALID": "1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    seen = []
    monkeypatch.setattr(train_module, "main", lambda argv: seen.append((argv, dict(os.environ))) or {"iteration": 3})
    launched = launcher.Launched(run_train.ENTRY, ["--no-resume", "--output-dir", "runs/%j", "a.b=1"])
    assert launched() == {"iteration": 3}
    argv, env = seen[0]
    assert argv == ["--no-resume", "--output-dir", "runs/5151", "a.b=1"]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["MASTER_ADDR"]) == ("1", "2", "1", "127.0.0.1")
    assert env["MASTER_PORT"] == str(launcher.master_port("5151"))

    delayed = launched.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, launcher.Launched) and delayed.function is not launched
    assert delayed.function.entry == run_train.ENTRY and delayed.args == () and delayed.kwargs == {}
    assert delayed.function.argv == ["--output-dir", "runs/5151", "a.b=1"]  # same directory, resumes
    assert launched.argv[0] == "--no-resume"  # the running job's own arguments are untouched
    copy = pickle.loads(pickle.dumps(delayed.function))
    assert (copy.entry, copy.argv) == (delayed.function.entry, delayed.function.argv)


@pytest.mark.parametrize(
    "argv, requeued",
    [
        (["run", "--redo", "embed", "--config", "c", "--output-dir", "o", "pool=p"],
         ["run", "--config", "c", "--output-dir", "o", "pool=p"]),
        (["embed", "--output-dir", "o", "--redo=embed"], ["embed", "--output-dir", "o"]),  # the stage stays
        (["dedup", "--output-dir", "o"], ["dedup", "--output-dir", "o"]),
    ],
)  # fmt: skip
def test_a_requeued_curation_does_not_redo_what_it_had_finished(argv, requeued, capsys):
    # --redo deletes the stage's outputs (embedding chunks included): resubmitted with it, every
    # preemption would throw away the finished chunks and the job could never get past them.
    launched = launcher.Launched(run_curate.ENTRY, argv)
    assert launched.checkpoint().function.argv == requeued
    assert ("--redo dropped" in capsys.readouterr().out) == (argv != requeued)


def test_start_over_flags_must_be_spelt_in_full():
    # The training parser accepts abbreviations: "--no-res" is --no-resume, which a requeue would keep.
    with pytest.raises(SystemExit, match="write --no-resume in full"):
        launcher.parse_launcher_args(run_train.ENTRY, ["--no-res", "--output-dir", "o"])
    _, entry_argv, entry_args = launcher.parse_launcher_args(run_train.ENTRY, ["--no-resume", "--output-dir", "o"])
    assert entry_args.no_resume and launcher.drop_start_over(entry_argv) == ["--output-dir", "o"]


# ------------------------------------------------------------------- submission (stand-in sbatch and srun)
def test_slurm_submission_writes_the_expected_sbatch_file(tmp_path, stand_in_slurm, capsys):
    """A real submit() to the SLURM executor, with ``sbatch``/``srun`` replaced by scripts on PATH."""
    out = tmp_path / "runs" / "%j"
    job = run_train.main(["--nodes", "4", "--partition", "P", "--timeout", "60", "--comment", "my run", "--exclude",
                          "node1,node2", "--qos", "high", "--config", "vitl16_short", "--output-dir", str(out),
                          "--mem-gb", "400", "--constraint", "h100", "optim.epochs=1"])  # fmt: skip
    assert job.job_id == "4242"
    folder = tmp_path / "runs" / "4242" / "slurm"
    sbatch = (folder / "4242_submission.sh").read_text()
    for flag in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=10", "--partition=P",
                 "--time=60", "--comment='my run'", "--exclude=node1,node2", "--qos=high", "--mem=400GB", "--constraint=h100",
                 "--signal=USR2@120", "--job-name=dinov2-train"]:  # fmt: skip
        assert f"#SBATCH {flag}\n" in sbatch, flag
    assert "#SBATCH --account" not in sbatch  # not given: left to the cluster
    # one task that fails ends the others at once, instead of leaving them in a collective until NCCL's timeout
    (srun,) = [line for line in sbatch.splitlines() if line.startswith("srun ")]
    assert " --kill-on-bad-exit=1 " in srun
    delayed = submitit.helpers.DelayedSubmission.load(folder / "4242_submitted.pkl")
    assert delayed.function.argv == ["--config", "vitl16_short", "--output-dir", str(out), "optim.epochs=1"]
    printed = capsys.readouterr().out
    assert "Submitted job 4242" in printed and str(tmp_path / "runs" / "4242") in printed


# --------------------------------------------------------------------------- real jobs, local executor
def test_training_through_the_local_executor(tmp_path, local_jobs):
    out = tmp_path / "%j"
    job = run_train.main([*LOCAL, "--output-dir", str(out), *TINY_TRAIN, "train.stop_at_iteration=2",
                          "train.checkpoint_period_iterations=1"])  # fmt: skip
    (result,) = wait_for(job)
    output_dir = tmp_path / job.job_id  # %j resolved inside the job
    assert result["iteration"] == 2
    assert metrics_iterations(output_dir) == [1, 2]
    assert find_latest_checkpoint(output_dir / "checkpoints") is not None
    assert (output_dir / "config.yaml").is_file()


def test_knn_on_two_local_tasks(tmp_path, local_jobs):
    """Two tasks join one gloo group from the environment setup_distributed_env wrote."""
    job = run_knn.main(["--executor", "local", "--ngpus", "2", "--cpus-per-task", "1", *MICRO_KNN,
                        "--output-dir", str(tmp_path / "%j")])  # fmt: skip
    records = wait_for(job)
    assert len(records) == 2 and records[0]["results"] == records[1]["results"]
    saved = json.loads((tmp_path / job.job_id / "results_eval_knn.json").read_text())
    assert saved["results"] == records[0]["results"] and saved["num_val"] == 16
    assert "world size 2" in job.stdout()


def _child_pids(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            children.append(int(stat.parent.name))
    return children


def test_preempted_training_is_requeued_and_resumes(tmp_path, local_jobs):
    """A true preemption: SIGUSR2 to the running task (what SLURM sends before preempting) makes
    submitit call Launched.checkpoint and requeue; the local controller restarts the task, which
    resumes from the newest checkpoint instead of starting over (the first run had --no-resume)."""
    stop = 40
    job = run_train.main([*LOCAL, "--output-dir", str(tmp_path / "%j"), "--no-resume", *TINY_TRAIN,
                          f"train.stop_at_iteration={stop}", "train.checkpoint_period_iterations=3"])  # fmt: skip
    output_dir = tmp_path / job.job_id
    deadline = time.monotonic() + 90
    while find_latest_checkpoint(output_dir / "checkpoints") is None:
        assert not job.done(), f"the job ended before its first checkpoint:\n{job.stdout()}\n{job.stderr()}"
        assert time.monotonic() < deadline, "no checkpoint after 90 s"
        time.sleep(0.05)
    (task,) = _child_pids(int(job.job_id))
    os.kill(task, signal.SIGUSR2)
    (result,) = wait_for(job, timeout_s=120)

    stdout, log = job.stdout(), (output_dir / "log.txt").read_text()
    assert "--no-resume dropped" in stdout and "Requeued job" in stdout
    resumed = [int(n) for n in re.findall(r"resumed from .* at iteration (\d+)", log)]
    assert len(resumed) == 1 and 3 <= resumed[0] < stop  # interrupted mid-run, continued from a checkpoint
    assert result["iteration"] == stop
    assert metrics_iterations(output_dir) == list(range(1, stop + 1))  # no iteration trained twice or lost
    requeued = submitit.helpers.DelayedSubmission.load(job.paths.submitted_pickle).function
    assert "--no-resume" not in requeued.argv and str(output_dir) in requeued.argv


def test_no_resume_into_a_used_folder_warns_only_where_a_requeue_could_resume_an_older_run(tmp_path, capsys):
    # Training moves the earlier run aside before it starts over, so its requeue can only find its own
    # checkpoints; the linear probe does not, so a requeue (which drops --no-resume) may resume the old one.
    out = tmp_path / "out"
    out.mkdir()
    (out / "leftover.txt").write_text("an earlier run")
    argv = ["--output-dir", str(out), "--no-resume", "--executor", "local", "--ngpus", "0"]
    slurm, _, entry_args = launcher.parse_launcher_args(run_train.ENTRY, argv)
    launcher.check_submission(run_train.ENTRY, slurm, entry_args)
    assert "not empty" not in capsys.readouterr().err
    slurm, _, entry_args = launcher.parse_launcher_args(run_linear.ENTRY, argv)
    launcher.check_submission(run_linear.ENTRY, slurm, entry_args)
    assert "is not empty" in capsys.readouterr().err
