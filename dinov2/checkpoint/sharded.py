"""Sharded training checkpoints with torch.distributed.checkpoint (DCP): world-size independent.

Layout under a run's ``checkpoints/`` directory::

    step_0001250/                   one checkpoint (the newest ``keep_last`` are kept)
        .metadata, __0_0.distcp ... DCP: model (student, teacher, loss centres) and optimizer state,
                                    each tensor stored once, whatever the sharding it was saved from
        trainer_state.pth           iteration, samples consumed, gradient-scaler state, extras
        rng_rank0.pth ...           each rank's Python/NumPy/torch RNG states

Every process writes its shards into a hidden ``.step_0001250.tmp`` directory; once all are done,
rank 0 renames it onto ``step_0001250``, so a crash never leaves a half-written checkpoint under a
final name. Old checkpoints are renamed to a hidden name before they are deleted, and the next save
deletes whatever hidden ``.step_*.tmp`` directories a crash left behind. Loading reshards to the
current world size: a checkpoint saved on N ranks resumes on M. A training job locks its output
directory (:func:`dinov2.checkpoint.lock.lock_for_training`), so that a second job started on it
stops instead of interleaving its checkpoints with the first's.

Nothing is unpickled beyond weights-only data: the small non-tensor states are plain
``torch.save`` files read with ``weights_only=True``; DCP's tensors are read weights-only by DCP
itself, its non-tensor entries (the optimizer's ``param_groups``) by a load planner that uses
``weights_only=True`` where DCP's own would not, and the DCP metadata with an unpickler that only
accepts DCP's own metadata classes (the storage layer: :mod:`dinov2.checkpoint.dcp_storage`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from dinov2 import distributed
from dinov2.checkpoint.dcp_storage import safe_reader, safe_writer, weights_only_planner
from dinov2.checkpoint.training import (
    CheckpointLoadError,
    _fsync_path,
    _remove_quietly,
    _remove_temporaries,
    _swap_in_directory,
    _temp_name,
)

logger = logging.getLogger("dinov2")

STEP_PATTERN = re.compile(r"^step_(\d+)$")
# What a crashed save or pruning leaves behind: ``.step_N.tmp`` (being written), ``.step_N.<hex>.tmp``
# (moved aside to be replaced or deleted).
TEMP_PATTERN = re.compile(r"^\.step_\d+(?:\.[0-9a-f]+)?\.tmp$")
TRAINER_STATE = "trainer_state.pth"
METADATA = ".metadata"


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a directory that is not writable...), on this
    rank or another; the message names the checkpoint, the rank(s) and their errors where known."""


# What an error's errno says about the directory a checkpoint was being written into.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _rank_failures(error: BaseException) -> list[tuple[int, BaseException]]:
    """``(rank, error)`` of every rank that failed: those DCP gathered into its CheckpointException
    (raised alike on every rank), else this rank's own ``error``."""
    if isinstance(error, CheckpointException):
        return sorted(((rank, failure[0]) for rank, failure in error.failures.items()), key=lambda item: item[0])
    return [(distributed.get_rank(), error)]


def _explain(error: BaseException, directory: Path | None = None) -> str:
    """One line per failed rank (``rank 1: OSError: [Errno 28] No space left on device``) instead of
    DCP's multi-line report, and what a full or read-only ``directory`` means for the user."""
    failures = _rank_failures(error)
    text = "; ".join(f"rank {rank}: {type(exc).__name__}: {exc}" for rank, exc in failures)
    codes = {exc.errno for _, exc in failures if isinstance(exc, OSError)}
    if directory is not None and codes & set(DISK_FULL):
        text += f" (disk full or over quota where {directory} is: free space there, or use another --output-dir)"
    elif directory is not None and codes & set(NOT_WRITABLE):
        text += f" ({directory} is not writable by this process: a read-only file system or missing permissions)"
    return text


def _on_every_rank(action, what: str, error_type: type[Exception]) -> Any:
    """:func:`dinov2.distributed.on_every_rank`, sharing DCP's own report too (a BaseException)."""
    return distributed.on_every_rank(action, what, error_type, catch=(Exception, CheckpointException))


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pth"


def step_path(directory: str | os.PathLike, iteration: int) -> Path:
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return Path(directory) / f"step_{iteration:07d}"


