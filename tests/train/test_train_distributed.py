"""Data-parallel training under a 2-process gloo group: ranks start identical and stay identical."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from test_train_loop import TINY

pytestmark = pytest.mark.distributed
WORLD = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, output_dir: str) -> None:
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD), "RANK": str(rank),
         "LOCAL_RANK": str(rank)}
    )  # fmt: skip
    torch.set_num_threads(1)
    from dinov2.train import loop
    from dinov2.train.train import main

    states = {}
    original = loop.Trainer.run

    def run_and_keep(self, resume=True):
        out = original(self, resume)
        states["student"] = {k: v.clone() for k, v in self.model.student.state_dict().items()}
        return out

    loop.Trainer.run = run_and_keep
    main(["--output-dir", output_dir, *TINY, "train.stop_at_iteration=3", "student.drop_path_rate=0.2"])
    torch.save(states["student"], os.path.join(output_dir, f"student_rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ranks_train_in_lockstep(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    states = [torch.load(tmp_path / f"student_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key
    # three logged steps: the ranks agreed after real updates, not only at initialisation
    records = (tmp_path / "training_metrics.json").read_text().splitlines()
    assert len([r for r in records if '"loss"' in r]) == 3
