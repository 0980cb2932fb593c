"""Checkpoint and run-lock behaviour that a line-coverage pass of the suite found unexercised: an
export of a teacher without a backbone, leftover temporaries that cannot be deleted, temporary
names that collide, CUDA RNG states in a checkpoint read without CUDA, the run lock's holder
description (unreadable, or a SLURM job's) and file systems without locks; and DCP checkpoints
with unreadable RNG states, without metadata, without the tensors asked for, or cut short."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
import torch
from test_hostile_storage import _hold_lock_in_child
from test_training_checkpoint import _model_and_optimizer, _save, _teacher
from torch import nn

from dinov2.checkpoint import export_teacher, sharded, training
from dinov2.checkpoint import lock as run_lock


@pytest.fixture
def dinov2_messages(log_messages) -> list[str]:
    return log_messages()


# ------------------------------------------------------------------------------------ exports
def test_a_teacher_without_a_backbone_is_refused_and_the_earlier_export_stays_whole(tmp_path):
    final = export_teacher(tmp_path, 7, _teacher())
    before = {p.name: p.read_bytes() for p in final.iterdir()}
    with pytest.raises(ValueError, match="teacher has no 'backbone' module to export"):
        export_teacher(tmp_path, 7, nn.ModuleDict({"dino_head": nn.Linear(16, 4)}))
    assert {p.name: p.read_bytes() for p in final.iterdir()} == before
    assert sorted(p.name for p in final.parent.iterdir()) == ["training_7"]  # no temporary left


def test_a_leftover_temporary_that_cannot_be_deleted_is_logged_and_the_export_goes_on(
    tmp_path, monkeypatch, dinov2_messages
):
    (tmp_path / "eval").mkdir()
    stuck, gone = tmp_path / "eval" / ".training_3.abcdef.tmp", tmp_path / "eval" / ".training_4.012345.tmp"
    stuck.mkdir()
    gone.mkdir()
    real = training._remove_quietly

    def remove(path: Path) -> None:
        if path.name == stuck.name:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real(path)

    monkeypatch.setattr(training, "_remove_quietly", remove)
    final = export_teacher(tmp_path, 5, _teacher())
    assert (final / training.TEACHER_BACKBONE).is_file()
    assert stuck.is_dir() and not gone.exists()
    assert any("could not delete the leftover temporary" in m and stuck.name in m for m in dinov2_messages)
    assert any("removed 1 leftover" in m and gone.name in m and stuck.name not in m for m in dinov2_messages)


def test_a_temporary_name_taken_already_is_passed_over_and_never_written(tmp_path, monkeypatch):
    target = tmp_path / "model.pth"
    taken = tmp_path / ".model.pth.aaaaaaaaaaaa.tmp"
    taken.write_bytes(b"another writer's")
    names = iter(["aaaaaaaaaaaa", "aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(training.secrets, "token_hex", lambda n: next(names))
    assert training._temp_name(target) == tmp_path / ".model.pth.bbbbbbbbbbbb.tmp"
    assert taken.read_bytes() == b"another writer's"
    monkeypatch.setattr(training.secrets, "token_hex", lambda n: "aaaaaaaaaaaa")  # every name taken
    with pytest.raises(FileExistsError, match=f"could not create a temporary name next to {target}"):
        training._temp_name(target)


# ----------------------------------------------------------------------------------- RNG states
@pytest.mark.skipif(torch.cuda.is_available(), reason="the case of a machine without CUDA")
def test_cuda_rng_states_read_without_cuda_are_reported_and_the_cpu_streams_still_restored(dinov2_messages):
    torch.manual_seed(123)
    state = training.capture_rng_state()
    expected = torch.rand(3)
    state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]  # as a GPU run saved it
    torch.manual_seed(0)
    training.restore_rng_state(state)
    assert torch.equal(torch.rand(3), expected)
    assert any("CUDA RNG states but CUDA is not available" in m for m in dinov2_messages)


# ---------------------------------------------------------------------------------- run lock
def _refusal(directory: Path) -> str:
    with pytest.raises(run_lock.OutputDirectoryInUseError) as error:
        run_lock.lock_output_directory(directory)
    return str(error.value)


def test_the_lock_holder_is_named_with_its_slurm_job_and_an_unreadable_record_as_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    pid = _hold_lock_in_child(tmp_path)  # the child takes the lock with the variable set
    try:
        message = _refusal(tmp_path)
        assert f"process {pid} on host" in message and ", SLURM job 4242, since" in message
        (tmp_path / run_lock.LOCK_FILE).write_text("{torn")  # a record being written, or damaged
        assert "in use by another training job (holder unknown)" in _refusal(tmp_path)
        (tmp_path / run_lock.LOCK_FILE).write_text("")
        assert "(holder unknown)" in _refusal(tmp_path)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    monkeypatch.delenv("SLURM_JOB_ID")
    pid = _hold_lock_in_child(tmp_path)  # outside SLURM: no job named
    try:
        assert "SLURM job" not in _refusal(tmp_path)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_file_system_without_locks_gets_a_warning_and_the_next_run_tries_again(
    tmp_path, monkeypatch, dinov2_messages
):
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    run_lock.lock_output_directory(tmp_path)  # not an error: the run goes on unlocked
    assert any("cannot lock" in m and "would go unnoticed" in m for m in dinov2_messages)
    assert os.path.realpath(tmp_path / run_lock.LOCK_FILE) not in run_lock._HELD_LOCKS
    monkeypatch.undo()
    run_lock.lock_output_directory(tmp_path)  # locks now work: taken for real
    try:
        assert os.path.realpath(tmp_path / run_lock.LOCK_FILE) in run_lock._HELD_LOCKS
    finally:
        run_lock.unlock_output_directory(tmp_path)


# ------------------------------------------------------------------------------ DCP checkpoints
def test_unreadable_rng_states_are_named_and_the_model_keeps_its_weights(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    path = _save(tmp_path, 1, model, optimizer)
    (path / sharded.rng_file(0)).write_bytes(b"not a torch file")
    fresh, fresh_optimizer = _model_and_optimizer(1)
    with pytest.raises(sharded.CheckpointLoadError, match=f"cannot read the RNG states {path / sharded.rng_file(0)}"):
        sharded.load_checkpoint(path, fresh, fresh_optimizer)


def test_reading_tensors_of_what_is_not_a_whole_dcp_checkpoint_names_the_problem(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match=f"not a DCP checkpoint \\(no .metadata\\): {tmp_path / 'plain'}"):
        sharded.load_full_tensors(tmp_path / "plain", "model.")
    model, optimizer = _model_and_optimizer(0)
    path = _save(tmp_path, 1, model, optimizer)
    with pytest.raises(KeyError, match=f"no tensor under 'student.' in checkpoint {path}"):
        sharded.load_full_tensors(path, "student.")
    loaded = sharded.load_full_tensors(path, "model.")  # whole, before the damage
    assert torch.equal(loaded["0.weight"], model[0].weight.detach())
    (shard,) = path.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:16])  # a shard cut short (a copy that did not finish)
    with pytest.raises(sharded.CheckpointLoadError, match=f"cannot read tensors of checkpoint {path}"):
        sharded.load_full_tensors(path, "model.")


def test_a_negative_iteration_has_no_checkpoint_path(tmp_path):
    assert sharded.step_path(tmp_path, 0) == tmp_path / "step_0000000"
    with pytest.raises(ValueError, match="iteration must be >= 0, got -1"):
        sharded.step_path(tmp_path, -1)
