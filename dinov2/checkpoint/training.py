"""Atomic files, RNG state and teacher exports (sharded training state: :mod:`dinov2.checkpoint.sharded`).

Exports under a run's output directory::

    eval/training_1250/teacher_checkpoint.pth   {"teacher": teacher state dict}, the original's format
    eval/training_1250/teacher_backbone.safetensors  the teacher backbone, flat ``blocks.N.`` keys

Every file is written to a hidden temporary name in the same directory (``.<name>.<random>.tmp``),
flushed and fsynced, then renamed onto its final name, so a crash never leaves a half-written
file under a final name. Export directories are built under a hidden temporary sibling and
renamed the same way; the next export deletes the hidden ``.training_*.tmp`` directories that an
interrupted one left behind.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from dinov2.checkpoint.adapters import adapt_backbone_state_dict, strip_wrapper_keys
from dinov2.distributed import is_dtensor

logger = logging.getLogger("dinov2")

CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)\.pth$")
TEACHER_CHECKPOINT = "teacher_checkpoint.pth"
TEACHER_BACKBONE = "teacher_backbone.safetensors"
# Hidden directories of exports that a crash (or a kill) interrupted: being built, or moved aside.
EXPORT_TEMP_PATTERN = re.compile(r"^\.training_\d+\.[0-9a-f]+\.tmp$")


class CheckpointLoadError(RuntimeError):
    """A checkpoint exists but cannot be read (truncated, corrupt or not weights-only)."""


# ---------------------------------------------------------------------------------------- files
def _fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk; best effort for directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass


def _remove_temporaries(directory: Path, pattern: re.Pattern) -> list[str]:
    """Delete the entries of ``directory`` whose names match ``pattern`` (what crashed writes left
    behind); returns their names. One that cannot be deleted is logged, not raised."""
    removed = []
    for entry in sorted(directory.iterdir()):
        if pattern.match(entry.name):
            try:
                _remove_quietly(entry)
                removed.append(entry.name)
            except OSError as exc:
                logger.warning("could not delete the leftover temporary %s: %s", entry, exc)
    if removed:
        logger.info("removed %d leftover temporary(ies) of interrupted writes: %s", len(removed), ", ".join(removed))
    return removed


def _temp_name(path: Path, directory: bool = False) -> Path:
    """Create and return a fresh hidden ``.tmp`` sibling of ``path`` (a file, or a directory).

    Unlike :mod:`tempfile`, the permissions follow the umask (0666 / 0777 before it), so the
    renamed checkpoint is as readable as a file written directly.
    """
    for _ in range(100):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            if directory:
                candidate.mkdir()
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary name next to {path}")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(file)`` on a hidden ``.tmp`` sibling of ``path``, fsync it, then ``os.replace``
    it onto ``path``: the file is either fully replaced or left untouched. On any error the
    temporary file is removed and the error re-raised."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_path(path.parent)


def atomic_write_path(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """:func:`atomic_write` for writers that take a file name (``safetensors.torch.save_file``)."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        write(tmp)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_path(path.parent)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` that either fully replaces ``path`` or leaves it untouched."""
    atomic_write(path, lambda f: torch.save(obj, f))


# ------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """The state of Python's ``random``, NumPy's global RNG, torch's CPU RNG and every CUDA RNG.

    Only tensors, ints, floats, strings, None, lists and dicts: it survives
    ``torch.save`` + ``torch.load(weights_only=True)``.
    """
    version, internal, gauss_next = random.getstate()
    bit_generator, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": str(bit_generator),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what :func:`capture_rng_state` captured (CUDA states only where CUDA is available)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"]), py["gauss_next"]))
    npy = state["numpy"]
    keys = np.asarray(npy["keys"].cpu().numpy(), dtype=np.uint32)
    np.random.set_state((npy["bit_generator"], keys, npy["pos"], npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda_states = state.get("cuda")
    if not cuda_states:
        return
    if not torch.cuda.is_available():
        logger.warning("checkpoint holds CUDA RNG states but CUDA is not available; they are not restored")
        return
    count = torch.cuda.device_count()
    if len(cuda_states) != count:
        logger.warning("checkpoint holds %d CUDA RNG states for %d devices", len(cuda_states), count)
    for index, device_state in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(device_state.cpu(), device=index)


# ---------------------------------------------------------------------------------- teacher export
def _full_state_dict(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The whole state of ``module`` as CPU tensors. FSDP2-sharded tensors are gathered one at a
    time (a collective: every rank calls this); ranks with ``keep=False`` return an empty dict."""
    state = {}
    for key, value in module.state_dict().items():
        full = value.full_tensor() if is_dtensor(value) else value
        if keep:
            state[key] = full.detach().to("cpu").contiguous()
    return state


def _clean_state_dict(module: nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """:func:`_full_state_dict` without wrapper name segments (``_orig_mod.``...)."""
    raw = _full_state_dict(module, keep)
    return strip_wrapper_keys(raw)


def _write_export(target: Path, teacher_state: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    with open(target / TEACHER_CHECKPOINT, "wb") as f:
        torch.save({"teacher": teacher_state}, f)
        f.flush()
        os.fsync(f.fileno())
    backbone = {k[len("backbone.") :]: v for k, v in teacher_state.items() if k.startswith("backbone.")}
    if not backbone:
        raise ValueError("teacher has no 'backbone' module to export")
    flat, _ = adapt_backbone_state_dict(backbone)
    save_file({k: v.contiguous() for k, v in flat.items()}, str(target / TEACHER_BACKBONE), metadata={"format": "pt"})
    _fsync_path(target / TEACHER_BACKBONE)
    _fsync_path(target)


def _swap_in_directory(built: Path, final: Path) -> None:
    """Rename ``built`` onto ``final``; an existing ``final`` is moved aside first and removed after."""
    old = None
    if final.exists():
        old = _temp_name(final, directory=True)
        os.replace(final, old)  # ``old`` is an empty directory, so this rename is allowed
    try:
        os.replace(built, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    _fsync_path(final.parent)
    if old is not None:
        _remove_quietly(old)


def export_teacher(directory: str | os.PathLike, iteration: int, teacher: nn.Module, write: bool = True) -> Path:
    """Write ``directory/eval/training_{iteration}/`` with the teacher, atomically; returns its path.

    With an FSDP2-sharded teacher every rank must call this (the full tensors are gathered) and
    only the process with ``write`` (rank 0) writes.

    ``teacher`` is the meta-architecture's ``teacher`` ModuleDict (``backbone``, ``dino_head``,
    optionally ``ibot_head``). The directory holds ``teacher_checkpoint.pth`` (``{"teacher":
    state_dict}``, keys ``backbone.*``, ``dino_head.*``, ...) and ``teacher_backbone.safetensors``
    (the backbone alone, flat published key names). It is built under a hidden temporary sibling
    and renamed into place, replacing an earlier export of the same iteration.
    """
    final = Path(directory) / "eval" / f"training_{iteration}"
    teacher_state = _clean_state_dict(teacher, keep=write)
    if not write:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(final.parent, EXPORT_TEMP_PATTERN)  # of interrupted exports; gigabytes each
    built = _temp_name(final, directory=True)
    try:
        _write_export(built, teacher_state)
        _swap_in_directory(built, final)
    except BaseException:
        _remove_quietly(built)
        raise
    return final
