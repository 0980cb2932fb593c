"""Residual-branch helpers for stochastic depth that skips the dropped samples' compute.

With drop rate ``p``, a residual branch ``f`` is evaluated only on a random subset of
``keep = max(int(B * (1 - p)), 1)`` samples and its output is added back to those rows with
the scale ``B / keep`` (the exact inverse of the keep fraction, ``1 / (1 - p)`` when ``B * (1 - p)``
is whole), so ``E[x + mask * scale * f(x)] = x + f(x)``. The other rows pass through unchanged.

With ``inplace=True`` on CUDA with xFormers installed, the add is xFormers' ``scaled_index_add``
(one kernel that updates ``x`` in place, no copy of ``x``); otherwise ``torch.index_add`` on a copy.
In place is only safe where nothing saved ``x`` for backward or for a recomputation: a block
without activation checkpointing (the checkpointed forward re-reads its inputs), see layers/block.py.
"""

from __future__ import annotations

import torch

from dinov2.ops.xformers import xformers_available, xformers_ops


def sample_keep_subset(batch_size: int, drop_rate: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Random indices of the samples whose residual branch is computed, and their rescale."""
    keep = max(int(batch_size * (1.0 - drop_rate)), 1)
    indices = torch.randperm(batch_size, device=device)[:keep]
    return indices, batch_size / keep


def index_add_residual(
    x: torch.Tensor, indices: torch.Tensor, residual: torch.Tensor, scale: float, inplace: bool = False
) -> torch.Tensor:
    """Return ``x`` with ``scale * residual[j]`` added to row ``indices[j]``.

    ``indices`` must be unique (as :func:`sample_keep_subset` draws them). With ``inplace`` and
    xFormers on CUDA, ``x`` itself is updated and returned (autograd passes the gradient of ``x``
    straight through); otherwise a new tensor is returned."""
    if inplace and x.is_cuda and xformers_available():
        flat = x.flatten(1).unsqueeze(1)  # (B, 1, N * D): the kernel's (B, M, D) layout
        added = xformers_ops().scaled_index_add(
            flat, indices, residual.flatten(1).unsqueeze(1).to(x.dtype), alpha=scale
        )
        return added.view_as(x)
    flat = torch.index_add(x.flatten(1), 0, indices, residual.flatten(1).to(x.dtype), alpha=scale)
    return flat.view_as(x)
