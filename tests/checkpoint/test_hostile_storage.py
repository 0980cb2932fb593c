"""Checkpoints on hostile storage: a full or read-only disk, truncated shards, odd paths, a failing
peer inside torch.distributed.checkpoint itself, and two jobs started on one output directory."""

import errno
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_training_checkpoint import _model_and_optimizer  # a stepped optimizer, as a run saves it
from torch import nn

from dinov2.checkpoint import (
    CheckpointLoadError,
    CheckpointWriteError,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dinov2.checkpoint.consolidate import consolidate
from dinov2.checkpoint.lock import (
    LOCK_FILE,
    OutputDirectoryInUseError,
    lock_output_directory,
    unlock_output_directory,
)
from dinov2.models import DinoVisionTransformer


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def _save(directory, iteration, model, optimizer):
    return save_checkpoint(directory, iteration, model, optimizer, {"iteration": iteration}, capture_rng_state())


def _fail_shard_streams(error, mode="wb", when=lambda: True):
    """Replace DCP's file-system stream opener: the shard files (``*.distcp``) opened with ``mode``
    raise ``error`` while ``when()``; returns the original, to put back."""
    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream

    def create_stream(self, path, stream_mode):
        if str(path).endswith(".distcp") and stream_mode == mode and when():
            raise error
        return real(self, path, stream_mode)

    FileSystem.create_stream = create_stream
    return real


def _restore_streams(real) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystem

    FileSystem.create_stream = real


# ------------------------------------------------------------------------- full or read-only disk
def test_a_full_disk_during_the_save_names_the_checkpoint_and_keeps_the_previous_one(tmp_path):
    model, optimizer = _model_and_optimizer()
    previous = _save(tmp_path, 1, model, optimizer)
    real = _fail_shard_streams(OSError(errno.ENOSPC, "No space left on device"))
    try:
        with pytest.raises(CheckpointWriteError) as caught:
            _save(tmp_path, 2, model, optimizer)
    finally:
        _restore_streams(real)
    message = str(caught.value)
    assert str(tmp_path / "step_0000002") in message and "No space left on device" in message, message
    assert "disk full" in message and "\n" not in message, message  # one line, not DCP's traceback dump
    assert _names(tmp_path) == [previous.name]  # no temporary directory, no partial step_2
    assert find_latest_checkpoint(tmp_path) == previous
    assert load_checkpoint(previous, *_model_and_optimizer(1))["iteration"] == 1


def test_a_read_only_output_directory_is_named_as_not_writable(tmp_path, monkeypatch):
    # As root chmod does not stop a write, so the file system's refusal is simulated.
    model, optimizer = _model_and_optimizer()
    previous = _save(tmp_path, 1, model, optimizer)
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if self.name.endswith(".tmp"):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(
        CheckpointWriteError, match=rf"step_0000002.*Read-only.*{re.escape(str(tmp_path))} is not writable"
    ):
        _save(tmp_path, 2, model, optimizer)
    assert _names(tmp_path) == [previous.name]


def test_a_truncated_shard_file_is_named(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = _save(tmp_path, 3, model, optimizer)
    shard = path / "__0_0.distcp"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    with pytest.raises(CheckpointLoadError, match=rf"{re.escape(str(shard))} is truncated: {size // 2} bytes of"):
        load_checkpoint(path, model, optimizer)


class _Calls:
    """Pickles as a call of ``function`` (what a crafted ``.metadata`` file would hold)."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("call", ["os.system", "a DCP function", "a DCP writer"])
def test_checkpoint_metadata_that_would_call_a_function_is_refused(tmp_path, call):
    # A checkpoint directory handed in (train.init_from, --pretrained-weights) is untrusted: its
    # .metadata pickle may construct DCP's metadata classes, never call a function. DCP's filesystem
    # module defines functions too (one of them writes files from a queue); the harmless one called
    # here stands for them: the refusal is by kind (a function, a reader or writer, or a name the
    # module imports).
    import pickle

    from torch.distributed.checkpoint import filesystem

    model, optimizer = _model_and_optimizer()
    path = _save(tmp_path, 3, model, optimizer)
    marker = tmp_path / "called"
    if call == "os.system":
        crafted = _Calls(os.system, f"touch {marker}")
    elif call == "a DCP function":
        crafted = _Calls(filesystem._generate_uuid)
    else:  # a class of DCP's, but not a metadata record: building one acts on files
        crafted = _Calls(filesystem.FileSystemWriter, str(marker))
    (path / ".metadata").write_bytes(pickle.dumps(crafted))
    with pytest.raises(Exception, match=r"DCP metadata refers to .*which is not a metadata type"):
        load_checkpoint(path, model, optimizer)
    assert not marker.exists()


# --------------------------------------------------------------------------------------- odd paths
def test_paths_with_spaces_non_ascii_a_symlink_and_a_moved_directory(tmp_path):
    model, optimizer = _model_and_optimizer()
    real = tmp_path / "runs 2024" / "vit tiny – é ü 北京"
    real.mkdir(parents=True)
    link = tmp_path / "link to run"
    link.symlink_to(real, target_is_directory=True)
    _save(link / "checkpoints", 1, model, optimizer)
    _save(link / "checkpoints", 2, model, optimizer)
    assert _names(real / "checkpoints") == ["step_0000001", "step_0000002"]  # written through the link
    moved = tmp_path / "elsewhere" / "ça va"
    moved.parent.mkdir()
    shutil.move(str(real), str(moved))  # the run moved between save and resume: no absolute path is used
    latest = find_latest_checkpoint(moved / "checkpoints")
    fresh, fresh_opt = _model_and_optimizer(1)
    assert load_checkpoint(latest, fresh, fresh_opt)["iteration"] == 2
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- one writer per run
def _hold_lock_in_child(directory: Path) -> int:
    """Fork a process that takes the run lock on ``directory`` and then sleeps; returns its pid."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest, no torch work
        try:
            os.close(read_end)
            lock_output_directory(directory)
            os.write(write_end, b"1")
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)
    return pid


def test_a_second_job_on_the_same_output_directory_is_refused_until_the_first_dies(tmp_path, dist_common):
    pid = _hold_lock_in_child(tmp_path)
    try:
        with pytest.raises(OutputDirectoryInUseError, match=rf"in use by another training job \(process {pid} on host"):
            lock_output_directory(tmp_path)
        # through the trainer: it stops before it has written a checkpoint or truncated any metrics
        from dinov2.train.train import main

        with pytest.raises(OutputDirectoryInUseError, match=str(pid)):
            main(["--output-dir", str(tmp_path), *dist_common.TINY, "train.stop_at_iteration=1"])
        assert not (tmp_path / "checkpoints").exists()
        # --no-resume too: the first job's run is not moved aside, nor its config overwritten
        (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
        (tmp_path / "config.yaml").write_text("the first job's\n")
        with pytest.raises(OutputDirectoryInUseError, match=str(pid)):
            main(["--output-dir", str(tmp_path), "--no-resume", *dist_common.TINY, "train.stop_at_iteration=1"])
        assert (tmp_path / "checkpoints" / "step_0000001").is_dir() and not list(tmp_path.glob("replaced_*"))
        assert (tmp_path / "config.yaml").read_text() == "the first job's\n"
    finally:
        os.kill(pid, signal.SIGKILL)  # the first job crashes (or is killed by SLURM): no clean-up at all
        os.waitpid(pid, 0)
    assert (tmp_path / LOCK_FILE).is_file()  # left behind by the dead holder...
    lock_output_directory(tmp_path)  # ...and it does not block the resume after the crash
    lock_output_directory(tmp_path)  # the same process may take it again (another run in it)
    unlock_output_directory(tmp_path)
    pid = _hold_lock_in_child(tmp_path)  # released: another process can take it
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


# ------------------------------------- a failing peer inside DCP (run by test_training_checkpoint.py's 2 processes)
class _TwoArgumentError(Exception):
    """An exception that pickles but cannot be unpickled (its constructor wants two arguments)."""

    def __init__(self, what, where):
        super().__init__(f"{what} at {where}")


def _timed(action) -> str:
    start = time.monotonic()
    try:
        action()
        outcome = "ok"
    except BaseException as error:  # noqa: BLE001 - DCP's own error is a BaseException
        outcome = f"{type(error).__name__}: {error}"
    return f"{time.monotonic() - start:.1f}s {outcome}".replace("\n", " | ")


def _tiny_backbone_model():
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, block_chunks=0)
    with torch.no_grad():
        for param in backbone.parameters():
            param.normal_(0.0, 0.5)  # nothing constant: a shard swapped or lost would show
    return nn.ModuleDict({"teacher": nn.ModuleDict({"backbone": backbone})})


def peer_failures_inside_dcp(rank: int, world: int, root: Path) -> None:
    """Run on every rank of a gloo group (tests/checkpoint/test_training_checkpoint.py's, whose
    timeout is 20 s): rank 1 fails inside DCP's own save and load, and just before the one and after
    the other; each rank writes what it saw into
    ``root/dcp_rank{rank}.txt``, and saves an FSDP2-sharded backbone into ``root/two_ranks``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    directory, outcomes = root / "dcp", []
    model, optimizer = _model_and_optimizer()
    _save(directory, 1, model, optimizer)
    on_rank_1 = lambda: rank == 1  # noqa: E731
    for error in (OSError(errno.ENOSPC, "No space left on device"), _TwoArgumentError("bad sector", "shard")):
        real = _fail_shard_streams(error, "wb", on_rank_1)
        outcomes.append(_timed(lambda: _save(directory, 2, model, optimizer)))
        _restore_streams(real)
    real = _fail_shard_streams(OSError(errno.EIO, "Input/output error"), "rb", on_rank_1)
    outcomes.append(_timed(lambda: load_checkpoint(directory / "step_0000001", model, optimizer)))
    _restore_streams(real)
    # rank 1 fails just before DCP's save (collecting the state), and just after its load (applying it)
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    from dinov2.checkpoint import sharded

    real_collect, real_apply = sharded._model_and_optimizer_state, dcp_state_dict.set_model_state_dict

    def fails_on_rank_1(real, message):
        def replacement(*args, **kwargs):
            if rank == 1:
                raise RuntimeError(message)
            return real(*args, **kwargs)

        return replacement

    sharded._model_and_optimizer_state = fails_on_rank_1(real_collect, "out of memory collecting")
    outcomes.append(_timed(lambda: _save(directory, 2, model, optimizer)))
    sharded._model_and_optimizer_state = real_collect
    dcp_state_dict.set_model_state_dict = fails_on_rank_1(real_apply, "out of memory applying")
    outcomes.append(_timed(lambda: load_checkpoint(directory / "step_0000001", model, optimizer)))
    dcp_state_dict.set_model_state_dict = real_apply
    sharded = _tiny_backbone_model()
    fully_shard(sharded["teacher"]["backbone"], mesh=init_device_mesh("cpu", (world,)))
    _save(root / "two_ranks", 1, sharded, torch.optim.AdamW(sharded.parameters()))
    (root / f"dcp_rank{rank}.txt").write_text("\n".join(outcomes))


def check_peer_failures_inside_dcp(root: Path, world: int) -> None:
    """What :func:`peer_failures_inside_dcp` must have seen. DCP gathers each rank's exception on its
    coordinator by pickling it: one that cannot make that round trip used to leave the other rank
    waiting until the process-group timeout, and DCP's own report is a BaseException whose first line
    says nothing (``CheckpointException ranks:dict_keys([1])``). Every rank now raises our error type
    at once, naming rank 1's error. And the checkpoint written by 2 ranks, sharded, consolidates to
    the same weights as one written by 1 rank."""
    for rank in range(world):
        full, odd, read, collect, apply = (root / f"dcp_rank{rank}.txt").read_text().splitlines()
        for outcome in (full, odd, read, collect, apply):
            assert float(outcome.split("s ")[0]) < 10, outcome  # not the process-group timeout
        # rank 0 names rank 1 and its error; rank 1 raises its own
        own = "failed on rank 1: .*out of memory" if rank == 0 else "out of memory"
        assert re.search(rf"CheckpointWriteError: .*step_0000002.*{own}", collect), collect
        assert re.search(rf"CheckpointLoadError: .*step_0000001.*{own}", apply), apply
        assert re.search(r"CheckpointWriteError: cannot write checkpoint .*step_0000002: rank 1: OSError: "
                         r"\[Errno 28\] No space left on device \(disk full", full), full  # fmt: skip
        assert re.search(r"CheckpointWriteError: .*step_0000002: rank 1: .*_TwoArgumentError: bad sector at shard", odd)
        assert re.search(r"CheckpointLoadError: .*step_0000001: rank 1: OSError: \[Errno 5\] Input/output", read), read
    assert _names(root / "dcp") == ["step_0000001"]  # nothing half-written is left
    single = _tiny_backbone_model()
    _save(root / "one_rank", 1, single, torch.optim.AdamW(single.parameters()))
    two = consolidate(root / "two_ranks", root / "two.pth")
    one = consolidate(root / "one_rank", root / "one.pth")
    expected = single["teacher"]["backbone"].state_dict()
    assert two.keys() == one.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(two[key], value) and torch.equal(one[key], value), key
    assert safetensors.torch.load_file(root / "two.safetensors").keys() == expected.keys()
