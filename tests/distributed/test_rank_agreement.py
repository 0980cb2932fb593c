"""Choices every rank must make alike are rank 0's, on 2 gloo processes, whatever another rank's
(stale) view of the shared file system says: whether curation's embed stage is already done, and
which checkpoint ``train.init_from`` or ``distillation.teacher_checkpoint`` (a run directory)
resolves to; a rank that cannot resolve it stops every rank, naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_common import WORLD, free_port, join_group
from omegaconf import OmegaConf

pytestmark = pytest.mark.distributed


def _worker(rank: int, port: int, out: str) -> None:
    join_group(rank, port)
    from dinov2.checkpoint import sharded
    from dinov2.curation.pipeline import Curation
    from dinov2.train.init_from import resolve_init_source

    result = {}
    # curation: rank 0 sees the embed stage done, rank 1 not (its done.json not visible there yet)
    curation = Curation(OmegaConf.create({}), Path(out) / "curation")
    curation.is_done = lambda stage: rank == 0
    embedded: list[int] = []
    curation._embed = lambda: embedded.append(rank) or {}  # the real one enters collectives
    result["ran"] = curation.run("embed")
    result["embedded"] = embedded

    # train.init_from=<a run that saved step 4 after step 2>: rank 1's listing is stale
    source = Path(out) / "source"
    cfg = OmegaConf.create({"train": {"init_from": str(source)}})
    real_list = sharded.list_checkpoints
    if rank == 1:
        sharded.list_checkpoints = lambda directory: [p for p in real_list(directory) if p[0] == 2]
    result["init"] = resolve_init_source(cfg, Path(out) / "new" / "checkpoints", resume=True).location
    from dinov2.train.distill_teacher import resolve_teacher_source

    result["teacher"] = str(resolve_teacher_source(str(source)).path)  # distillation's teacher: the same pick
    if rank == 1:  # this node lists no checkpoint at all
        sharded.list_checkpoints = lambda directory: []
    try:
        resolve_init_source(cfg, Path(out) / "new" / "checkpoints", resume=True)
        result["unseen"] = "no error"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test compares
        result["unseen"] = f"{type(error).__name__}: {error}"
    sharded.list_checkpoints = real_list
    torch.save(result, Path(out) / f"r{rank}.pt")
    from dinov2 import distributed

    distributed.shutdown()  # a barrier first: a rank leaving while its peer still exchanges aborts it


def test_ranks_take_rank_zeros_embed_decision_and_init_checkpoint(tmp_path):
    for step in (2, 4):
        step_dir = tmp_path / "source" / "checkpoints" / f"step_{step:07d}"
        step_dir.mkdir(parents=True)
        for name in (".metadata", "trainer_state.pth"):
            (step_dir / name).touch()
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(WORLD)]
    for result in results:
        assert (result["ran"], result["embedded"]) == (False, [])  # rank 0 saw it done: nobody embeds
        assert result["init"] == str(tmp_path / "source" / "checkpoints" / "step_0000004")
        assert result["teacher"] == result["init"]
    assert results[1]["unseen"].startswith("FileNotFoundError: train.init_from="), results[1]["unseen"]
    told = results[0]["unseen"]
    assert told.startswith("CheckpointNotVisibleError: resolving train.init_from=") and (
        "failed on rank 1: FileNotFoundError: no training checkpoint" in told
    ), told
