"""Submit an entry point's ``main`` to SLURM (or to this machine) through submitit.

The submitting process splits the command line into SLURM arguments (:func:`get_slurm_args_parser`)
and the entry point's own arguments, checks the latter (argument parser and config schema) so that
mistakes fail here rather than in the queue, and submits a :class:`Launched` callable. Every task
of the job then describes the process group in the environment variables that
``dinov2.distributed.init_from_env`` reads (:func:`setup_distributed_env`) and calls the entry
point's ``main`` with the same arguments a ``torchrun`` user would pass.

``%j`` in any entry-point argument (typically ``--output-dir runs/%j``) becomes the job id inside
the job; submitit resolves ``%j`` in its own folder (``--slurm-output-dir``, by default
``OUTPUT_DIR/slurm``). On preemption or time-out submitit asks the callable for a checkpoint:
:meth:`Launched.checkpoint` resubmits the same arguments (without ``--no-resume``, or the curation's
``--redo STAGE``) and the entry point resumes from what it wrote in its output directory; a job
that SLURM requeued by itself (``SLURM_RESTART_COUNT``) drops them too. On SLURM, ``srun
--kill-on-bad-exit=1`` ends every task once one fails; under submitit's local executor, whose controller
waits for all of them, the failing task kills the others itself (:func:`stop_local_peers`).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import signal
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths, cloudpickle_dump, temporary_save_path
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from dinov2.distributed import PORT_BASE, PORT_SPAN, master_port  # noqa: F401 (PORT_*: the range, for callers)
from dinov2.utils.config import ConfigError

EXECUTORS = ("slurm", "local")
NO_RESUME = "--no-resume"
START_OVER = ((NO_RESUME, "no_resume", False),)
# What submitit does before a job hits its time limit: SIGUSR2 this many seconds ahead.
SIGNAL_DELAY_S = 120
# A task that exits with an error makes SLURM end the others: left running, they would wait in their next
# collective for the failed peer until the process-group timeout (10 minutes for NCCL) and then fail with
# a timeout instead of the reason. A requeue (task 0 exits after `scontrol requeue`) ends them anyway.
SRUN_ARGS = ("--kill-on-bad-exit=1",)


def get_slurm_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """The launcher arguments, meant as a parent parser; abbreviations are off so that they never
    swallow an entry-point option (``--no`` is not ``--nodes``)."""
    parser = argparse.ArgumentParser(add_help=add_help, allow_abbrev=False)
    group = parser.add_argument_group("job submission (submitit)")
    group.add_argument("--nodes", type=int, default=1, help="number of nodes")
    group.add_argument("--ngpus", "--gpus-per-node", dest="ngpus", type=int, default=8,
                       help="GPUs per node; one task (process) per GPU, one task when 0")  # fmt: skip
    group.add_argument("--partition", default=None, help="SLURM partition (default: the cluster's)")
    group.add_argument("--timeout", type=int, default=2800, help="time limit of one job, in minutes")
    group.add_argument("--comment", default=None, help="SLURM job comment")
    group.add_argument("--exclude", default=None, help="nodes not to run on, e.g. node[01-04],node17")
    group.add_argument("--constraint", default=None, help="node features the job needs, e.g. volta32gb or 'a100|h100'")
    group.add_argument("--account", default=None, help="SLURM account")
    group.add_argument("--qos", default=None, help="SLURM quality of service")
    group.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (default: the cluster's)")
    group.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per task (data loader workers)")
    group.add_argument("--slurm-output-dir", default=None,
                       help="submitit's logs and pickles (default: OUTPUT_DIR/slurm; %%j is the job id)")  # fmt: skip
    group.add_argument("--max-num-timeout", type=int, default=3,
                       help="how many times a job that reaches --timeout is requeued (preemptions do not count)")  # fmt: skip
    group.add_argument("--executor", choices=EXECUTORS, default="slurm",
                       help="slurm: sbatch; local: run the tasks on this machine (one node)")  # fmt: skip
    return parser


@dataclass(frozen=True)
class EntryPoint:
    """The ``main`` a job runs: ``module.main(argv)`` when ``main_takes_argv`` (training), else
    ``module.main(module.get_args_parser().parse_args(argv))`` (evaluations).

    ``config_attr`` names the parsed argument that holds the config (checked before submission by
    ``config_loader``, ``"module:function"`` taking the config and the overrides). ``intermixed``:
    the entry point's positionals may stand among its options (``parse_intermixed_args``).
    ``start_over``: the options that make a run start over, ``(option, dest, takes_value)``; a requeued
    job is resubmitted without them, so that it continues from what it had finished.
    ``sets_aside``: starting over moves the earlier run's outputs away first (training), so a
    requeued job can only resume its own checkpoints.
    """

    module: str
    job_name: str
    main_takes_argv: bool = False
    config_attr: str = "config_file"
    config_loader: str = "dinov2.utils.config:load_config"
    intermixed: bool = False
    start_over: tuple[tuple[str, str, bool], ...] = START_OVER
    sets_aside: bool = False

    def get_args_parser(self, add_help: bool = True) -> argparse.ArgumentParser:
        return importlib.import_module(self.module).get_args_parser(add_help=add_help)

    def parse_args(self, parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
        return parser.parse_intermixed_args(list(argv)) if self.intermixed else parser.parse_args(list(argv))

    def load_config(self, config: str | None, overrides: Sequence[str]) -> Any:
        module, name = self.config_loader.split(":")
        return getattr(importlib.import_module(module), name)(config, list(overrides))

    def run(self, argv: Sequence[str]) -> Any:
        module = importlib.import_module(self.module)
        if self.main_takes_argv:
            return module.main(list(argv))
        return module.main(module.get_args_parser().parse_args(list(argv)))


# ---------------------------------------------------------------------------------- inside the job
def setup_distributed_env(job_env: Any) -> dict[str, str]:
    """Describe the process group of a submitit job in the torch.distributed environment variables
    (what torchrun would set), overwriting any inherited from the submitting shell. Returns them.

    ``job_env`` is a :class:`submitit.JobEnvironment` (or anything with ``job_id``, ``hostnames``,
    ``num_nodes``, ``num_tasks``, ``global_rank`` and ``local_rank``). On one node the rendezvous
    is on the loopback address, so no host name needs to resolve.
    """
    num_nodes, num_tasks = int(job_env.num_nodes), int(job_env.num_tasks)
    if num_nodes < 1 or num_tasks < num_nodes or num_tasks % num_nodes:
        raise ValueError(f"expected the same number of tasks on each node, got {num_tasks} tasks on {num_nodes} nodes")
    variables = {
        "MASTER_ADDR": "127.0.0.1" if num_nodes == 1 else str(job_env.hostnames[0]),
        "MASTER_PORT": str(master_port(str(job_env.job_id))),
        "WORLD_SIZE": str(num_tasks),
        "RANK": str(int(job_env.global_rank)),
        "LOCAL_RANK": str(int(job_env.local_rank)),
        "LOCAL_WORLD_SIZE": str(num_tasks // num_nodes),
    }
    os.environ.update(variables)
    return variables


def resolve_job_id(argv: Sequence[str], job_id: str) -> list[str]:
    """``argv`` with every ``%j`` replaced by ``job_id``."""
    return [arg.replace("%j", str(job_id)) for arg in argv]


def drop_start_over(argv: Sequence[str], options: Sequence[tuple[str, str, bool]] = START_OVER) -> list[str]:
    """``argv`` without the options that start a run over (``--no-resume``; ``--redo STAGE`` or
    ``--redo=STAGE`` for the curation): a requeued job continues from what it had finished."""
    kept: list[str] = []
    skip_value = False
    for arg in argv:
        if skip_value:
            skip_value = False
            continue
        option = next((o for o in options if arg == o[0] or (o[2] and arg.startswith(o[0] + "="))), None)
        if option is None:
            kept.append(arg)
        else:
            skip_value = option[2] and arg == option[0]
    return kept


def _start_over_given(argv: Sequence[str], options: Sequence[tuple[str, str, bool]]) -> list[str]:
    """The start-over options (``--no-resume``, ``--redo``) that ``argv`` holds."""
    return [o for o, _, _ in options if any(a == o or a.startswith(o + "=") for a in argv)]


class Launched:
    """What a job runs: ``entry.run(argv)`` in each task, after setting up the process-group
    environment. Checkpointable: submitit requeues it on preemption or time-out."""

    def __init__(self, entry: EntryPoint, argv: Sequence[str]) -> None:
        self.entry = entry
        self.argv = list(argv)

    def __call__(self) -> Any:
        job_env = submitit.JobEnvironment()
        if getattr(job_env, "cluster", None) == "local":
            # submitit ignores SIGTERM in a task (SLURM sends it before the kill that follows a requeue); the
            # local controller forwards `kill JOB_ID` as SIGTERM, which must then end the task as usual
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Resolved once: a requeued job (same id on SLURM) and its checkpoint() see the same directory.
        self.argv = resolve_job_id(self.argv, job_env.job_id)
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0").strip()
        if getattr(job_env, "cluster", None) == "slurm" and restarts.isdigit() and int(restarts) > 0:
            # requeued by SLURM itself (a preemption that sent no SIGUSR2, a node failure, scontrol requeue):
            # the job reruns the submitted arguments, which checkpoint() did not get to rewrite
            dropped = _start_over_given(self.argv, self.entry.start_over)
            if dropped:
                print(f"restart {restarts} of job {job_env.job_id}: {' '.join(dropped)} dropped so that it resumes "
                      "from what it had finished", flush=True)  # fmt: skip
            self.argv = drop_start_over(self.argv, self.entry.start_over)
        variables = setup_distributed_env(job_env)
        described = " ".join(f"{k}={v}" for k, v in variables.items())
        print(f"dinov2 job {job_env.job_id}: {described}; {self.entry.module}.main({self.argv})", flush=True)
        if getattr(job_env, "cluster", None) != "local" or int(job_env.num_tasks) == 1:
            return self.entry.run(self.argv)  # on SLURM, srun --kill-on-bad-exit ends the other tasks
        try:
            return self.entry.run(self.argv)
        except BaseException as error:
            code = error.code if isinstance(error, SystemExit) else 1
            if not isinstance(error, KeyboardInterrupt) and code not in (0, None):  # not the controller's SIGINT
                failure = None if code == LOCAL_REQUEUE_RETURN_CODE else traceback.format_exc()
                stop_local_peers(job_env, failure)
            raise

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption or time-out (rank 0 only): requeue the same command.
        The entry point resumes from the latest checkpoint of its output directory."""
        argv = drop_start_over(self.argv, self.entry.start_over)
        dropped = _start_over_given(self.argv, self.entry.start_over)
        if dropped:
            print(f"requeue: {' '.join(dropped)} dropped so that the requeued job resumes from what it had finished",
                  flush=True)  # fmt: skip
        print(f"requeue: {self.entry.module}.main({argv})", flush=True)
        return submitit.helpers.DelayedSubmission(type(self)(self.entry, argv), *args, **kwargs)

    def __repr__(self) -> str:
        return f"Launched({self.entry.module}, {self.argv})"


