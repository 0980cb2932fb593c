"""``train.init_from``: behaviour a mutation audit found untested (an empty value, a URL, a
``--no-resume`` run beside its own checkpoints, what counts as a whole-model file, a symlink into
the outputs that ``--no-resume`` moves, a source without backbone weights, and a file refused for an
object other than a ShardedTensor)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from test_train_loop import TINY

from dinov2.train import init_from
from dinov2.train.train import build_model
from dinov2.utils.config import load_config


def _cfg(*overrides: str):
    return load_config(None, [*TINY, *overrides])


def test_an_empty_init_from_is_no_source(tmp_path):
    for empty in ("train.init_from=", "train.init_from=''"):  # null, and the empty string
        assert init_from.resolve_init_source(_cfg(empty), tmp_path / "checkpoints", resume=True) is None


def test_a_url_is_a_backbone_source_without_touching_the_file_system(tmp_path):
    url = "https://example.com/weights/dinov2_vits14_pretrain.pth"
    source = init_from.resolve_init_source(_cfg(f"train.init_from={url}"), tmp_path / "checkpoints", resume=True)
    assert source == init_from.InitSource(url, "backbone")


def test_a_run_started_over_loads_init_from_even_beside_its_own_checkpoints(tmp_path, monkeypatch):
    weights = tmp_path / "elsewhere" / "backbone.pth"
    weights.parent.mkdir()
    weights.write_bytes(b"")
    own = tmp_path / "out" / "checkpoints"
    monkeypatch.setattr(init_from, "agreed_latest_checkpoint", lambda directory: own / "step_0000003")
    cfg = _cfg(f"train.init_from={weights}")
    assert init_from.resolve_init_source(cfg, own, resume=True) is None  # resuming: its own checkpoints win
    assert init_from.resolve_init_source(cfg, own, resume=False) == init_from.InitSource(str(weights), "backbone")


def test_a_whole_model_file_needs_both_branches_flat_or_in_a_container():
    t = torch.zeros(1)
    both = {"student.backbone.cls_token": t, "teacher.backbone.cls_token": t}
    assert init_from._whole_model_state(both) is not None
    assert init_from._whole_model_state({"model": both}) is not None
    assert init_from._whole_model_state({"state_dict": both}) is not None
    assert init_from._whole_model_state({"student.backbone.cls_token": t}) is None  # one branch: not a whole model
    assert init_from._whole_model_state({"teacher": {"backbone.cls_token": t}}) is None  # an export


def test_a_symlink_to_a_file_among_the_outputs_no_resume_moves_is_refused(tmp_path):
    output_dir = tmp_path / "out"
    export = output_dir / "eval" / "training_3" / "teacher_checkpoint.pth"
    export.parent.mkdir(parents=True)
    export.write_bytes(b"")
    link = tmp_path / "elsewhere.pth"
    link.symlink_to(export)
    with pytest.raises(ValueError, match=r"inside this run's eval/"):
        init_from._refuse_file_set_aside(str(link), Path(link), output_dir)
    init_from._refuse_file_set_aside(str(tmp_path / "w.pth"), tmp_path / "w.pth", output_dir)  # elsewhere: fine


def test_a_source_without_backbone_weights_is_an_error_not_a_fresh_backbone():
    cfg = _cfg()
    model = build_model(cfg, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"train.init_from: empty.pth holds no student.backbone weights"):
        init_from._load_branches_and_centres(model, lambda prefix: {}, "empty.pth")


class _NotAllowed:
    """An object of a class ``torch.load(weights_only=True)`` refuses (not a ShardedTensor)."""


def test_a_file_refused_for_another_object_keeps_torch_s_refusal_not_the_sharded_tensor_hint(tmp_path):
    torch.save({"model": {"w": _NotAllowed()}}, tmp_path / "other.pth")
    with pytest.raises(pickle.UnpicklingError, match=r"weights file .*other\.pth was refused") as error:
        init_from._read_weights_file(str(tmp_path / "other.pth"))
    assert "ShardedTensor" not in str(error.value)
