"""The storage layer under DCP training checkpoints: weights-only reads, errors every rank can be told.

:mod:`dinov2.checkpoint.sharded` reads and writes checkpoints through what this module builds on
first use (nothing of DCP is imported before):

- :func:`safe_writer` / :func:`safe_reader`: DCP's file-system writer and reader, whose errors
  always survive the pickling DCP does to gather them on its coordinator rank (an error that could
  not would fail the gather and leave the other ranks waiting until the process-group timeout). The
  reader unpickles ``.metadata`` with :class:`MetadataUnpickler` and names a shard file that is
  shorter than the metadata says before reading it.
- :func:`weights_only_planner`: DCP's default load planner, with the checkpoint's non-tensor
  entries (the optimizer's ``param_groups``) unpickled with ``weights_only=True``, where DCP's own
  planner would use ``weights_only=False``.
"""

from __future__ import annotations

import functools
import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch

from dinov2.checkpoint.training import CheckpointLoadError


def _shareable(method):
    """``method`` of a DCP storage writer or reader, whose errors DCP pickles to gather them on its
    coordinator rank: an error that cannot make that round trip (an exception type whose constructor
    takes other arguments than its ``args``, or that holds a lock or a file) is replaced by a
    RuntimeError carrying its type and message (the original chained to it)."""

    @functools.wraps(method)  # keeps the signature, which DCP inspects for ``**kwargs``
    def guarded(*args: Any, **kwargs: Any):
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            try:
                pickle.loads(pickle.dumps(exc))
            except Exception:
                raise RuntimeError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}") from exc
            raise

    return guarded


def _guard(cls: type, names: tuple[str, ...]) -> type:
    for name in names:
        setattr(cls, name, _shareable(getattr(cls, name)))
    return cls


@functools.cache
def _storage_classes() -> tuple[type, type]:
    """DCP's file-system writer and reader, with errors that every rank can be told of (see
    :func:`_shareable`), the reader with a weights-only metadata unpickler and a check that each shard
    file is as long as the metadata says."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    class SafeFileSystemWriter(FileSystemWriter):
        pass

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            with open(self._get_metadata_path(rank), "rb") as f:
                metadata = MetadataUnpickler(io.BytesIO(f.read())).load()
            if getattr(metadata, "storage_meta", None) is not None:
                metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            needed: dict[str, int] = {}  # shard file -> the bytes this rank reads of it
            for item in plan.items:
                info = self.storage_data[item.storage_index]
                needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
            for name, end in sorted(needed.items()):
                shard = Path(self.path) / name
                size = shard.stat().st_size  # a missing or unreadable file: an OSError that names it
                if size < end:
                    raise CheckpointLoadError(f"shard file {shard} is truncated: {size} bytes of {end}")
            try:
                return super().read_data(plan, planner)
            except (CheckpointLoadError, OSError, pickle.UnpicklingError):
                raise
            except Exception as exc:
                raise CheckpointLoadError(f"cannot read shard file(s) {', '.join(sorted(needed))}: {exc}") from exc

    planning = ("prepare_local_plan", "prepare_global_plan")
    writer_methods = ("set_up_storage_writer", *planning, "write_data", "finish")
    reader_methods = ("read_metadata", "set_up_storage_reader", *planning, "read_data")
    return _guard(SafeFileSystemWriter, writer_methods), _guard(SafeFileSystemReader, reader_methods)


def safe_reader(path: str | Path):
    """A DCP storage reader of the checkpoint directory ``path`` (see the module's docstring)."""
    return _storage_classes()[1](str(path))


def safe_writer(path: str | Path):
    """A DCP storage writer into the directory ``path`` (see the module's docstring)."""
    return _storage_classes()[0](str(path))


class MetadataUnpickler(pickle.Unpickler):
    """Accepts only what DCP metadata is made of (its dataclasses, sizes, dtypes, paths): of DCP's two
    modules, the dataclasses and enums they define, not their functions (``filesystem._write_files_from_queue``
    and the like, which a crafted pickle could call), their readers and writers, nor what they import."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}
    PATHS = ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")

    def find_class(self, module: str, name: str):
        allowed = (
            (module in self.MODULES and _defined_class(module, name))
            or (module, name) in self.ALLOWED
            or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
            or (module == "pathlib" and name in self.PATHS)
        )
        if not allowed:
            raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which is not a metadata type")
        return getattr(__import__(module, fromlist=[name]), name) if module != "pathlib" else getattr(pathlib, name)


def _defined_class(module: str, name: str) -> bool:
    """Whether ``module.name`` is a record class that ``module`` itself defines (a dataclass or an
    enum: what metadata is made of; not a reader or writer, whose construction acts on files)."""
    import dataclasses
    import enum

    obj = getattr(__import__(module, fromlist=[name]), name, None)
    return (isinstance(obj, type) and obj.__module__ == module
            and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)))  # fmt: skip


def weights_only_planner():
    """DCP's default load planner, except that the non-tensor entries of a checkpoint (the
    optimizer's ``param_groups``: learning rates, betas, flags, parameter names) are unpickled with
    ``weights_only=True``: DCP's own planner reads them with ``weights_only=False``."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise pickle.UnpicklingError(
                    f"entry {read_item.dest_index.fqn!r} is not weights-only data: {exc}"
                ) from exc
            # Hand DCP a pickle of what the restricted unpickler produced (plain values only).
            safe = io.BytesIO()
            torch.save(obj, safe)
            safe.seek(0)
            super().load_bytes(read_item, safe)

    return WeightsOnlyLoadPlanner()