def _local_peer_tasks(job_id: str) -> dict[int, int]:
    """``{task id: pid}`` of the other running tasks of this local job: the processes that submitit's
    local controller (this task's parent) started for the same job id. Empty where there is no /proc."""
    peers: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            if pid == os.getpid() or int(stat.read_text().rsplit(")", 1)[1].split()[1]) != os.getppid():
                continue
            environ = (stat.parent / "environ").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours
            continue
        env = dict(item.split("=", 1) for item in environ if "=" in item)
        if env.get("SUBMITIT_LOCAL_JOB_ID") == str(job_id) and env.get("SUBMITIT_LOCAL_GLOBALID", "").isdigit():
            peers[int(env["SUBMITIT_LOCAL_GLOBALID"])] = pid
    return peers


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_local_peers(job_env: Any, failure: str | None, wait_s: float = 5.0) -> list[int]:
    """What ``srun --kill-on-bad-exit=1`` does on SLURM, for submitit's local executor, whose controller
    waits for every task: kill the job's other tasks, which would otherwise wait for this one in their
    next collective (or in the rendezvous) until the process-group timeout (30 minutes for gloo).

    ``failure`` (this task's traceback; ``None`` for a requeue, whose tasks restart) becomes the
    result of each stopped task, so that ``job.results()`` names the task that failed and its error
    rather than a peer's "connection closed" or a missing result. Returns the stopped task ids."""
    peers = _local_peer_tasks(job_env.job_id)
    for pid in peers.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + wait_s
    while any(_running(pid) for pid in peers.values()) and time.monotonic() < deadline:
        time.sleep(0.02)
    rank = int(job_env.global_rank)
    if peers:
        why = "failed" if failure is not None else "is being requeued"
        print(f"dinov2 job {job_env.job_id}: task {rank} {why}; stopped task(s) {sorted(peers)}",
              file=sys.stderr, flush=True)  # fmt: skip
    if failure is None:
        return sorted(peers)
    message = f"stopped because task {rank} of job {job_env.job_id} failed; task {rank}'s error:\n{failure}"
    for task in sorted(peers):
        paths = JobPaths(job_env.paths.folder, job_env.job_id, task)
        try:
            with paths.stderr.open("a", encoding="utf-8") as log:
                log.write(f"dinov2: {message}\n")
            if not paths.result_pickle.exists():  # a result it wrote itself stays
                with temporary_save_path(paths.result_pickle) as tmp:
                    cloudpickle_dump(("error", message), tmp)
        except Exception as error:  # reporting must not hide this task's own error
            print(f"could not record why task {task} was stopped: {error}", file=sys.stderr, flush=True)
    return sorted(peers)


