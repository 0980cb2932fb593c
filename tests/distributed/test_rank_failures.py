"""What the other ranks do when one rank's loss turns non-finite (2 gloo processes).

The original reduces the loss terms over the ranks before its NaN check, so every rank stops at
the same step with the same error. A check on each rank's own losses lets the other ranks walk
on into the next collective, where (with NCCL) they wait for a peer that has left until the
process-group timeout, and then fail with a timeout instead of the reason.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dist_common import TINY, WORLD, free_port

pytestmark = pytest.mark.distributed


def _describe_group(rank: int, port: int) -> None:
    """The variables torchrun would set for this rank of a 2-process group on this machine."""
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD), "RANK": str(rank),
         "LOCAL_RANK": str(rank)}
    )  # fmt: skip
    torch.set_num_threads(1)


def _outcome(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"


def _launched_run(rank: int, port: int, root: str) -> None:
    """As under torchrun: only the environment describes the group, main creates it."""
    _describe_group(rank, port)
    from dinov2.train.train import main

    try:
        summary = main(["--output-dir", str(Path(root) / "launched"), *TINY, "train.stop_at_iteration=1"])
        outcome = f"{summary['iteration']} {dist.is_initialized()}"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test compares
        outcome = _outcome(error)
    (Path(root) / f"launched{rank}.txt").write_text(outcome)
    if dist.is_initialized():  # left behind (the launched test fails on it): the next run makes its own
        dist.destroy_process_group()


def _poisoned_run(rank: int, port: int, root: str) -> None:
    _describe_group(rank, port)
    # a short timeout: a rank left waiting must not hold the test for gloo's default 30 minutes
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.train.train import main

    if rank == 0:  # only this rank's KoLeo term becomes NaN, from the second step on
        forward, calls = SSLMetaArch.forward, []

        def poisoned(self, batch, *args, **kwargs):
            out = forward(self, batch, *args, **kwargs)
            calls.append(1)
            if len(calls) >= 2:
                out["koleo_loss"] = out["koleo_loss"] * float("nan")
                out["loss"] = self.total_loss({k: v for k, v in out.items() if k != "loss"})
            return out

        SSLMetaArch.forward = poisoned
    try:
        main(["--output-dir", str(Path(root) / "poisoned"), *TINY, "train.stop_at_iteration=3"])
        outcome = "finished"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test compares
        outcome = _outcome(error)
    (Path(root) / f"poisoned{rank}.txt").write_text(outcome)
    # no destroy_process_group: a rank that still waits in a collective would hang it; leaving the
    # process closes this rank's connections, which makes such a peer's gloo call fail at once


def _worker(rank: int, ports: tuple[int, int], root: str) -> None:
    """Both runs in one pair of processes (one spawn, half the start-up): first the launched run,
    which must leave no group behind, then the poisoned one in a group of its own (on another port)."""
    _launched_run(rank, ports[0], root)
    _poisoned_run(rank, ports[1], root)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("rank_failures")
    ports = (free_port(), free_port())
    while ports[1] == ports[0]:
        ports = (ports[0], free_port())
    mp.spawn(_worker, args=(ports, str(root)), nprocs=WORLD, join=True)
    return {run: [(root / f"{run}{r}.txt").read_text() for r in range(WORLD)] for run in ("launched", "poisoned")}


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_error(outcomes):
    outcomes = outcomes["poisoned"]
    assert outcomes[0].startswith("NonFiniteLossError: non-finite loss at iteration 2"), outcomes[0]
    assert outcomes[1].startswith("NonFiniteLossError: non-finite loss at iteration 2"), outcomes[1]
    assert "koleo_loss=nan (non-finite on 1 of 2 processes)" in outcomes[0]
    assert "(non-finite on 1 of 2 processes)" in outcomes[1] and "koleo_loss=nan" not in outcomes[1]


def test_a_completed_run_destroys_the_process_group_it_created(outcomes):
    assert outcomes["launched"] == ["1 False"] * WORLD, outcomes["launched"]
