"""Run-time device, precision and seeding choices (called by entry points, never at import)."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None: this process's CUDA device when CUDA is available (``LOCAL_RANK`` under
    torchrun, ``SLURM_LOCALID`` under srun), else CPU. Anything else is parsed by ``torch.device``; asking for CUDA without it fails."""
    if isinstance(name, torch.device):
        return name
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``compute_precision.autocast_dtype`` (``auto|bf16|fp16|fp32``); None = fp32.

    ``auto`` is bf16 on CUDA (fp16 on GPUs without bf16) and fp32 on CPU."""
    setting = str(setting).lower()
    if setting == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if setting not in AUTOCAST_DTYPES:
        raise ValueError(f"compute_precision.autocast_dtype={setting!r}; valid: auto, {', '.join(AUTOCAST_DTYPES)}")
    return AUTOCAST_DTYPES[setting]


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``device.type`` with ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def enable_tf32(device: torch.device, enabled: bool = True) -> None:
    """Allow TF32 matmuls and convolutions on CUDA (a run-start setting, not an import side effect)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) with ``seed + rank``."""
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)