# --------------------------------------------------------------------------- in the submitting process
def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option of ``parser`` and of its sub-commands' parsers."""
    found = []
    for action in parser._actions:
        found.extend(action.option_strings)
        for sub in (action.choices or {}).values() if isinstance(action.choices, dict) else ():
            found.extend(_option_strings(sub))
    return found


def check_misspelt_job_options(entry_argv: Sequence[str], entry_parser: argparse.ArgumentParser) -> None:
    """A job option misspelt (``--ngpu``, ``--node``) is left to the entry point, whose parser only says
    it does not know it; name the job option it resembles instead."""
    known, job_options = _option_strings(entry_parser), _option_strings(get_slurm_args_parser())
    for arg in entry_argv:
        option = arg.split("=", 1)[0]
        if not option.startswith("--") or any(k.startswith(option) for k in known):  # the entry's (or a prefix)
            continue
        close = difflib.get_close_matches(option, job_options, n=1, cutoff=0.75)
        if close:
            raise SystemExit(f"unknown option {option}: did you mean {close[0]}? (a job option; see --help)")


def parse_launcher_args(
    entry: EntryPoint, argv: Sequence[str] | None = None
) -> tuple[argparse.Namespace, list[str], argparse.Namespace]:
    """Split ``argv`` into ``(slurm_args, entry_argv, entry_args)``. The SLURM options are taken out
    wherever they appear; the rest is what the entry point receives, parsed here to fail early."""
    argv = list(sys.argv[1:] if argv is None else argv)
    slurm_parser = get_slurm_args_parser()
    if "-h" in argv or "--help" in argv:
        parents = [slurm_parser, entry.get_args_parser(add_help=False)]
        argparse.ArgumentParser(description=f"Submit {entry.module}.main with submitit", parents=parents).print_help()
        raise SystemExit(0)
    slurm_args, entry_argv = slurm_parser.parse_known_args(argv)
    entry_parser = entry.get_args_parser(add_help=False)
    entry_parser.set_defaults(output_dir=None)  # the launchers need an explicit --output-dir
    check_misspelt_job_options(entry_argv, entry_parser)
    entry_args = entry.parse_args(entry_parser, entry_argv)
    requeued = entry.parse_args(entry_parser, drop_start_over(entry_argv, entry.start_over))
    for option, dest, _ in entry.start_over:
        if getattr(requeued, dest, None):  # an abbreviation (--no-res): the requeued job would start over again
            raise SystemExit(f"write {option} in full: a requeued job is resubmitted without it")
    return slurm_args, entry_argv, entry_args


