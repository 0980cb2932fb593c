"""One training job per output directory: an exclusive ``flock`` on ``DIR/.training.lock``, taken by
rank 0 before a run moves, writes or prunes anything there (:func:`lock_for_training`, a collective),
and gone with the process that holds it, however it ends."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from dinov2 import distributed

logger = logging.getLogger("dinov2")

LOCK_FILE = ".training.lock"
_HELD_LOCKS: dict[str, int] = {}  # resolved lock file -> the descriptor this process holds it with
_FORK_HOOK: list[bool] = []  # non-empty once the fork hook is registered (on the first lock)


class OutputDirectoryInUseError(RuntimeError):
    """Another process (a second job started on the same output directory) trains into it."""


def _lock_holder(path: Path) -> str:
    """Who holds the lock ``path``, as its holder wrote it (empty while that holder is writing it)."""
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "holder unknown"
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    return f"process {holder.get('pid')} on host {holder.get('host')}{job}, since {started}"


def lock_output_directory(directory: str | os.PathLike) -> None:
    """Make this process the one training job writing into the output ``directory`` (rank 0 calls it):
    an exclusive ``flock`` on ``directory/.training.lock``, held until :func:`unlock_output_directory` or until
    the process ends, however it ends (the kernel, or the NFS server once its lease lapses, drops the
    lock of a killed or crashed process, so a crash or a SLURM requeue never leaves a stale lock behind).
    A directory locked by another process raises :class:`OutputDirectoryInUseError` naming it;
    the lock file itself is never deleted (that would let two processes lock two different files).
    On a file system without locks (Lustre mounted without ``flock``) a warning is logged instead."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return
    path = Path(directory) / LOCK_FILE
    key = os.path.realpath(path)
    if key in _HELD_LOCKS:  # this process holds it already (an earlier run in the same process)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputDirectoryInUseError(
            f"{directory} is in use by another training job ({_lock_holder(path)}): two jobs on one output "
            "directory would overwrite and prune each other's checkpoints. Stop that job or wait for it to end "
            "(its lock goes with its processes, however they end), or give this one another --output-dir"
        ) from None
    except OSError as exc:
        os.close(fd)
        logger.warning("cannot lock %s (%s): a second job started on this output directory would go unnoticed",
                       path, exc)  # fmt: skip
        return
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID")}  # fmt: skip
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    if not _FORK_HOOK and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_drop_inherited_locks)
        _FORK_HOOK.append(True)
    _HELD_LOCKS[key] = fd


def _drop_inherited_locks() -> None:
    """In a forked child (a data-loader worker): close the inherited lock descriptors, without
    unlocking, so that the lock goes as soon as the process that took it ends, not with its workers."""
    for fd in _HELD_LOCKS.values():
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCKS.clear()


def unlock_output_directory(directory: str | os.PathLike) -> None:
    """Release what :func:`lock_output_directory` took (nothing if this process holds no lock there)."""
    fd = _HELD_LOCKS.pop(os.path.realpath(Path(directory) / LOCK_FILE), None)
    if fd is not None:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)  # for every process that shares the descriptor, too
        os.close(fd)


def lock_for_training(directory: str | os.PathLike) -> None:
    """:func:`lock_output_directory` on rank 0, a collective: when the directory is in use, every
    rank stops at once (rank 0 with the error that names the other job)."""
    rank_0 = distributed.get_rank() == 0
    distributed.on_every_rank(lambda: lock_output_directory(directory) if rank_0 else None,
                              f"locking {directory}", OutputDirectoryInUseError)  # fmt: skip
