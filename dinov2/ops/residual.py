"""Residual-branch helpers for stochastic depth that skips the dropped samples' compute.

With drop rate ``p``, a residual branch ``f`` is evaluated only on a random subset of
``keep = max(int(B * (1 - p)), 1)`` samples and its output is added back to those rows with
the scale ``B / keep`` (the exact inverse of the keep fraction, ``1 / (1 - p)`` when ``B * (1 - p)``
is whole), so ``E[x + mask * scale * f(x)] = x + f(x)``. The other rows pass through unchanged.
"""

from __future__ import annotations

import torch


def sample_keep_subset(batch_size: int, drop_rate: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """Random indices of the samples whose residual branch is computed, and their rescale."""
    keep = max(int(batch_size * (1.0 - drop_rate)), 1)
    indices = torch.randperm(batch_size, device=device)[:keep]
    return indices, batch_size / keep


def index_add_residual(x: torch.Tensor, indices: torch.Tensor, residual: torch.Tensor, scale: float) -> torch.Tensor:
    """Return ``x`` with ``scale * residual[j]`` added to row ``indices[j]`` (out of place)."""
    flat = torch.index_add(x.flatten(1), 0, indices, residual.flatten(1).to(x.dtype), alpha=scale)
    return flat.view_as(x)
