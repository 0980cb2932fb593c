"""Process-group helpers that are no-ops in a single process.

Every collective takes an explicit ``group`` (``None``: the default group). Without an
initialised process group (one CPU process, a notebook, the tests) the helpers behave as a
world of size 1: reductions return their input unchanged and gathers return it as is.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
import zlib

import torch
import torch.distributed as dist


def is_enabled() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_enabled() else 1


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_enabled() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce(tensor: torch.Tensor, op=None, group=None, async_op: bool = False):
    """In-place all-reduce (sum by default). Returns the work handle with ``async_op`` (``None`` when
    not distributed), else the tensor."""
    if get_world_size(group) == 1:
        return None if async_op else tensor
    work = dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group, async_op=async_op)
    return work if async_op else tensor


def collective_device(group=None) -> torch.device:
    """Where a small collective's tensor must live: this process's current CUDA device under NCCL
    (:func:`init_from_env` makes the rank's own GPU the current one), else the CPU (gloo, or no group)."""
    if is_enabled() and "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def failed_ranks(failed_here: bool, group=None) -> list[int]:
    """The ranks whose ``failed_here`` was True, learnt with one all-reduce (a collective: every rank
    must call, so it is also a barrier). A rank that fails can so stop every rank at once, instead of
    the others waiting for it in a later collective until the process-group timeout."""
    world = get_world_size(group)
    if world == 1:
        return [0] if failed_here else []
    flags = torch.zeros(world, dtype=torch.int32, device=collective_device(group))
    flags[get_rank(group)] = int(failed_here)
    return all_reduce(flags, group=group).cpu().nonzero().flatten().tolist()


def rank_zero_says(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (a collective; the other ranks' ``flag`` is ignored): a decision
    that rests on what rank 0 sees, such as a file on a shared file system, taken once for all ranks."""
    return 0 in failed_ranks(bool(flag) and get_rank() == 0)


def on_every_rank(
    action, what: str, error_type: type[Exception], catch: tuple[type[BaseException], ...] = (Exception,)
):
    """Run ``action`` on this rank, then tell every rank which ranks failed (:func:`failed_ranks`, one
    all-reduce, also the barrier): a rank that failed re-raises its own error; every other rank
    raises ``error_type`` naming each failed rank and its error (``"{what} failed on rank 1:
    OSError: ..."``), instead of waiting for it in a later collective until the process-group
    timeout. Errors of the ``catch`` types are shared; anything else (an interrupt) propagates as it
    is. A collective: every rank must call. Returns what ``action`` returned."""
    error, result = None, None
    try:
        result = action()
    except catch as caught:
        error = caught
    try:
        failed = failed_ranks(error is not None)
    except Exception as collective_error:
        if error is None:
            raise
        # a peer gone or stuck: this rank's own error is what says what went wrong, not the timeout
        logging.getLogger("dinov2").error("%s: could not tell the other ranks of this rank's error (%s: %s)",
                                          what, type(collective_error).__name__, collective_error)  # fmt: skip
        raise error from None
    if not failed:
        return result
    causes: list[str | None] = [None] * get_world_size()
    if len(causes) > 1:  # every rank knows that some rank failed, so every rank joins this gather
        mine = None if error is None else f"{type(error).__name__}: {error}"[:1000]
        dist.all_gather_object(causes, mine)
    if error is not None:
        raise error
    raise error_type(f"{what} failed on " + "; ".join(f"rank {r}: {causes[r]}" for r in failed))


class RunCount:
    """A count over a whole run: what the run counted before it was resumed (``earlier``, from its
    checkpoint) plus what each rank counts now (``local``), e.g. unreadable images skipped."""

    def __init__(self, earlier: int = 0) -> None:
        self.earlier, self.local = int(earlier), 0

    def total(self, device: torch.device) -> int:
        """``earlier`` plus ``local`` summed over ranks; a collective: every rank must call."""
        count = torch.tensor([self.local], dtype=torch.int64, device=device)
        return self.earlier + int(all_reduce(count).item())


def all_gather_cat(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0 (rank order). Not differentiable."""
    world = get_world_size(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)


NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list in its compressed form: ``node[01-04,07],gpu5`` ->
    ``node01`` (zero padding kept; each bracket of the first name replaced by its first value)."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    name = nodelist[:end].strip()
    host = re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[-,]", m.group(1))[0].strip(), name)
    if not name or depth < 0 or "[" in host or "]" in host or not host:
        raise ValueError(f"cannot read the first host of the SLURM node list {nodelist!r}")
    return host


def _first_slurm_host() -> str:
    """Where rank 0 of this ``srun`` step runs: the first node of the step (a step may use only some
    of the job's nodes), else of the job."""
    for key in NODELIST_VARIABLES:
        if os.environ.get(key):
            return first_host(os.environ[key])
    raise RuntimeError(f"none of {', '.join(NODELIST_VARIABLES)} is set: set MASTER_ADDR to rank 0's host")


def _slurm_tasks_on_this_node() -> int:
    """How many tasks of this ``srun`` step run on this node: this node's entry (``SLURM_NODEID``) of
    ``SLURM_STEP_TASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE`` (compressed: ``8(x2),4`` is 8 tasks on
    each of two nodes, then 4), else the job's ``SLURM_NTASKS_PER_NODE`` (set only when it asked for
    one, and not the step's count when the step asks for fewer), else 1."""
    compressed = os.environ.get("SLURM_STEP_TASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE")
    if not compressed:
        return int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    per_node: list[int] = []
    try:
        for group in compressed.split(","):
            count, _, repeat = group.partition("(x")
            per_node.extend([int(count)] * (int(repeat.rstrip(")")) if repeat else 1))
    except ValueError:
        raise ValueError(f"cannot read SLURM's tasks per node {compressed!r}") from None
    node = int(os.environ.get("SLURM_NODEID", "0"))
    if not 0 <= node < len(per_node):
        raise ValueError(f"SLURM_NODEID={node} but SLURM's tasks per node {compressed!r} list {len(per_node)} nodes")
    return per_node[node]


STEP_ID_VARIABLES = ("SLURM_STEP_ID", "SLURM_STEPID")


def _slurm_task_count() -> int:
    """The tasks of this ``srun`` step: ``SLURM_STEP_NUM_TASKS``, else ``SLURM_NTASKS``."""
    value = os.environ.get("SLURM_STEP_NUM_TASKS") or os.environ.get("SLURM_NTASKS", "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"cannot read SLURM's task count {value!r}") from None


def _warn_outside_srun(ntasks: str) -> None:
    """A job of several tasks whose process was not started by ``srun`` (an sbatch script's own line)."""
    if ntasks not in ("", "1"):
        warnings.warn(
            f"SLURM_NTASKS={ntasks} but this process was not started by srun (no SLURM_STEP_ID): running as "
            "a single process. Start one process per task with srun (or torchrun) to use them all",
            RuntimeWarning,
            stacklevel=3,
        )


def setup_env_from_slurm() -> bool:
    """Fill torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) from SLURM's (``SLURM_PROCID``, the step's task count, ``SLURM_LOCALID``,
    the step's node list and the job id) when a task started by ``srun`` (or submitit) lacks them.
    Variables already set win. Returns True when SLURM's were used.

    Only a task of an ``srun`` step counts: the batch script of ``sbatch`` (and ``salloc``'s shell) is
    one process, though it sees the job's ``SLURM_NTASKS`` and ``SLURM_PROCID=0``. SLURM sets
    ``SLURM_STEP_ID`` in srun's tasks only, so without it the process stays single (with a warning
    when the job asked for several tasks: they would have to be started by ``srun``)."""
    counted = "SLURM_STEP_NUM_TASKS" in os.environ or "SLURM_NTASKS" in os.environ
    if "WORLD_SIZE" in os.environ or "SLURM_PROCID" not in os.environ or not counted:
        return False
    if not any(key in os.environ for key in STEP_ID_VARIABLES):
        _warn_outside_srun(os.environ.get("SLURM_NTASKS", "").strip())
        return False
    env = {
        "RANK": os.environ["SLURM_PROCID"],
        "WORLD_SIZE": str(_slurm_task_count()),
        "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(_slurm_tasks_on_this_node()),
    }
    if int(env["WORLD_SIZE"]) > 1:
        env.setdefault("MASTER_ADDR", os.environ.get("MASTER_ADDR") or _first_slurm_host())
        env.setdefault("MASTER_PORT", os.environ.get("MASTER_PORT") or str(_slurm_master_port()))
    for key, value in env.items():
        os.environ.setdefault(key, value)
    return True


# MASTER_PORT range: above the commonly used service ports, below Linux's ephemeral range (32768-60999).
PORT_BASE, PORT_SPAN = 20000, 10000


def master_port(job_id: str, step: int = 0) -> int:
    """A port in ``[PORT_BASE, PORT_BASE + PORT_SPAN)`` that every task of a job (step) derives alike:
    ``(job id + 7919 x step) mod PORT_SPAN`` (a CRC of the id for array ids such as ``123_4``).
    Consecutive jobs get different ports, and so do steps of one job that run at once on the same
    first node (7919 is prime to 10000: steps 0 to 9999 never share one); step 0 is the job's own."""
    value = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return PORT_BASE + (value + 7919 * step) % PORT_SPAN


def _slurm_master_port() -> int:
    """:func:`master_port` of this srun step (``SLURM_JOB_ID``, ``SLURM_STEP_ID``)."""
    step = next((os.environ[key] for key in STEP_ID_VARIABLES if os.environ.get(key, "").isdigit()), "0")
    return master_port(os.environ.get("SLURM_JOB_ID", "0"), int(step))


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group that torchrun or SLURM (see :func:`setup_env_from_slurm`) describes:
    NCCL for CUDA devices, gloo otherwise. Returns True when running distributed. A single process
    (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``) stays unaffected."""
    if is_enabled():
        return True
    setup_env_from_slurm()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    if backend == "nccl":
        torch.cuda.set_device(device)  # device meshes and NCCL use the current device
    dist.init_process_group(backend=backend, **kwargs)
    return True


def barrier(group=None) -> None:
    """Wait for every rank of ``group``; a no-op in a single process."""
    if get_world_size(group) > 1:
        dist.barrier(group=group)


def shutdown() -> None:
    """The end of a distributed run that completed: wait for every rank, then destroy the default
    process group (and the groups of the device meshes), as PyTorch asks before exit (NCCL warns
    otherwise). A no-op without a process group. Call it only for a group this process joined for
    the run (:func:`init_from_env` where no group existed yet), and not on an error path: there,
    destroying an NCCL group waits for collectives that a failed peer will never join, while a
    process that just exits aborts its communicators."""
    if not is_enabled():
        return
    barrier()
    dist.destroy_process_group()


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a DTensor (an FSDP2 parameter, its gradient or optimizer state)."""
    return hasattr(tensor, "device_mesh")


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether FSDP2 manages ``module``'s parameters (they are DTensors)."""
    return any(is_dtensor(p) for p in module.parameters())


def all_reduce_mean_grads(parameters, group=None) -> None:
    """Average the ``.grad`` of ``parameters`` over ranks (data parallelism without a wrapper);
    one flattened reduction per dtype. A no-op on one process."""
    world = get_world_size(group)
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
