"""FSDP2 training on 2 gloo processes equals 1 process with the same global batch, and DCP
checkpoints resume across world sizes (2 -> 1 and 1 -> 2) on the same trajectory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_common import MIXED_SHARDING, TINY, WORLD, free_port, join_group
from safetensors.torch import load_file

from dinov2.checkpoint.consolidate import main as consolidate_main
from dinov2.checkpoint.sharded import load_full_tensors, load_trainer_state
from dinov2.train.train import main

pytestmark = pytest.mark.distributed
TERMS = ("loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss")


def _run(output_dir: Path, *overrides: str, extra_args: tuple[str, ...] = ()):
    return main(["--output-dir", str(output_dir), *extra_args, *TINY, *overrides])


def _losses(output_dir: Path) -> dict[int, dict]:
    lines = (output_dir / "training_metrics.json").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines) if "loss" in r}


def _two_rank_jobs(rank: int, port: int, root: str) -> None:
    join_group(rank, port)
    root_path = Path(root)
    # fresh 2-rank run to iteration 2, all three sharding strategies, selective activation checkpointing
    _run(
        root_path / "sharded", *MIXED_SHARDING, "train.stop_at_iteration=2", "train.activation_checkpointing=selective"
    )
    # resume a 1-rank checkpoint on 2 ranks, with full activation checkpointing
    _run(root_path / "from_one", *MIXED_SHARDING, "train.activation_checkpointing=full")
    # the published fp16 policies (fp16 compute and reductions) forced on CPU: sharded gradient scaler
    _run(root_path / "fp16", "compute_precision.fsdp_mixed_precision=true", "train.stop_at_iteration=2")
    torch.distributed.destroy_process_group()


def _assert_same_losses(got: dict, want: dict, iterations) -> None:
    for it in iterations:
        for term in TERMS:
            assert got[it][term] == pytest.approx(want[it][term], abs=1e-5, rel=1e-5), (
                it,
                term,
            )  # KoLeo is ~20: relative


def test_fsdp_matches_one_process_and_resumes_across_world_sizes(tmp_path):
    one_rank = ("student.block_chunks=2", "train.grad_accum_steps=2")  # the same 8-sample steps, in 2 micro-batches
    reference = tmp_path / "reference"
    _run(reference, *one_rank)  # 4 iterations, checkpoints at 2 and 4
    (tmp_path / "from_one" / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step_0000002", tmp_path / "from_one" / "checkpoints" / "step_0000002")

    mp.spawn(_two_rank_jobs, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    want = _losses(reference)
    sharded = tmp_path / "sharded"
    _assert_same_losses(_losses(sharded), want, (1, 2))  # 2 ranks x 4 == 1 rank x 2 micro-batches x 4
    _assert_same_losses(_losses(tmp_path / "from_one"), want, (3, 4))  # saved on 1 rank, resumed on 2
    assert sorted(_losses(tmp_path / "from_one")) == [3, 4]

    # saved on 2 ranks, resumed on 1 rank (accumulating to the same global batch)
    _run(sharded, *one_rank)
    _assert_same_losses(_losses(sharded), want, (3, 4))
    assert "reseeded" in (sharded / "log.txt").read_text()

    # fp16 FSDP2 policies train with a sharded gradient scaler, saved with the checkpoint; weights stay fp32
    fp16 = tmp_path / "fp16"
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in _losses(fp16).values())
    state = load_trainer_state(fp16 / "checkpoints" / "step_0000002")
    assert state["grad_scaler"] is not None and state["grad_scaler"]["scale"] > 0
    weights = load_full_tensors(fp16 / "checkpoints" / "step_0000002", "model.student.")
    assert all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point())
    assert "student.backbone FULL_SHARD" not in (fp16 / "log.txt").read_text()  # default strategies here
    assert "torch.float16/torch.float16" in (fp16 / "log.txt").read_text()

    # consolidation of the 2-rank checkpoint equals the teacher the sharded run gathered and exported at
    # iteration 2, and the 1-rank run's teacher at the same iteration up to float tolerance
    output = tmp_path / "consolidated" / "teacher.pth"
    consolidate_main([str(sharded / "checkpoints" / "step_0000002"), "--output", str(output)])
    flat = torch.load(output, weights_only=True)
    exported = load_file(sharded / "eval" / "training_2" / "teacher_backbone.safetensors")
    assert flat.keys() == exported.keys() and "blocks.1.attn.qkv.weight" in flat  # chunks flattened
    for key, value in exported.items():
        assert torch.equal(flat[key], value), key
    assert load_file(output.with_suffix(".safetensors")).keys() == flat.keys()
    one_rank_teacher = load_full_tensors(reference / "checkpoints" / "step_0000002", "model.teacher.backbone.")
    assert one_rank_teacher["blocks.1.1.attn.qkv.weight"].shape == flat["blocks.1.attn.qkv.weight"].shape
    torch.testing.assert_close(flat["blocks.1.attn.qkv.weight"], one_rank_teacher["blocks.1.1.attn.qkv.weight"])
