"""The training step's precision: the autocast dtype and whether a gradient scaler is needed, and
the scaler itself (sharded under FSDP2, so that every rank skips the same steps)."""

from __future__ import annotations

from typing import Any

import torch

from dinov2.distributed.parallelize import any_fp16, module_policy, use_mixed_precision
from dinov2.utils.device import resolve_autocast_dtype


def resolve_precision(cfg: Any, device: torch.device, sharded: bool) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype or None, needs a gradient scaler)``. With FSDP2 mixed precision in use,
    ``autocast_dtype: auto`` follows the student backbone's ``param_dtype`` so that the two agree."""
    mixed = sharded and use_mixed_precision(cfg, device)
    setting = str(cfg.compute_precision.autocast_dtype).lower()
    if setting == "auto" and mixed:
        dtype = module_policy(cfg, "student", "backbone", True)["param_dtype"]
        dtype = None if dtype == torch.float32 else dtype
    else:
        dtype = resolve_autocast_dtype(setting, device)
    fp16 = dtype == torch.float16 or any_fp16(cfg, mixed)
    return dtype, fp16 and bool(cfg.compute_precision.grad_scaler)


def grad_scaler(device: torch.device, sharded: bool):
    if sharded:  # found-inf is all-reduced, so every rank skips the same steps
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device.type)
    return torch.amp.GradScaler(device.type)
