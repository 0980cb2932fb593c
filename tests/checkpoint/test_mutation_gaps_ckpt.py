"""Checkpoint behaviour that a mutation audit found unpinned: container precedence, non-tensor
entries, atomic writes that fail, resume selection and retention around look-alike directories,
RNG states across world sizes, the model-fit check and safetensors reading."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from test_training_checkpoint import _model_and_optimizer, _names, _save  # a stepped AdamW, as a run saves it
from torch import nn

from dinov2.checkpoint import (
    CheckpointLoadError,
    atomic_torch_save,
    export_teacher,
    find_latest_checkpoint,
    load_backbone_state_dict,
    load_checkpoint,
    load_weights_file,
)
from dinov2.checkpoint.adapters import branch_state_dict
from dinov2.checkpoint.sharded import TRAINER_STATE
from dinov2.models import DinoVisionTransformer


def _vit() -> DinoVisionTransformer:
    return DinoVisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, init_values=1.0)


# ------------------------------------------------------------------------------------ adapters
def test_the_branch_container_wins_over_a_branch_neutral_one():
    # A file with both {"teacher": ...} and a branch-neutral {"model": ...}: the requested branch's
    # own container is the one loaded (docstring: "its own, then the branch-neutral ones").
    teacher, other, target = _vit(), _vit(), _vit()
    checkpoint = {"model": dict(other.state_dict()), "teacher": dict(teacher.state_dict())}
    report = load_backbone_state_dict(target, checkpoint)
    assert report.container == "teacher"
    for key, value in teacher.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_branch_state_dict_leaves_out_entries_that_are_not_tensors():
    weight = torch.randn(2, 2)
    got = branch_state_dict({"backbone.w": weight, "iteration": 3, "config": "x"}, "teacher")
    assert list(got) == ["backbone.w"] and torch.equal(got["backbone.w"], weight)


# ------------------------------------------------------------------------------ atomic writes
def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pth"
    atomic_torch_save({"v": torch.tensor(1.0)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"v": Unpicklable()}, path)
    assert _names(tmp_path) == ["state.pth"]
    assert torch.load(path, weights_only=True)["v"].item() == 1.0


def test_a_failed_rename_of_a_new_export_puts_the_previous_one_back(tmp_path, monkeypatch):
    from dinov2.checkpoint import training

    def teacher(seed):
        torch.manual_seed(seed)
        return nn.ModuleDict({"backbone": _vit(), "dino_head": nn.Linear(16, 4)})

    first = teacher(0)
    out = export_teacher(tmp_path, 3, first)
    real_replace, onto_final = os.replace, []

    def replace(src, dst):
        if Path(dst) == out and Path(src).name.startswith(".training_3.") and not onto_final:
            onto_final.append(src)
            raise OSError("rename failed")  # the first rename onto the final name: the built export
        return real_replace(src, dst)

    monkeypatch.setattr(training.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        export_teacher(tmp_path, 3, teacher(1))
    monkeypatch.setattr(training.os, "replace", real_replace)
    assert _names(tmp_path / "eval") == ["training_3"]
    kept = torch.load(out / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert torch.equal(kept["dino_head.weight"], first["dino_head"].weight.detach())


# ----------------------------------------------------------------------- resume and retention
def test_a_copy_named_like_a_checkpoint_is_neither_resumed_from_nor_pruned(tmp_path):
    model, optimizer = _model_and_optimizer()
    first = _save(tmp_path, 10, model, optimizer, keep_last=1)
    backup = tmp_path / f"{first.name}.bak"  # a user's copy: complete, but not a step_<digits> name
    shutil.copytree(first, backup)
    newer_copy = tmp_path / "step_0000099_old"
    shutil.copytree(first, newer_copy)
    latest = _save(tmp_path, 20, model, optimizer, keep_last=1)
    assert find_latest_checkpoint(tmp_path) == latest
    assert _names(tmp_path) == [backup.name, latest.name, newer_copy.name]


def test_a_checkpoint_without_its_trainer_state_is_not_resumed_from(tmp_path):
    model, optimizer = _model_and_optimizer()
    older = _save(tmp_path, 10, model, optimizer, keep_last=0)
    newer = _save(tmp_path, 20, model, optimizer, keep_last=0)
    (newer / TRAINER_STATE).unlink()  # an incomplete copy: DCP's files are there, the iteration is not
    assert find_latest_checkpoint(tmp_path) == older


def test_rng_states_are_not_restored_on_another_world_size(tmp_path):
    # Each rank's RNG file belongs to the world size it was saved with; on another one they would
    # give the ranks the wrong streams, so load_checkpoint returns rng=None there.
    model, optimizer = _model_and_optimizer()
    path = _save(tmp_path, 5, model, optimizer)
    state = torch.load(path / TRAINER_STATE, weights_only=True)
    assert state["world_size"] == 1
    fresh, fresh_opt = _model_and_optimizer(seed=1)
    assert load_checkpoint(path, fresh, fresh_opt)["rng"] is not None
    atomic_torch_save({**state, "world_size": 2}, path / TRAINER_STATE)
    loaded = load_checkpoint(path, fresh, fresh_opt)
    assert loaded["rng"] is None and loaded["iteration"] == 5


def test_a_model_whose_tensor_shapes_changed_is_named_before_loading(tmp_path):
    model, optimizer = _model_and_optimizer(width=5)
    path = _save(tmp_path, 5, model, optimizer)
    other, other_opt = _model_and_optimizer(width=7)  # same keys, same ranks, other shapes
    with pytest.raises(CheckpointLoadError, match=r"does not fit the model(.|\n)*0\.weight \(5, 6\)"):
        load_checkpoint(path, other, other_opt)


# ---------------------------------------------------------------------------------- weights io
def test_a_safetensors_file_is_read_as_safetensors(tmp_path):
    weight = torch.randn(3, 2)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": weight}, str(path))
    got = load_weights_file(path)
    assert list(got) == ["w"] and torch.equal(got["w"], weight)
