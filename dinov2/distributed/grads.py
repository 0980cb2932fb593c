"""Gradient norm and clipping over gradients that may be FSDP2 shards (DTensors) or plain tensors."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from dinov2.distributed import is_dtensor, local_tensor


def total_grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together, as if nothing were sharded (the same on every rank).

    Sharded gradients are grouped by mesh and placements; each group's norm is one reduction."""
    plain: list[torch.Tensor] = []
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for param in parameters:
        grad = param.grad
        if grad is None:
            continue
        if is_dtensor(grad):
            groups[(id(grad.device_mesh), tuple(grad.placements))].append(grad)
        else:
            plain.append(grad)
    squares = []
    for grads in groups.values():
        squares.append(_sharded_square(grads))
    if plain:
        squares.append(_local_square(plain))
    if not squares:
        return torch.zeros(())
    device = squares[0].device
    return torch.stack([s.to(device) for s in squares]).sum().sqrt()


def _local_square(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of these (local) tensors, accumulated in fp32: a half-precision norm above
    about 256 would overflow fp16 when squared, and bf16 would round it."""
    norms = [torch.linalg.vector_norm(t, 2.0, dtype=torch.float32) for t in tensors]
    return torch.stack([n.to(norms[0].device) for n in norms]).square().sum()


def _sharded_square(grads: list[torch.Tensor]) -> torch.Tensor:
    """The squared norm of DTensor gradients that share a mesh and placements, with one reduction:
    each rank squares its local shards in fp32, then the sums add up over the mesh dimensions the
    gradients are sharded along (replicated dimensions hold the same values and are not added)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    first = grads[0]
    placements = first.placements
    if not all(p.is_shard() or p.is_replicate() for p in placements):
        raise ValueError(
            f"gradient norm: DTensor gradients must be sharded or replicated, not {list(placements)} "
            "(FSDP2 and HSDP give only those)"
        )
    local = _local_square([g.to_local() for g in grads])
    summed = [Partial() if p.is_shard() else Replicate() for p in placements]
    return DTensor.from_local(local, first.device_mesh, summed, run_check=False).full_tensor()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_`` on the unsharded model); returns the norm before clipping."""
    parameters = [p for p in parameters if p.grad is not None]
    total = total_grad_norm(parameters)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for param in parameters:
        grad = local_tensor(param.grad)
        grad.mul_(coef.to(grad.device, grad.dtype))
    return total
