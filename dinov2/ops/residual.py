"""Residual-branch helpers for stochastic depth that skips the dropped samples' compute.

With drop rate ``p``, a residual branch ``f`` is evaluated only on a random subset of
``keep = max(int(B * (1 - p)), 1)`` samples and its output is added back to those rows with
the scale ``B / keep`` (the exact inverse of the keep fraction, ``1 / (1 - p)`` when ``B * (1 - p)``
is whole), so ``E[x + mask * scale * f(x)] = x + f(x)``. The other rows pass through unchanged.

With ``inplace=True`` the add updates ``x`` itself (no copy of ``x``): xFormers' ``scaled_index_add``
kernel on CUDA where it can run, else ``Tensor.index_add_``; otherwise ``torch.index_add`` on a copy.
In place is only safe on a tensor the block made itself, that nothing saved for backward or for a
recomputation: never the block's input (under FSDP2 it is the output of a custom autograd function,
which autograd forbids modifying in place), and not inside activation checkpointing (the
checkpointed forward re-reads its inputs). layers/block.py adds the attention branch out of place
and the MLP branch in place on that result.
"""

from __future__ import annotations

import torch

from dinov2.ops.xformers import scaled_index_add_usable, xformers_ops


def sample_keep_subset(batch_size: int, drop_rate: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Random indices of the samples whose residual branch is computed, and their rescale."""
    keep = max(int(batch_size * (1.0 - drop_rate)), 1)
    indices = torch.randperm(batch_size, device=device)[:keep]
    return indices, batch_size / keep


def index_add_residual(
    x: torch.Tensor, indices: torch.Tensor, residual: torch.Tensor, scale: float, inplace: bool = False
) -> torch.Tensor:
    """Return ``x`` with ``scale * residual[j]`` added to row ``indices[j]``.

    ``indices`` must be unique (as :func:`sample_keep_subset` draws them). With ``inplace``, ``x``
    itself is updated and returned (autograd passes the gradient of ``x`` straight through);
    otherwise a new tensor is returned."""
    source = residual.flatten(1).to(x.dtype)
    if inplace and x.is_cuda and scaled_index_add_usable():
        flat = x.flatten(1).unsqueeze(1)  # (B, 1, N * D): the kernel's (B, M, D) layout
        return xformers_ops().scaled_index_add(flat, indices, source.unsqueeze(1), alpha=scale).view_as(x)
    if inplace:
        return x.flatten(1).index_add_(0, indices, source, alpha=scale).view_as(x)
    return torch.index_add(x.flatten(1), 0, indices, source, alpha=scale).view_as(x)
