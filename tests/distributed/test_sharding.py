"""FSDP2 pieces on 2 gloo processes against the unsharded model: meta-device initialisation,
global gradient-norm clipping over shards, and the teacher EMA on local shards."""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from dist_common import MIXED_SHARDING, TINY

from dinov2.train.train import build_model, setup_config
from dinov2.utils.config import load_config

pytestmark = pytest.mark.distributed
MAX_NORM, MOMENTUM = 0.05, 0.9
IMAGES = (2, 3, 32, 32)


def _cfg(*overrides: str):
    cfg = load_config(None, [*TINY, *MIXED_SHARDING, *overrides])
    return setup_config(type("Args", (), {"output_dir": "", "config": "", "opts": []})(), cfg)


def _full(name: str, shape) -> torch.Tensor:
    """A tensor that depends only on ``name`` (the same in every process)."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=generator)


def _as_param_layout(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _full_state(module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in module.state_dict().items()}


def _perturb_student_and_set_grads(model) -> list:
    """Move the student away from the teacher and give every trainable parameter a known gradient."""
    params = []
    with torch.no_grad():
        for name, param in model.student.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            shift = _as_param_layout(_full("shift." + name, param.shape), param)
            local.add_(shift.to_local() if hasattr(shift, "to_local") else shift, alpha=0.01)
            if param.requires_grad:
                param.grad = _as_param_layout(_full("grad." + name, param.shape), param)
                params.append(param)
    return params


def prepare(out: Path) -> tuple:
    """Before the spawn (conftest.py's ``sharded_parts``): the pretrained file; the rank part's args."""
    donor = build_model(_cfg("train.seed=7"), torch.device("cpu")).student.backbone.state_dict()
    torch.save({k: v + 0.5 for k, v in donor.items()}, out / "pretrained.pth")
    return (str(out),)


def rank_part(rank: int, out: str) -> None:
    """On each rank of the shared 2-process group."""
    from dinov2.distributed.grads import clip_grad_norm_

    model = build_model(_cfg(), torch.device("cpu"))
    assert hasattr(model.student.backbone.pos_embed, "device_mesh")  # sharded for real
    initial = _full_state(model)
    params = _perturb_student_and_set_grads(model)
    norm = clip_grad_norm_(params, MAX_NORM)
    clipped = {n: p.grad.full_tensor() for n, p in model.student.named_parameters() if p.grad is not None}
    model.update_teacher(MOMENTUM)
    teacher = _full_state(model.teacher)
    # pretrained weights reach every shard of the student and the teacher backbones
    pretrained = build_model(_cfg(f"student.pretrained_weights={Path(out) / 'pretrained.pth'}"), torch.device("cpu"))
    loaded = {r: _full_state(getattr(pretrained, r).backbone) for r in ("student", "teacher")}
    # intermediate layers of a chunked, sharded backbone: each chunk is an FSDP2 unit and must run whole
    with torch.no_grad():
        intermediate = pretrained.teacher.backbone.get_intermediate_layers(_full("images", IMAGES), n=[0, 1])
    if rank == 0:
        result = {"initial": initial, "norm": norm, "clipped": clipped, "teacher": teacher, "loaded": loaded}
        result["intermediate"] = list(intermediate)
        torch.save(result, Path(out) / "r0.pt")


def test_sharded_init_clipping_ema_and_pretrained_loading_equal_the_unsharded_model(sharded_parts):
    tmp_path = sharded_parts["test_sharding"]
    sharded = torch.load(tmp_path / "r0.pt", weights_only=True)

    model = build_model(_cfg(), torch.device("cpu"))  # one process: plain tensors, same seed
    # meta-device build + shard + materialise on 2 ranks == the unsharded initialisation, bit for bit
    reference = model.state_dict()
    assert sharded["initial"].keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(sharded["initial"][key], value), key
    assert not torch.equal(
        reference["student.backbone.pos_embed"], torch.zeros_like(reference["student.backbone.pos_embed"])
    )

    params = _perturb_student_and_set_grads(model)
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    assert norm > MAX_NORM  # the clip is active
    torch.testing.assert_close(sharded["norm"], norm)
    for name, param in model.student.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(sharded["clipped"][name], param.grad, msg=name)

    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student = model.student.state_dict()
    for key, value in sharded["teacher"].items():
        expected = MOMENTUM * teacher_before[key] + (1 - MOMENTUM) * student[key]
        torch.testing.assert_close(value, expected, msg=key)
    assert not torch.equal(sharded["teacher"]["backbone.pos_embed"], teacher_before["backbone.pos_embed"])

    file = torch.load(tmp_path / "pretrained.pth", weights_only=True)
    for role in ("student", "teacher"):
        assert sharded["loaded"][role].keys() == file.keys()
        for key, value in file.items():
            assert torch.equal(sharded["loaded"][role][key], value), (role, key)

    plain = model.teacher.backbone
    plain.load_state_dict(file)
    assert len(plain.blocks) == 2  # chunks, as on the ranks
    with torch.no_grad():
        expected = plain.get_intermediate_layers(_full("images", IMAGES), n=[0, 1])
    assert len(sharded["intermediate"]) == 2
    for got, want in zip(sharded["intermediate"], expected, strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(expected[0], expected[1])  # two different blocks' outputs