def check_local_gpus(ngpus: int) -> None:
    """On a machine with CUDA, one task per GPU needs ``ngpus`` GPUs here: with fewer, tasks would
    share a GPU and NCCL stops the job ("duplicate GPU"). Without CUDA the tasks run on the CPU."""
    import torch

    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available and ngpus > available:
        raise SystemExit(f"--executor local with --ngpus {ngpus}, but this machine has {available} GPU(s): "
                         f"pass --ngpus {available} or fewer (the default is 8)")  # fmt: skip


def check_submission(entry: EntryPoint, slurm_args: argparse.Namespace, entry_args: argparse.Namespace) -> None:
    """Refuse what would only fail once the job starts: no output directory, a config that does not
    load, a negative job shape, several nodes or more GPUs than this machine has on the local executor."""
    if not entry_args.output_dir:
        swallowed = [opt for opt in entry_args.opts or () if opt.startswith("--")]
        hint = f"; {' '.join(swallowed)} came after a key=value override: options go first" if swallowed else ""
        raise SystemExit("--output-dir is required: the job writes its logs, results and checkpoints there "
                         f"(%j in it becomes the job id){hint}")  # fmt: skip
    if slurm_args.nodes < 1 or slurm_args.ngpus < 0:
        raise SystemExit(f"--nodes must be >= 1 and --ngpus >= 0, got {slurm_args.nodes} and {slurm_args.ngpus}")
    if slurm_args.executor == "local" and slurm_args.nodes != 1:
        raise SystemExit(f"--executor local runs on this machine only: use --nodes 1 (got {slurm_args.nodes})")
    if slurm_args.executor == "local":
        check_local_gpus(slurm_args.ngpus)
    try:
        entry.load_config(getattr(entry_args, entry.config_attr) or None, list(entry_args.opts or ()))
    except (ConfigError, FileNotFoundError, ValueError) as error:
        raise SystemExit(f"config: {error}") from None
    output_dir = Path(entry_args.output_dir)
    starts_over = getattr(entry_args, "no_resume", False) and not entry.sets_aside
    if starts_over and "%j" not in str(output_dir) and output_dir.is_dir():
        if any(output_dir.iterdir()):
            print(f"warning: {output_dir} is not empty; a requeued job resumes from the newest checkpoint there, "
                  "which may be an older run's if this one has not written any yet", file=sys.stderr)  # fmt: skip


