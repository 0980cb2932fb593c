"""Lazy access to xFormers.

Nothing here imports xFormers at module import time: CPU installs never need it,
and a broken xFormers build must not break ``import dinov2``. Callers ask
:func:`xformers_ops` for the ``xformers.ops`` module when they are about to use it.

``DINOV2_DISABLE_XFORMERS=1`` in the environment makes this process behave as if xFormers were not
installed (``auto`` picks a native backend, the native residual add runs); it is read once, at the
first use. scripts/device/gpu_checks.py runs the GPU tests of the native paths that way, apart from
the xFormers tests.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from types import ModuleType

DISABLE_VARIABLE = "DINOV2_DISABLE_XFORMERS"


@functools.lru_cache(maxsize=1)
def _try_import() -> tuple[ModuleType | None, str | None]:
    setting = os.environ.get(DISABLE_VARIABLE, "").strip()
    if setting not in ("", "0"):
        return None, f"disabled by {DISABLE_VARIABLE}={setting}"
    try:
        module = importlib.import_module("xformers.ops")
    except Exception as exc:  # ImportError, or a build that fails while loading its extensions
        return None, f"{type(exc).__name__}: {exc}"
    return module, None


def xformers_available() -> bool:
    """True when ``xformers.ops`` imports in this environment."""
    return _try_import()[0] is not None


def xformers_import_error() -> str | None:
    """Why ``xformers.ops`` cannot be used in this process (its import error, or the
    ``DINOV2_DISABLE_XFORMERS`` setting); None when it imports."""
    return _try_import()[1]


def xformers_ops() -> ModuleType:
    """Return ``xformers.ops``, or raise a clear error saying why it cannot be used."""
    module, error = _try_import()
    if module is None:
        raise RuntimeError(
            "The 'xformers' attention backend was requested but xFormers cannot be imported "
            f'({error}). Install the GPU extra with `pip install -e ".[xformers]"`, or use '
            "attn_backend='sdpa' (PyTorch native) or 'auto'."
        )
    return module


def _log_unusable(what: str, instead: str, exc: Exception) -> None:
    """One log line (the probes are cached: once per process) for an xFormers op that raised when probed."""
    from dinov2.utils.logging import LOGGER_NAME, describe_error

    logging.getLogger(LOGGER_NAME).info("xFormers' %s cannot be used (%s): %s", what, describe_error(exc), instead)


@functools.lru_cache(maxsize=1)
def scaled_index_add_usable() -> bool:
    """True when xFormers' in-place ``scaled_index_add`` kernel can run: it imports *and* its Triton
    forward kernel is there (xFormers switches Triton off on GPUs before sm80, and then the op raises)."""
    if not xformers_available():
        return False
    try:  # a release without the op (or with it renamed) leaves the native index_add_
        indexing = importlib.import_module("xformers.ops.indexing")
        return bool(indexing.ScaledIndexAddFw.is_available() and indexing.ScaledIndexAddBw.is_available())
    except Exception as exc:
        _log_unusable("scaled_index_add", "the native index_add_ runs", exc)
        return False


@functools.lru_cache(maxsize=8)
def fused_swiglu_usable(device_type: str, dtype, bias: bool) -> bool:
    """True when ``xformers.ops.swiglu`` would run a fused kernel for this case. Its dispatcher may
    choose the eager op instead (three separate matmuls: xFormers 0.0.35 always does), which is
    worse than our native path (one packed ``w12`` matmul, two tensors kept for backward)."""
    if not xformers_available():
        return False
    ops = xformers_ops()
    try:  # a release without this dispatcher (or with another signature) leaves the native path
        choice = ops.SwiGLUOpDispatch(
            device=device_type, dtype=dtype, dtype_autocast_gpu=dtype, packed_weights=True, bias_enabled=bias
        ).op
        return choice is not ops.SwiGLUEagerOp
    except Exception as exc:
        _log_unusable("SwiGLUOpDispatch", "the native SwiGLU runs", exc)
        return False


@functools.lru_cache(maxsize=8)
def attention_failure(device_key: str) -> str | None:
    """None when xFormers' ``memory_efficient_attention`` with a block-diagonal bias runs forward
    and backward on ``device_key`` in bf16 and agrees with a float32 reference; else why not.

    An xFormers build made for another torch or CUDA can import and still have no kernel that runs
    (PyPI's wheel is built for one torch/CUDA pair): ``auto`` must then fall back rather than fail
    at the first step. Uses its own generator, so the global random streams are untouched."""
    if not xformers_available():
        return f"xFormers does not import ({_try_import()[1]})"
    import torch

    from dinov2.ops.attention import math_attention  # imports this module: not at the top
    from dinov2.utils.logging import describe_error

    seqlens, heads, dim = (7, 3), 2, 64
    try:
        device = torch.device(device_key)
        ops = xformers_ops()
        generator = torch.Generator().manual_seed(0)
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            qkv = [
                torch.randn(1, sum(seqlens), heads, dim, generator=generator)
                .to(device, torch.bfloat16)
                .requires_grad_()
                for _ in range(3)
            ]
            bias = ops.fmha.BlockDiagonalMask.from_seqlens(list(seqlens), device=device)
            out = ops.memory_efficient_attention(*qkv, attn_bias=bias)
            out.float().square().sum().backward()
            reference, start = [], 0
            for n in seqlens:  # float32 attention within each sequence
                reference.append(math_attention(*(t.detach()[:, start : start + n].float() for t in qkv)))
                start += n
            reference = torch.cat(reference, dim=1)
            error = float((out.detach().float() - reference).norm() / reference.norm())
            grads_finite = all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in qkv)
    except Exception as exc:  # no operator for this device/dtype, a kernel that fails to load or launch
        return describe_error(exc, limit=300)
    if not error < 2e-2:  # also catches NaN
        return f"memory_efficient_attention differs from a float32 reference (relative error {error:.3g})"
    if not grads_finite:
        return "memory_efficient_attention's backward gives no finite gradients"
    return None
