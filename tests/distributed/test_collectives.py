"""The process-group helpers of dinov2.distributed on 2 gloo processes (averaging, counting, gathering,
norms over shards, the checkpoint a resume reads, shutdown), against values computed here from every rank's inputs; and, in one
process, which backend and precision a run chooses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dist_common import WORLD, free_port, join_group

import dinov2.distributed as distributed
from dinov2.utils.device import resolve_autocast_dtype


def _grad(name: str, rank: int, shape, dtype=torch.float32) -> torch.Tensor:
    """A rank-dependent gradient, reproducible in the parent process."""
    seed = sum(map(ord, name)) * 10 + rank
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 2)}  # c is bf16: reduced in its own flat buffer


def _worker(rank: int, port: int, out: str) -> None:
    join_group(rank, port)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from dinov2.distributed.grads import clip_grad_norm_, total_grad_norm

    result = {}
    # data parallelism without a wrapper: each gradient averaged over the ranks, exactly once
    params = {
        n: torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16 if n == "c" else None)) for n, s in SHAPES.items()
    }
    params["unused"] = torch.nn.Parameter(torch.zeros(2))  # no gradient: stays without one
    for name in SHAPES:
        params[name].grad = _grad(name, rank, SHAPES[name], torch.bfloat16 if name == "c" else torch.float32)
    distributed.all_reduce_mean_grads(params.values())
    result["mean"] = {n: p.grad for n, p in params.items() if p.grad is not None}
    result["unused"] = params["unused"].grad

    count = distributed.RunCount(earlier=5)
    count.local = 3 + rank
    result["count"] = count.total(torch.device("cpu"))
    result["gathered"] = distributed.all_gather_cat(torch.full((2, 1), float(rank)))
    assert distributed.collective_device() == torch.device("cpu")  # gloo: small collectives on the CPU
    result["failed_none"] = distributed.failed_ranks(False)
    result["failed_one"] = distributed.failed_ranks(rank == 1)  # only rank 1 fails: every rank learns it
    result["failed_all"] = distributed.failed_ranks(True)

    # which checkpoint a resume reads: rank 0's choice on every rank, whatever the others' listings say
    from dinov2.checkpoint import sharded as checkpoints

    real_list, real_complete = checkpoints.list_checkpoints, checkpoints.is_complete
    if rank == 1:  # a stale listing on this node: no checkpoint at all
        checkpoints.list_checkpoints = lambda directory: []
    result["agreed"] = str(checkpoints.agreed_latest_checkpoint(Path(out) / "ckpts"))
    result["agreed_none"] = checkpoints.agreed_latest_checkpoint(Path(out) / "empty")
    checkpoints.list_checkpoints = real_list
    if rank == 1:  # this node does not see the chosen checkpoint whole
        checkpoints.is_complete = lambda path: False
    try:
        checkpoints.agreed_latest_checkpoint(Path(out) / "ckpts")
        result["unseen"] = "no error"
    except checkpoints.CheckpointNotVisibleError as error:
        result["unseen"] = str(error)
    checkpoints.is_complete = real_complete

    # one norm over a sharded gradient (the same full tensor on every rank, 7 rows over 2 ranks:
    # uneven shards) and a replicated plain one
    mesh = init_device_mesh("cpu", (WORLD,))
    full = _grad("sharded", 0, (7, 3))
    sharded = torch.nn.Parameter(distribute_tensor(torch.zeros(7, 3), mesh, [Shard(0)]))
    sharded.grad = distribute_tensor(full.clone(), mesh, [Shard(0)])
    plain = torch.nn.Parameter(torch.zeros(4))
    plain.grad = _grad("plain", 0, (4,))
    result["norm"] = total_grad_norm([sharded, plain])
    result["clip_norm"] = clip_grad_norm_([sharded, plain], 1.0)
    result["clipped"] = (sharded.grad.full_tensor(), plain.grad.clone())
    torch.save(result, Path(out) / f"r{rank}.pt")
    distributed.shutdown()  # the default group and the mesh's
    assert not distributed.is_enabled() and distributed.get_world_size() == 1
    distributed.shutdown()  # without a group: nothing to do


@pytest.mark.distributed
def test_helpers_average_count_gather_and_take_norms_over_ranks(tmp_path):
    for step, files in ((2, (".metadata", "trainer_state.pth")), (4, (".metadata",))):  # 4: being written
        (tmp_path / "ckpts" / f"step_{step:07d}").mkdir(parents=True)
        for name in files:
            (tmp_path / "ckpts" / f"step_{step:07d}" / name).touch()
    (tmp_path / "empty").mkdir()
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"r{r}.pt", weights_only=True) for r in range(WORLD)]
    for result in results:  # every rank ends with the same values
        for name, shape in SHAPES.items():
            dtype = torch.bfloat16 if name == "c" else torch.float32
            grads = [_grad(name, r, shape, dtype).float() for r in range(WORLD)]
            expected = (sum(grads) / WORLD).to(dtype)  # the mean, not the sum
            assert result["mean"][name].dtype == dtype
            tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-6}
            torch.testing.assert_close(result["mean"][name], expected, **tol, msg=name)
        assert result["unused"] is None
        assert result["count"] == 5 + 3 + 4
        assert torch.equal(result["gathered"], torch.tensor([[0.0], [0.0], [1.0], [1.0]]))
        assert (result["failed_none"], result["failed_one"], result["failed_all"]) == ([], [1], [0, 1])
        assert result["agreed"] == str(tmp_path / "ckpts" / "step_0000002") and result["agreed_none"] is None
    assert "rank 1 does not see" in results[1]["unseen"] and "step_0000002" in results[1]["unseen"]
    assert (
        results[0]["unseen"].startswith("finding ")
        and "failed on rank 1: CheckpointNotVisibleError: rank 1 does not see" in results[0]["unseen"]
    )
    for result in results:
        full, plain = _grad("sharded", 0, (7, 3)), _grad("plain", 0, (4,))
        norm = torch.cat([full.flatten(), plain]).norm()
        torch.testing.assert_close(result["norm"], norm)
        torch.testing.assert_close(result["clip_norm"], norm)
        assert norm > 1.0  # the clip is active: both parts are scaled by the same factor
        scale = 1.0 / (norm + 1e-6)
        torch.testing.assert_close(result["clipped"][0], full * scale)
        torch.testing.assert_close(result["clipped"][1], plain * scale)


def test_single_process_helpers_are_identities():
    assert not distributed.is_enabled() and distributed.get_world_size() == 1 and distributed.get_rank() == 0
    x = torch.arange(3.0)
    assert distributed.all_reduce(x) is x and distributed.all_gather_cat(x) is x
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    distributed.all_reduce_mean_grads([p])
    assert torch.equal(p.grad, torch.ones(2))
    distributed.barrier()
    assert distributed.failed_ranks(True) == [0] and distributed.failed_ranks(False) == []
    assert distributed.collective_device() == torch.device("cpu")
    distributed.shutdown()


def test_init_from_env_backend_and_device(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append({"current": device}))
    for key in ("SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.init_from_env(torch.device("cuda", 1)) and calls == []  # one process: no group
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.init_from_env(torch.device("cuda", 1))
    assert calls == [{"current": torch.device("cuda", 1)}, {"backend": "nccl", "device_id": torch.device("cuda", 1)}]
    calls.clear()
    assert distributed.init_from_env(torch.device("cpu")) and calls == [{"backend": "gloo"}]


def test_auto_autocast_is_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    asked = []

    def supported(native: bool):
        def is_bf16_supported(including_emulation: bool = True) -> bool:
            asked.append(including_emulation)
            return native or including_emulation  # an emulating GPU (pre-Ampere) says yes with emulation

        return is_bf16_supported

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported(native=False))
    assert resolve_autocast_dtype("auto", cuda) == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported(native=True))
    assert resolve_autocast_dtype("auto", cuda) == torch.bfloat16
    assert asked == [False, False]
    assert resolve_autocast_dtype("auto", torch.device("cpu")) is None
    assert resolve_autocast_dtype("BF16", torch.device("cpu")) == torch.bfloat16  # explicit: as asked
    with pytest.raises(ValueError, match=r"compute_precision.autocast_dtype='half'"):
        resolve_autocast_dtype("half", cuda)


def _draws() -> tuple[list[float], list[float], list[float]]:
    import random

    import numpy as np

    return [random.random() for _ in range(4)], np.random.random_sample(4).tolist(), torch.rand(4).tolist()


def _numpy_state_inside_torch_state() -> bool:
    """Whether NumPy's 624 MT19937 words appear, in order, in torch's CPU generator state (which
    stores each word as a 64-bit integer)."""
    import numpy as np

    keys = np.random.get_state()[1].astype(np.uint64).tobytes()
    return keys in torch.get_rng_state().numpy().tobytes()


def test_seed_everything_gives_each_library_its_own_reproducible_stream():
    from dinov2.utils.device import seed_everything

    seed_everything(7, rank=1)
    assert not _numpy_state_inside_torch_state()  # one shared seed made both MT19937 states identical
    first = _draws()
    seed_everything(7, rank=1)
    assert _draws() == first  # reproducible
    seed_everything(7, rank=2)
    assert _draws()[1:] != first[1:]  # another rank: other streams
    seed_everything(8, rank=0)
    other = _draws()
    seed_everything(7, rank=1)
    assert _draws() != other  # (seed, rank) pairs, not their sum
    with pytest.raises(ValueError, match="seed and rank must be >= 0, got seed=-1"):
        seed_everything(-1)
    with pytest.raises(ValueError, match="seed and rank must be >= 0, got seed=7, rank=-1"):
        seed_everything(7, rank=-1)


def test_a_rank_whose_error_cannot_be_shared_still_raises_its_own(monkeypatch, caplog):
    """When telling the peers fails too (a peer gone: gloo resets, NCCL times out), the rank's own
    error is what it raises, and the failed collective is logged; without an own error, the
    collective's failure propagates."""
    import logging

    def collective_fails(failed_here, group=None):
        raise RuntimeError("Connection reset by peer")

    monkeypatch.setattr(distributed, "failed_ranks", collective_fails)

    def action():
        raise ValueError("disk quota exceeded writing shard 3")

    with caplog.at_level(logging.ERROR, logger="dinov2"):
        with pytest.raises(ValueError, match="disk quota exceeded"):
            distributed.on_every_rank(action, "writing checkpoint X", RuntimeError)
    assert "writing checkpoint X: could not tell the other ranks" in caplog.text and "Connection reset" in caplog.text
    with pytest.raises(RuntimeError, match="Connection reset by peer"):
        distributed.on_every_rank(lambda: 1, "reading", ValueError)