def submitit_folder(slurm_args: argparse.Namespace, output_dir: str) -> Path:
    """Where submitit writes its files (absolute). submitit's local controller creates its folder
    before the job id exists and without parents (submitit 1.5), so locally a folder with ``%j`` is
    replaced by ``<the part before %j>/submitit_local``."""
    folder = Path(slurm_args.slurm_output_dir or Path(output_dir) / "slurm").absolute()
    if slurm_args.executor == "local" and "%j" in str(folder):
        folder = JobPaths.get_first_id_independent_folder(folder) / "submitit_local"
    return folder


def make_executor(slurm_args: argparse.Namespace, folder: str | Path, name: str) -> submitit.AutoExecutor:
    """An AutoExecutor for ``--executor`` with the job shape: one task per GPU on each node."""
    try:
        executor = submitit.AutoExecutor(
            folder=folder,
            cluster=slurm_args.executor,
            slurm_max_num_timeout=slurm_args.max_num_timeout,
            local_max_num_timeout=slurm_args.max_num_timeout,
        )
    except RuntimeError as error:  # no srun on this machine
        raise SystemExit(f"cannot submit to SLURM from here ({error}); --executor local runs on this machine") from None
    executor.update_parameters(
        name=name,
        nodes=slurm_args.nodes,
        gpus_per_node=slurm_args.ngpus or None,
        tasks_per_node=max(slurm_args.ngpus, 1),
        cpus_per_task=slurm_args.cpus_per_task,
        timeout_min=slurm_args.timeout,
        mem_gb=slurm_args.mem_gb,
        slurm_partition=slurm_args.partition or None,
        slurm_comment=slurm_args.comment or None,
        slurm_exclude=slurm_args.exclude or None,
        slurm_constraint=slurm_args.constraint or None,
        slurm_account=slurm_args.account or None,
        slurm_qos=slurm_args.qos or None,
        slurm_signal_delay_s=SIGNAL_DELAY_S,
        slurm_srun_args=list(SRUN_ARGS),
    )  # None values are left out by submitit
    return executor


def submit(entry: EntryPoint, argv: Sequence[str] | None = None) -> submitit.Job:
    """Parse, check and submit; prints the job id and where its outputs go. Returns the job."""
    slurm_args, entry_argv, entry_args = parse_launcher_args(entry, argv)
    check_submission(entry, slurm_args, entry_args)
    folder = submitit_folder(slurm_args, entry_args.output_dir)
    executor = make_executor(slurm_args, folder, entry.job_name)
    job = executor.submit(Launched(entry, entry_argv))
    output_dir = entry_args.output_dir.replace("%j", str(job.job_id))
    tasks = slurm_args.nodes * max(slurm_args.ngpus, 1)
    print(f"Submitted job {job.job_id} ({entry.job_name}, {slurm_args.executor}, {tasks} task(s))")
    print(f"  output dir: {output_dir}")
    print(f"  submitit logs: {job.paths.folder}")
    return job
