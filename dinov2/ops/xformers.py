"""Lazy access to xFormers.

Nothing here imports xFormers at module import time: CPU installs never need it,
and a broken xFormers build must not break ``import dinov2``. Callers ask
:func:`xformers_ops` for the ``xformers.ops`` module when they are about to use it.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.lru_cache(maxsize=1)
def _try_import() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module("xformers.ops")
    except Exception as exc:  # ImportError, or a build that fails while loading its extensions
        return None, f"{type(exc).__name__}: {exc}"
    return module, None


def xformers_available() -> bool:
    """True when ``xformers.ops`` imports in this environment."""
    return _try_import()[0] is not None


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


@functools.lru_cache(maxsize=1)
def scaled_index_add_usable() -> bool:
    """True when xFormers' in-place ``scaled_index_add`` kernel can run: it imports *and* its Triton
    forward kernel is there (xFormers switches Triton off on GPUs before sm80, and then the op raises)."""
    if not xformers_available():
        return False
    indexing = importlib.import_module("xformers.ops.indexing")
    return bool(indexing.ScaledIndexAddFw.is_available() and indexing.ScaledIndexAddBw.is_available())


@functools.lru_cache(maxsize=8)
def fused_swiglu_usable(device_type: str, dtype, bias: bool) -> bool:
    """True when ``xformers.ops.swiglu`` would run a fused kernel for this case. Its dispatcher may
    choose the eager op instead (three separate matmuls: xFormers 0.0.35 always does), which is
    worse than our native path (one packed ``w12`` matmul, two tensors kept for backward)."""
    if not xformers_available():
        return False
    ops = xformers_ops()
    choice = ops.SwiGLUOpDispatch(
        device=device_type, dtype=dtype, dtype_autocast_gpu=dtype, packed_weights=True, bias_enabled=bias
    ).op
    return choice is not ops.SwiGLUEagerOp
