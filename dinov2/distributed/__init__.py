"""Process-group helpers that are no-ops in a single process.

Every collective takes an explicit ``group`` (``None``: the default group). Without an
initialised process group (one CPU process, a notebook, the tests) the helpers behave as a
world of size 1: reductions return their input unchanged and gathers return it as is.
"""

from __future__ import annotations

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
