"""Run-time device, precision and seeding choices (called by entry points, never at import)."""

from __future__ import annotations

import contextlib
import os
import random
import resource

import numpy as np
import torch

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _local_cuda_index() -> int:
    """This process's CUDA index: its local rank, or 0 where each process sees one GPU of its own
    (``srun --gpus-per-task=1``, or CUDA_VISIBLE_DEVICES set per task). More local ranks than
    visible GPUs otherwise is an error: two processes on one GPU stop NCCL with "duplicate GPU"."""
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    count = torch.cuda.device_count()
    if local_rank < count:
        return local_rank
    if count == 1:
        return 0
    raise RuntimeError(
        f"local rank {local_rank} (LOCAL_RANK / SLURM_LOCALID) but this process sees only {count} CUDA devices: "
        "start at most one process per GPU on each node (torchrun --nproc_per_node, srun --ntasks-per-node)"
    )


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto``/None: this process's CUDA device when CUDA is available (``LOCAL_RANK`` under
    torchrun, ``SLURM_LOCALID`` under srun), else CPU. ``cuda`` without an index is that same
    device; anything else is parsed by ``torch.device``, and asking for CUDA without it fails.

    A CUDA device is also made the current one: kernels that launch on the current device
    (xFormers' Triton ops, its attention biases) then run where the tensors are."""
    if isinstance(name, torch.device):
        device = name
    elif name in (None, "", "auto"):
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", _local_cuda_index())
        torch.cuda.set_device(device)
    return device


def resolve_autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``compute_precision.autocast_dtype`` (``auto|bf16|fp16|fp32``); None = fp32.

    ``auto`` is bf16 on CUDA (fp16 on GPUs without bf16) and fp32 on CPU."""
    setting = str(setting).lower()
    if setting == "auto":
        if device.type != "cuda":
            return None
        # Native bf16 only (sm80+): on older GPUs bf16 is emulated, and xFormers' kernels refuse it.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
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


@contextlib.contextmanager
def full_precision_matmuls():
    """fp32 matmuls without TF32 inside the block (or the decorated function), the setting restored
    after: for the evaluations' own arithmetic (k-NN similarities, logistic-regression fits), which
    the original runs in full fp32, while the backbone's feature extraction may use TF32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (all devices) from ``(seed, rank)``, reproducibly.

    Each library gets its own seed, drawn from ``numpy.random.SeedSequence([seed, rank])``: NumPy's
    legacy generator and torch's CPU generator are both MT19937 seeded the same way, so one shared
    seed would give them the same stream (NumPy's augmentations drawing what torch's do)."""
    seed, rank = int(seed), int(rank)
    if seed < 0 or rank < 0:
        raise ValueError(f"seed and rank must be >= 0, got seed={seed}, rank={rank}")
    python_seed, numpy_seed, torch_seed = np.random.SeedSequence([seed, rank]).generate_state(3, dtype=np.uint64)
    random.seed(int(python_seed))
    np.random.seed(int(numpy_seed) % 2**32)
    torch.manual_seed(int(torch_seed))


def batch_to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its tensors on ``device`` (non-blocking copies to CUDA); other values as they are."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v for k, v in batch.items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
