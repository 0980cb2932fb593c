"""An evaluation's ``--pretrained-weights OUT`` (a training run directory) is read as rank 0's latest
checkpoint on every rank of 2 gloo processes, whatever another rank's (stale) listing of the shared
file system says; a rank that cannot see that checkpoint, or cannot read its weights, stops every rank.
Likewise the linear probe resumes from ``checkpoint_linear.pth`` on every rank when rank 0 sees it,
at the iteration rank 0 read."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_common import WORLD, free_port, join_group

pytestmark = pytest.mark.distributed

MICRO = [
    "student.arch=vit_small", "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
    "student.patch_size=8", "student.layerscale=1.0", "crops.global_crops_size=32",
]  # fmt: skip


def _outcome(call) -> str:
    try:
        call()
        return "no error"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test compares
        return f"{type(error).__name__}: {error}"


def _weights_part(rank: int, out: str) -> None:
    from dinov2.checkpoint import sharded
    from dinov2.eval.setup import setup_and_build_model

    run = Path(out) / "run"
    args = argparse.Namespace(config_file="", pretrained_weights=str(run), output_dir=str(Path(out) / "eval"),
                              device="cpu", opts=MICRO)  # fmt: skip
    real_list, real_complete, real_load = sharded.list_checkpoints, sharded.is_complete, sharded.load_full_tensors
    result = {}
    # the run saved step 4 after step 2; rank 1's listing still shows step 2 alone
    if rank == 1:
        sharded.list_checkpoints = lambda directory: [p for p in real_list(directory) if p[0] == 2]
    model, _, _ = setup_and_build_model(args)
    result["stale"] = {k: v.clone() for k, v in model.state_dict().items()}
    if rank == 1:  # this node lists no checkpoint at all
        sharded.list_checkpoints = lambda directory: []
    model, _, _ = setup_and_build_model(args)
    result["unlisted"] = {k: v.clone() for k, v in model.state_dict().items()}
    sharded.list_checkpoints = real_list
    if rank == 1:  # step 4 is not yet whole as this node sees it
        sharded.is_complete = lambda path: real_complete(path) and not path.name.endswith("4")
    result["unseen"] = _outcome(lambda: setup_and_build_model(args))
    sharded.is_complete = real_complete
    if rank == 1:  # a shard of the checkpoint cannot be read on this node

        def unreadable(*_args, **_kwargs):
            raise OSError("shard unreadable on this node")

        sharded.load_full_tensors = unreadable
    result["unreadable"] = _outcome(lambda: setup_and_build_model(args))
    sharded.load_full_tensors = real_load
    torch.save(result, Path(out) / f"r{rank}.pt")


def test_eval_ranks_read_rank_zeros_checkpoint_of_a_run_directory(spawned):
    teachers = {step: torch.load(spawned / f"teacher_{step}.pt", weights_only=True) for step in (2, 4)}
    results = [torch.load(spawned / f"r{r}.pt", weights_only=True) for r in range(WORLD)]
    for rank, result in enumerate(results):
        for case in ("stale", "unlisted"):
            state = result[case]
            assert state.keys() == teachers[4].keys()
            for key, value in teachers[4].items():  # rank 1 used to read step 2, or stop alone
                torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=f"rank {rank} {case} {key}")
    own = results[1]["unseen"]
    assert own.startswith("CheckpointNotVisibleError: rank 1 does not see") and "step_0000004" in own, own
    told = results[0]["unseen"]
    assert told.startswith("CheckpointNotVisibleError: finding") and "failed on rank 1" in told, told
    assert results[1]["unreadable"] == "OSError: shard unreadable on this node"
    told = results[0]["unreadable"]
    assert told.startswith("BackboneLoadError: building the backbone") and (
        "failed on rank 1: OSError: shard unreadable on this node" in told
    ), told


def _resume_part(rank: int, out: str) -> None:
    from dinov2.eval import linear
    from dinov2.eval import linear_heads as core

    args = argparse.Namespace(output_dir=out, no_resume=False, batch_size=4, seed=0)
    checkpoint = Path(out) / linear.CHECKPOINT_FILE
    real_is_file, real_load = Path.is_file, core.load_checkpoint
    result = {}

    def resume() -> int:
        heads, lrs = core.build_heads(8, 3, (0.1, 0.2), n_last_blocks=(1,))
        return linear._resume(args, heads, core.make_optimizer(heads, lrs), max_iter=20)[0]

    if rank == 1:  # this node does not see the checkpoint yet
        Path.is_file = lambda path: False if path == checkpoint else real_is_file(path)
    result["unlisted"] = _outcome(lambda: result.setdefault("start", resume()))
    Path.is_file = real_is_file
    if rank == 1:  # this node reads the previous version of the file
        core.load_checkpoint = lambda path, heads, optimizer: real_load(Path(out) / "older.pth", heads, optimizer)
    result["older"] = _outcome(resume)
    if rank == 1:  # ... or cannot read it at all

        def unreadable(*_args):
            raise OSError("checkpoint unreadable on this node")

        core.load_checkpoint = unreadable
    result["unreadable"] = _outcome(resume)
    core.load_checkpoint = real_load
    torch.save(result, Path(out) / f"resume_r{rank}.pt")


def _worker(rank: int, port: int, out: str) -> None:
    join_group(rank, port)
    from dinov2 import distributed

    _weights_part(rank, out)
    _resume_part(rank, out)
    distributed.shutdown()  # a barrier first: a rank leaving while its peer still exchanges aborts it


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> Path:
    """Both tests' inputs, then one 2-rank spawn that runs both parts (each spawn costs two interpreters)."""
    from torch import nn

    from dinov2.checkpoint.sharded import save_checkpoint
    from dinov2.eval import linear
    from dinov2.eval import linear_heads as core
    from dinov2.models import build_model
    from dinov2.utils.config import load_config

    out = tmp_path_factory.mktemp("eval_rank_agreement")
    cfg = load_config(None, MICRO)
    for step in (2, 4):  # two checkpoints of a run, with different teacher weights
        torch.manual_seed(step)
        backbone, _ = build_model(cfg.student, only_teacher=True, img_size=32)
        run = nn.ModuleDict({"teacher": nn.ModuleDict({"backbone": backbone})})
        optimizer = torch.optim.SGD(run.parameters(), lr=0.1)
        save_checkpoint(out / "run" / "checkpoints", step, run, optimizer, {}, {})
        torch.save(backbone.state_dict(), out / f"teacher_{step}.pt")
    heads, lrs = core.build_heads(8, 3, (0.1, 0.2), n_last_blocks=(1,))
    optimizer = core.make_optimizer(heads, lrs)
    stream = {"global_batch_size": 8, "iterations": 20, "seed": 0}
    for iteration, name in ((10, linear.CHECKPOINT_FILE), (5, "older.pth")):  # the linear probe's, and an older one
        torch.save(core.checkpoint_state(heads, optimizer, iteration, stream=stream), out / name)
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return out


def test_linear_probe_ranks_resume_from_rank_zeros_checkpoint(spawned):
    """Each rank looked for ``checkpoint_linear.pth`` itself: one that did not see it (yet) started at
    iteration 0 while rank 0 resumed, and the ranks then waited in mismatched gradient all-reduces."""
    results = [torch.load(spawned / f"resume_r{r}.pt", weights_only=True) for r in range(WORLD)]
    assert [(r["unlisted"], r["start"]) for r in results] == [("no error", 10)] * WORLD
    for result in results:
        assert result["older"].startswith("ResumeError: the ranks read") and "rank 0: 10, rank 1: 5" in result["older"]
    assert results[1]["unreadable"] == "OSError: checkpoint unreadable on this node"
    told = results[0]["unreadable"]
    assert told.startswith("ResumeError: resuming the linear classifiers") and "failed on rank 1: OSError" in told, told
