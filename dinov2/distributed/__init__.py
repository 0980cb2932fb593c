"""Process-group helpers that are no-ops in a single process.

Every collective takes an explicit ``group`` (``None``: the default group). Without an
initialised process group (one CPU process, a notebook, the tests) the helpers behave as a
world of size 1: reductions return their input unchanged and gathers return it as is.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_enabled() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_world_size(group=None) -> int:
    return dist.get_world_size(group) if is_enabled() else 1


def get_rank(group=None) -> int:
    return dist.get_rank(group) if is_enabled() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce(tensor: torch.Tensor, op=None, group=None, async_op: bool = False):
    """In-place all-reduce (sum by default). Returns the work handle with ``async_op`` (``None`` when
    not distributed), else the tensor."""
    if get_world_size(group) == 1:
        return None if async_op else tensor
    work = dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=group, async_op=async_op)
    return work if async_op else tensor


def all_gather_cat(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate equally-shaped tensors from all ranks along dim 0 (rank order). Not differentiable."""
    world = get_world_size(group)
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts, dim=0)


def init_from_env(device: torch.device | None = None) -> bool:
    """Join the process group torchrun (or a launcher setting ``WORLD_SIZE``/``RANK``/``MASTER_ADDR``)
    describes: NCCL for CUDA devices, gloo otherwise. Returns True when running distributed.
    A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) stays unaffected."""
    if is_enabled():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend=backend, **kwargs)
    return True


def all_reduce_mean_grads(parameters, group=None) -> None:
    """Average the ``.grad`` of ``parameters`` over ranks (data parallelism without a wrapper);
    one flattened reduction per dtype. A no-op on one process."""
    world = get_world_size(group)
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
