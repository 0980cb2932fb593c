"""``train.init_from`` into an FSDP2-sharded model on 2 gloo processes: every shard of the student,
the teacher, both heads and the loss centres holds what the unsharded model loads, the position
embeddings resampled to the larger grid, the flat checkpoint re-chunked to the sharded block chunks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_common import MIXED_SHARDING, TINY, WORLD, free_port, join_group

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


def _worker(rank: int, port: int, init_from: str, out: str) -> None:
    join_group(rank, port)
    model = _loaded(init_from, out)
    assert hasattr(model.student.backbone.pos_embed, "device_mesh")  # sharded for real
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, Path(out) / "r0.pt")
    torch.distributed.destroy_process_group()


def test_init_from_into_sharded_model_equals_the_unsharded_load(tmp_path):
    pretrain = tmp_path / "pretrain"
    main(["--output-dir", str(pretrain), *TINY, "train.stop_at_iteration=2"])  # 32 px, flat blocks
    mp.spawn(_worker, args=(free_port(), str(pretrain), str(tmp_path)), nprocs=WORLD, join=True)
    sharded = torch.load(tmp_path / "r0.pt", weights_only=True)

    reference = _loaded(str(pretrain), str(tmp_path)).state_dict()  # one process: plain tensors
    assert reference["student.backbone.pos_embed"].shape == (1, 1 + 6 * 6, 32)
    assert "student.backbone.blocks.1.1.attn.qkv.weight" in reference  # re-chunked
    assert sharded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(sharded[key], value), key
