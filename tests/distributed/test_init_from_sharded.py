"""``train.init_from`` into an FSDP2-sharded model on 2 gloo processes: every shard of the student,
the teacher, both heads and the loss centres holds what the unsharded model loads, the position
embeddings resampled to the larger grid, the flat checkpoint re-chunked to the sharded block chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dist_common import MIXED_SHARDING, TINY

from dinov2.train.init_from import load_init_source, resolve_init_source
from dinov2.train.train import build_model, main, setup_config
from dinov2.utils.config import load_config

pytestmark = pytest.mark.distributed


def _highres_cfg(init_from: str):
    overrides = [*TINY, *MIXED_SHARDING, "crops.global_crops_size=48", f"train.init_from={init_from}"]
    return setup_config(type("Args", (), {"output_dir": "", "config": "", "opts": []})(), load_config(None, overrides))


def _loaded(init_from: str, out: str):
    cfg = _highres_cfg(init_from)
    model = build_model(cfg, torch.device("cpu"))
    load_init_source(model, resolve_init_source(cfg, Path(out) / "new" / "checkpoints", resume=True))
    return model


def prepare(out: Path) -> tuple:
    """Before the spawn (conftest.py's ``sharded_parts``): the pretraining run; the rank part's args."""
    main(["--output-dir", str(out / "pretrain"), *TINY, "train.stop_at_iteration=2"])  # 32 px, flat blocks
    return (str(out / "pretrain"), str(out))


def rank_part(rank: int, init_from: str, out: str) -> None:
    """On each rank of the shared 2-process group."""
    model = _loaded(init_from, out)
    assert hasattr(model.student.backbone.pos_embed, "device_mesh")  # sharded for real
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, Path(out) / "r0.pt")


def test_init_from_into_sharded_model_equals_the_unsharded_load(sharded_parts):
    tmp_path = sharded_parts["test_init_from_sharded"]
    pretrain = tmp_path / "pretrain"
    sharded = torch.load(tmp_path / "r0.pt", weights_only=True)

    reference = _loaded(str(pretrain), str(tmp_path)).state_dict()  # one process: plain tensors
    assert reference["student.backbone.pos_embed"].shape == (1, 1 + 6 * 6, 32)
    assert "student.backbone.blocks.1.1.attn.qkv.weight" in reference  # re-chunked
    assert sharded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(sharded[key], value), key