def is_complete(path: Path) -> bool:
    return (path / METADATA).is_file() and (path / TRAINER_STATE).is_file()


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of every complete ``step_<digits>`` checkpoint, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        match = STEP_PATTERN.match(entry.name)
        if match and entry.is_dir() and is_complete(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda item: (item[0], item[1].name))


def find_latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete ``step_<N>`` checkpoint with the largest ``N``; None if there is none."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


class CheckpointNotVisibleError(RuntimeError):
    """The checkpoint rank 0 resumes from is missing or incomplete as another rank sees it."""


def agreed_latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """:func:`find_latest_checkpoint` as rank 0 sees it, on every rank (a collective).

    Each rank listing the directory itself could pick another step, or none, where a shared file
    system shows a node a stale listing, and the ranks would then wait for each other in different
    collectives until the process-group timeout. Here rank 0 chooses; a rank that cannot see that
    checkpoint whole stops every rank at once with :class:`CheckpointNotVisibleError` naming it."""
    rank_0 = distributed.get_rank() == 0
    return agreed_checkpoint(lambda: find_latest_checkpoint(directory) if rank_0 else None,
                             f"listing the checkpoints in {directory}")  # fmt: skip


def agreed_checkpoint(find: Callable[[], Path | None], what: str) -> Path | None:
    """What ``find`` returns on rank 0 (a checkpoint directory, or None), on every rank (a collective).

    ``find`` runs on every rank: an error there stops every rank at once (each failed rank with its
    own error, the others with :class:`CheckpointNotVisibleError` naming it, ``what`` saying what
    was being done); then a rank that does not see rank 0's pick whole stops every rank likewise."""
    found = _on_every_rank(find, what, CheckpointNotVisibleError)
    if distributed.get_world_size() == 1:
        return found
    import torch.distributed as dist

    chosen: list[str | None] = [None if found is None else str(found)]
    dist.broadcast_object_list(chosen, src=0, device=distributed.collective_device())
    if chosen[0] is None:
        return None
    path = Path(chosen[0])

    def check_visible() -> None:
        if not is_complete(path):
            raise CheckpointNotVisibleError(
                f"rank {distributed.get_rank()} does not see {path} whole ({METADATA} and {TRAINER_STATE}), the "
                "checkpoint rank 0 chose: is its directory on a file system every node shares?"
            )

    _on_every_rank(check_visible, f"finding {path}", CheckpointNotVisibleError)
    return path


def read_tensor_metadata(path: str | os.PathLike) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """``{flattened key: (global shape, dtype)}`` of the tensors stored in the DCP checkpoint ``path``."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(path)
    if not (path / METADATA).is_file():
        raise FileNotFoundError(f"not a DCP checkpoint (no {METADATA}): {path}")
    try:
        metadata = safe_reader(path).read_metadata()
    except Exception as exc:
        raise CheckpointLoadError(f"cannot read checkpoint metadata in {path}: {exc}") from exc
    return {
        key: (meta.size, meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if isinstance(meta, TensorStorageMetadata)
    }


def load_full_tensors(path: str | os.PathLike, prefix: str) -> dict[str, torch.Tensor]:
    """Every tensor whose key starts with ``prefix``, whole and on CPU, keys without the prefix.
    Needs no process group and no knowledge of the world size the checkpoint was saved with."""
    import torch.distributed.checkpoint as dcp

    wanted = {k: v for k, v in read_tensor_metadata(path).items() if k.startswith(prefix)}
    if not wanted:
        raise KeyError(f"no tensor under {prefix!r} in checkpoint {path}")
    state = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in wanted.items()}
    try:
        dcp.load(state, storage_reader=safe_reader(Path(path)), planner=weights_only_planner(), no_dist=True)
    except (Exception, CheckpointException) as exc:
        raise CheckpointLoadError(f"cannot read tensors of checkpoint {path}: {_explain(exc)}") from exc
    return {k[len(prefix) :]: v for k, v in state.items()}


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The iteration, samples consumed, gradient-scaler state and extras of checkpoint ``path``."""
    return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------------- save / load
def checkpointed_part(model: nn.Module) -> nn.Module:
    """What a training checkpoint holds of ``model``: ``model.checkpointed()`` where the
    meta-architecture defines it (distillation leaves out its frozen teacher, which is reloaded from
    its own file; the keys of what is kept do not change), else the whole model."""
    select = getattr(model, "checkpointed", None)
    return select() if callable(select) else model


