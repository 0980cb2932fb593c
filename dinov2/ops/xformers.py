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
