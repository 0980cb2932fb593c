"""Shared pieces of the 2-process gloo tests: a tiny training config and a process launcher."""

from __future__ import annotations

import os
import socket

import torch

WORLD = 2

TINY = [
    "train.device=cpu",  # gloo on CPU, and one precision for both sides, also on a machine with a GPU
    "train.dataset_path=Synthetic:split=TRAIN:num_images=64:image_size=32",
    "train.batch_size_per_gpu=4",
    "train.num_workers=0",
    "train.OFFICIAL_EPOCH_LENGTH=4",
    "train.log_period=1",
    "train.checkpoint_period_iterations=2",
    "student.arch=vit_tiny",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=8",
    "student.drop_path_rate=0",
    "student.layerscale=1.0",  # with 1e-5 all CLS outputs nearly coincide and KoLeo sits on its eps floor
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
    "optim.epochs=1",
    "optim.warmup_epochs=0.5",
    "optim.freeze_last_layer_epochs=0.25",
    "teacher.warmup_teacher_temp_epochs=0.5",
    "crops.global_crops_size=32",
    "crops.local_crops_size=16",
    "crops.local_crops_number=2",
    "evaluation.eval_period_iterations=2",
]

# Every sharding strategy at once, and block chunks (each chunk one FSDP2 unit).
MIXED_SHARDING = [
    "student.block_chunks=2",
    *(f"compute_precision.{role}.backbone.sharding_strategy=FULL_SHARD" for role in ("student", "teacher")),
    *(f"compute_precision.{role}.dino_head.sharding_strategy=SHARD_GRAD_OP" for role in ("student", "teacher")),
    *(f"compute_precision.{role}.ibot_head.sharding_strategy=NO_SHARD" for role in ("student", "teacher")),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_group(rank: int, port: int) -> None:
    """Set torchrun's variables for ``rank`` of :data:`WORLD` and join the gloo group."""
    os.environ.update(
        {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD), "RANK": str(rank),
         "LOCAL_RANK": str(rank)}
    )  # fmt: skip
    torch.set_num_threads(1)
    from dinov2.distributed import init_from_env

    init_from_env(torch.device("cpu"))


def run_parts(rank: int, port: int, parts: list[tuple[str, str, tuple]]) -> None:
    """Join the group, run each ``(module, function, args)`` part as ``function(rank, *args)``, leave
    the group: checks of several test modules that need the same 2-process group share one spawn."""
    import importlib

    join_group(rank, port)
    for module, function, args in parts:
        getattr(importlib.import_module(module), function)(rank, *args)
    torch.distributed.barrier()  # no rank leaves while its peer still exchanges with it
    torch.distributed.destroy_process_group()


def spawn_bounded(fn, args: tuple, seconds: float) -> None:
    """``torch.multiprocessing.spawn`` of :data:`WORLD` processes running ``fn(rank, *args)``, waiting
    ``seconds`` at most: ranks left waiting in a collective (the hang a test checks is gone) fail the
    test with an AssertionError and are killed, instead of holding the suite. A rank's exception is
    raised as spawn raises it."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(fn, args=args, nprocs=WORLD, join=False)
    deadline = time.perf_counter() + seconds
    try:
        while not context.join(timeout=max(deadline - time.perf_counter(), 0.1)):
            assert time.perf_counter() < deadline, f"the ranks did not stop within {seconds:.0f} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