def _model_and_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(checkpointed_part(model), optimizer)
    return {"model": model_state, "optimizer": optimizer_state}


def _prune(directory: Path, keep_last: int, just_written: Path) -> None:
    if keep_last <= 0:
        return
    stale = [p for _, p in list_checkpoints(directory)[:-keep_last] if p != just_written]
    removed = []
    for old in stale:
        # Hidden first, then deleted: an interrupted deletion never leaves a partial step_N behind.
        # A deletion that fails (an NFS file still open elsewhere...) does not fail the save that
        # has just succeeded: it is logged, and what is left is deleted by the next save.
        try:
            hidden = _temp_name(old, directory=True)
            os.replace(old, hidden)
            removed.append(old.name)
            _remove_quietly(hidden)
        except OSError as exc:
            logger.warning("could not delete the old checkpoint %s (retried at the next save): %s", old, exc)
    if removed:
        logger.info("removed %d old checkpoint(s): %s", len(removed), ", ".join(removed))


def _save_synced(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path``, flushed and fsynced by the process that wrote it."""
    with open(path, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    directory: str | os.PathLike,
    iteration: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    rng_state: dict[str, Any],
    keep_last: int = 3,
) -> Path:
    """Write ``directory/step_{iteration:07d}`` (a collective: every rank calls it); returns its path.

    ``trainer_state`` (rank 0's is written) and ``rng_state`` (each rank's own) must survive
    ``torch.load(weights_only=True)``. Afterwards the newest ``keep_last`` checkpoints remain. A rank
    that fails (its RNG file cannot be written...) raises its error and every other rank raises a
    :class:`CheckpointWriteError` naming it, at once; the earlier checkpoints are left as they were."""
    import torch.distributed.checkpoint as dcp

    directory, rank = Path(directory), distributed.get_rank()
    final = step_path(directory, iteration)
    tmp = directory / f".{final.name}.tmp"

    def explained(action, what: str):
        """``action`` whose error (this rank's, or DCP's report of every failed rank) is raised as a
        CheckpointWriteError that names the checkpoint and says what a full or read-only disk means."""

        def run() -> None:
            try:
                action()
            except (Exception, CheckpointException) as exc:
                raise CheckpointWriteError(f"{what} checkpoint {final}: {_explain(exc, directory)}") from exc

        return run

    def prepare() -> None:
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            _remove_temporaries(directory, TEMP_PATTERN)  # of crashed earlier saves, of any iteration
            tmp.mkdir()

    state: dict[str, Any] = {}

    def collect() -> None:  # per rank, before DCP's collectives: a rank that fails must not leave the others in them
        state.update(_model_and_optimizer_state(model, optimizer))

    def write() -> None:
        # Each rank makes its own files durable before the others go on (DCP fsyncs its shards and
        # metadata, ``sync_files``): on a shared file system rank 0's fsync of a file another node wrote
        # flushes nothing of that node's writes. Rank 0 then only syncs the directory and renames it.
        dcp.save(state, storage_writer=safe_writer(tmp))
        _save_synced(rng_state, tmp / rng_file(rank))
        if rank == 0:
            _save_synced({**trainer_state, "world_size": distributed.get_world_size()}, tmp / TRAINER_STATE)

    def publish() -> None:
        if rank == 0:
            _fsync_path(tmp)
            _swap_in_directory(tmp, final)
            _prune(directory, keep_last, final)

    _on_every_rank(explained(prepare, "cannot create"), f"preparing checkpoint {final}", CheckpointWriteError)
    try:  # the all-reduce of _on_every_rank is also the barrier between the stages
        _on_every_rank(explained(collect, "cannot collect the state for"), f"collecting {final}", CheckpointWriteError)
        _on_every_rank(explained(write, "cannot write"), f"writing checkpoint {final}", CheckpointWriteError)
        _on_every_rank(explained(publish, "cannot move into place"), f"moving checkpoint {final} into place",
                       CheckpointWriteError)  # fmt: skip
    except BaseException:
        if rank == 0:
            _remove_quietly(tmp)
        raise
    return final


def _check_model_fits(path: Path, model_state: dict[str, Any], stored: dict[str, tuple]) -> None:
    """Raise a :class:`CheckpointLoadError` naming the model tensors that ``path`` (its tensors:
    ``stored``) lacks or stores with another global shape: the run's config no longer describes the
    checkpoint's model."""
    missing, mismatched = [], []
    for key, value in model_state.items():
        if not isinstance(value, torch.Tensor):
            continue
        entry = stored.get(f"model.{key}")
        if entry is None:
            missing.append(key)
        elif tuple(entry[0]) != tuple(value.shape):  # a DTensor's shape is the global one
            mismatched.append(f"{key} {tuple(entry[0])} in the checkpoint vs {tuple(value.shape)} in the model")
    if missing or mismatched:
        shown = (mismatched + [f"{k} (not in the checkpoint)" for k in missing])[:6]
        more = len(mismatched) + len(missing) - len(shown)
        raise CheckpointLoadError(
            f"training checkpoint {path} does not fit the model this run's config builds: {'; '.join(shown)}"
            f"{f'; and {more} more' if more > 0 else ''}. A changed architecture or image size (e.g. "
            "crops.global_crops_size) cannot resume this run; to start a new run from these weights, use a new "
            f"--output-dir with train.init_from={path}"
        )


def _drop_unstepped_parameters(optimizer_state: dict[str, Any], stored: dict[str, tuple]) -> list[str]:
    """Remove from ``optimizer_state`` (to be loaded) the parameters of which the checkpoint (its
    tensors: ``stored``) holds no optimizer state, and return their names. The optimizer had not
    stepped them when it was saved: every step so far skipped by the fp16 gradient scaler (its first
    steps often are), or no gradient yet. Loaded without a state, they start it at their first step,
    as they would have in the run that saved it; the other parameters' states load strictly."""
    prefix = "optimizer.state."
    saved = {key[len(prefix) :].rpartition(".")[0] for key in stored if key.startswith(prefix)}
    per_parameter = optimizer_state.get("state", {})
    unstepped = [name for name in per_parameter if name not in saved]
    for name in unstepped:
        del per_parameter[name]
    return unstepped


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load ``path`` into ``model`` and ``optimizer`` (resharded to the current world size; a
    collective). Returns the trainer state, with ``"rng"``: this rank's RNG states when the world
    size is the one the checkpoint was saved with, else None."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"not a complete training checkpoint: {path}")
    read: dict[str, Any] = {}

    def read_before_load() -> None:  # per rank: a rank that fails here must not leave the others in dcp.load
        try:
            read["trainer"] = load_trainer_state(path)
            read["state"], read["stored"] = _model_and_optimizer_state(model, optimizer), read_tensor_metadata(path)
            _check_model_fits(path, read["state"]["model"], read["stored"])
            read["unstepped"] = _drop_unstepped_parameters(read["state"]["optimizer"], read["stored"])
        except CheckpointLoadError:
            raise
        except Exception as exc:
            raise CheckpointLoadError(f"cannot load training checkpoint {path}: {exc}") from exc

    _on_every_rank(read_before_load, f"reading checkpoint {path}", CheckpointLoadError)
    trainer_state, state, unstepped = read["trainer"], read["state"], read["unstepped"]
    try:  # DCP shares a rank's failure with every rank itself
        dcp.load(state, storage_reader=safe_reader(path), planner=weights_only_planner())
    except CheckpointLoadError:
        raise
    except (Exception, CheckpointException) as exc:  # DCP's own error is a BaseException
        raise CheckpointLoadError(f"cannot load training checkpoint {path}: {_explain(exc)}") from exc
    rank, world = distributed.get_rank(), distributed.get_world_size()
    rng_path = path / rng_file(rank)
    same_world = int(trainer_state.get("world_size", -1)) == world
    trainer_state["rng"] = None

    def apply_and_read_rng() -> None:  # per rank: one that fails here must not leave the others waiting
        part = checkpointed_part(model)
        try:
            set_model_state_dict(part, state["model"])
            # strict only where every parameter has a state: the unstepped ones must stay without one
            options = StateDictOptions(strict=not unstepped)
            set_optimizer_state_dict(part, optimizer, state["optimizer"], options=options)
        except Exception as exc:
            raise CheckpointLoadError(f"cannot load training checkpoint {path} into the model: {exc}") from exc
        if same_world and rng_path.is_file():
            try:
                trainer_state["rng"] = torch.load(rng_path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise CheckpointLoadError(f"cannot read the RNG states {rng_path}: {exc}") from exc

    _on_every_rank(apply_and_read_rng, f"loading checkpoint {path}", CheckpointLoadError)  # every rank stops, or none
    return trainer_state
