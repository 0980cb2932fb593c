"""Distillation under FSDP2 on 2 gloo processes: the frozen teacher, the student and its spare EMA
sharded; the same losses as 1 process with the same global batch, and checkpoints (without the
frozen teacher) resume across world sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_common import WORLD, free_port, join_group

from dinov2.checkpoint.sharded import read_tensor_metadata
from dinov2.train.train import main

pytestmark = pytest.mark.distributed
TERMS = ("loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")
HEADS = [f"{h}.{k}={v}" for h in ("dino", "ibot") for k, v in
         (("head_n_prototypes", 64), ("head_hidden_dim", 32), ("head_bottleneck_dim", 16))]  # fmt: skip
COMMON = [
    "train.device=cpu",  # gloo on CPU, also on a machine with a GPU
    "train.dataset_path=Synthetic:split=TRAIN:num_images=64:image_size=32",
    "train.batch_size_per_gpu=4",
    "train.num_workers=0",
    "train.log_period=1",
    "student.arch=vit_tiny",
    "student.patch_size=8",
    "student.layerscale=1.0",
    "crops.global_crops_size=32",
    "crops.local_crops_size=16",
    "crops.local_crops_number=2",
    "optim.epochs=1",
    "optim.warmup_epochs=0.5",
    "optim.freeze_last_layer_epochs=0",
    "teacher.warmup_teacher_temp_epochs=0",
    *HEADS,
]
TEACHER = [*COMMON, "student.embed_dim=48", "student.depth=3", "student.num_heads=2", "train.OFFICIAL_EPOCH_LENGTH=1"]


def _distill(output_dir: Path, teacher: Path, *overrides: str) -> None:
    main(
        ["--output-dir", str(output_dir), *COMMON, "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
         "distillation.enabled=true", f"distillation.teacher_checkpoint={teacher}", "train.OFFICIAL_EPOCH_LENGTH=4",
         "train.checkpoint_period_iterations=2", "evaluation.eval_period_iterations=2", *overrides]
    )  # fmt: skip


def _losses(output_dir: Path) -> dict[int, dict]:
    lines = (output_dir / "training_metrics.json").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines) if "loss" in r}


def _two_rank_job(rank: int, port: int, root: str) -> None:
    join_group(rank, port)
    root_path = Path(root)
    sharding = [f"compute_precision.teacher.{m}.sharding_strategy=FULL_SHARD" for m in ("backbone", "dino_head")]
    _distill(root_path / "sharded", root_path / "teacher", *sharding, "train.stop_at_iteration=2")
    torch.distributed.destroy_process_group()


def test_sharded_distillation_matches_one_process_and_resumes_on_one(tmp_path):
    main(["--output-dir", str(tmp_path / "teacher"), *TEACHER])
    reference = tmp_path / "reference"
    _distill(reference, tmp_path / "teacher", "train.grad_accum_steps=2")  # the same 8-sample steps
    mp.spawn(_two_rank_job, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    sharded, want = tmp_path / "sharded", _losses(reference)
    log = (sharded / "log.txt").read_text()
    assert "frozen_teacher.backbone FULL_SHARD" in log and "teacher.ibot_head SHARD_GRAD_OP" in log
    for it in (1, 2):
        for term in TERMS:
            assert _losses(sharded)[it][term] == pytest.approx(want[it][term], abs=1e-5, rel=1e-5), (it, term)
    keys = read_tensor_metadata(sharded / "checkpoints" / "step_0000002")
    assert not [k for k in keys if "frozen_teacher" in k] and "model.teacher_fingerprint" in keys
    assert (sharded / "eval" / "training_2" / "teacher_backbone.safetensors").is_file()

    _distill(sharded, tmp_path / "teacher", "train.grad_accum_steps=2")  # saved on 2 ranks, resumed on 1
    for it in (3, 4):
        for term in TERMS:
            assert _losses(sharded)[it][term] == pytest.approx(want[it][term], abs=1e-5, rel=1e-5), (it, term)
