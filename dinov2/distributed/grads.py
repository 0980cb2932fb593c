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
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=None)
        squares.append(norm.full_tensor().float() ** 2)
    if plain:
        squares.append(torch.nn.utils.get_total_norm(plain, norm_type=2.0).float() ** 2)
    if not squares:
        return torch.zeros(())
    device = squares[0].device
    return torch.stack([s.to(device) for s in squares]).sum().sqrt()


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
