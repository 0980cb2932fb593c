"""Multi-head attention kernels behind one interface.

Layout: every function here takes ``q, k, v`` in "BNHD" layout, ``(batch, tokens, heads,
head_dim)``, which is what a fused ``qkv`` projection reshapes into without a copy and what
xFormers consumes directly. The softmax scale is always ``head_dim ** -0.5``.

Backends:

- ``math``: the explicit ``softmax(q k^T / sqrt(d)) v``; the reference every other backend is
  tested against. Softmax runs in float32 (float64 for float64 inputs).
- ``sdpa``: :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient /
  C++ kernels chosen by PyTorch for the device).
- ``varlen``: one variable-length SDPA call over a nested jagged tensor (``torch.nested``,
  ``layout=torch.jagged``): on CUDA PyTorch runs its flash / memory-efficient variable-length
  kernels, on CPU its reference path. For a single dense group it is ``sdpa``.
- ``xformers``: ``xformers.ops.memory_efficient_attention``, imported lazily (CUDA only).
- ``auto``: per device and kind of call, the first usable entry of :data:`AUTO_PREFERENCE`
  (chosen from scripts/benchmark_attention.py and scripts/benchmark_train.py; see
  docs/performance.md); the choice is logged once per device type.

Nested (variable-length) attention runs several groups of sequences whose tokens have been
concatenated into one ``(T, heads, head_dim)`` tensor, e.g. the 2 global and 8 local crops
of a DINOv2 batch. Group ``i`` holds ``B_i`` sequences of ``N_i`` tokens and attention never
crosses sequence boundaries. ``math`` and ``sdpa`` run one dense call per group (SDPA once per
crop size); ``varlen`` and ``xformers`` run one call over all sequences (a jagged tensor, or a
block-diagonal bias, each cached per group shapes).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dinov2.ops.xformers import attention_failure, xformers_available, xformers_ops

logger = logging.getLogger("dinov2")

BACKENDS = ("math", "sdpa", "varlen", "xformers", "auto")

# What ``auto`` runs: per (device type, nested call), the first usable backend of the list.
# CPU: per-group SDPA measured fastest for nested and dense calls (scripts/benchmark_attention.py,
# docs/performance.md). CUDA: xFormers when it imports (one block-diagonal call, as the original),
# else per-group SDPA (flash attention per crop size); not yet measured on a GPU by this project.
AUTO_PREFERENCE: dict[tuple[str, bool], tuple[str, ...]] = {
    ("cuda", False): ("xformers", "sdpa"),
    ("cuda", True): ("xformers", "sdpa"),
    ("cpu", False): ("sdpa",),
    ("cpu", True): ("sdpa",),
}

GroupShapes = tuple[tuple[int, int], ...]


def _usable(backend: str, device_type: str) -> bool:
    """Whether ``auto`` may pick ``backend``: xFormers only on CUDA, and only where a probe call of
    its kernel on the current device runs and is right (:func:`dinov2.ops.xformers.attention_failure`)."""
    if backend != "xformers":
        return True
    if device_type != "cuda" or not xformers_available():
        return False
    failure = attention_failure(f"cuda:{torch.cuda.current_device()}")
    if failure is not None:
        logger.warning("attention backend auto: xFormers imports but cannot be used here (%s)", failure)
    return failure is None


@functools.cache
def _auto_choice(device_type: str, nested: bool) -> str:
    preference = AUTO_PREFERENCE.get((device_type, nested), ("sdpa",))
    choice = next((b for b in preference if _usable(b, device_type)), "sdpa")
    logger.info("attention backend auto -> %s on %s (%s calls; preference %s)", choice, device_type,
                "nested" if nested else "dense", ", ".join(preference))  # fmt: skip
    return choice


def check_backend(backend: str) -> None:
    """Raise a ValueError naming ``backend`` and the valid ones unless it is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; valid backends: {', '.join(BACKENDS)}")


def resolve_backend(backend: str, device: torch.device, nested: bool = False) -> str:
    """Map a requested backend (possibly ``auto``) to the one that will run on ``device``."""
    check_backend(backend)
    if backend == "auto":
        return _auto_choice(device.type, nested)
    return backend


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference attention: explicit scores and softmax in float32 (float64 for float64 inputs, which
    are never rounded down), also under autocast (which would otherwise run the einsums in bf16/fp16).
    BNHD in, BNHD out."""
    scale = q.shape[-1] ** -0.5
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        scores = torch.einsum("bnhd,bmhd->bhnm", q.to(dtype) * scale, k.to(dtype))
        probs = scores.softmax(dim=-1)
        return torch.einsum("bhnm,bmhd->bnhd", probs, v.to(dtype)).to(q.dtype)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Dense multi-head attention over ``(B, N, H, D)`` inputs with the chosen backend."""
    backend = resolve_backend(backend, q.device)
    if backend == "math":
        return math_attention(q, k, v)
    if backend in ("sdpa", "varlen"):  # one dense group: the variable-length kernel is plain SDPA
        return _sdpa(q, k, v)
    return xformers_ops().memory_efficient_attention(q, k, v)


@functools.lru_cache(maxsize=64)
def _block_diagonal_bias(group_shapes: GroupShapes, device: torch.device):
    """xFormers block-diagonal bias for the given groups on ``device``, cached per shapes and device
    (without ``device`` xFormers puts it on the current CUDA device, which need not be the inputs')."""
    seqlens = [n for b, n in group_shapes for _ in range(b)]
    return xformers_ops().fmha.BlockDiagonalMask.from_seqlens(seqlens, device=device)


@functools.lru_cache(maxsize=64)
def _jagged_offsets(group_shapes: GroupShapes, device: torch.device) -> torch.Tensor:
    """Start offsets of every sequence (and the end), cached per shape tuple and device."""
    lengths = [n for b, n in group_shapes for _ in range(b)]
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(device)


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shapes: GroupShapes) -> torch.Tensor:
    """One SDPA call over all sequences as nested jagged tensors ``(sequences, heads, j, D)``."""
    offsets = _jagged_offsets(shapes, q.device)
    # Several sequence lengths: a jagged tensor. The CPU reference path of SDPA on jagged inputs
    # builds a strided nested tensor internally and warns that its API is a prototype.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The PyTorch API of nested tensors is in prototype stage")
        # Contiguous values: PyTorch's jagged SDPA kernels (and its CPU path) need them; q, k, v split
        # from a fused qkv projection are strided views.
        # The lengths are known here: passed, they spare PyTorch a device-to-host sync per call.
        lengths = {"min_seqlen": min(n for _, n in shapes), "max_seqlen": max(n for _, n in shapes)}
        q, k, v = (
            torch.nested.nested_tensor_from_jagged(t.contiguous(), offsets, **lengths).transpose(1, 2)
            for t in (q, k, v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).values()


def _check_groups(total_tokens: int, group_shapes: Sequence[tuple[int, int]]) -> GroupShapes:
    shapes = tuple((int(b), int(n)) for b, n in group_shapes)
    expected = sum(b * n for b, n in shapes)
    if expected != total_tokens:
        raise ValueError(
            f"nested_attention: group shapes {shapes} describe {expected} tokens but the inputs hold {total_tokens}"
        )
    return shapes


def nested_attention_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_shapes: Sequence[tuple[int, int]],
    backend: str = "auto",
) -> list[torch.Tensor]:
    """:func:`nested_attention` as consecutive ``(tokens, H, D)`` parts whose concatenation is the
    result: one part per group for the per-group backends (``math``, ``sdpa``), one part for the
    one-call backends (``varlen``, ``xformers``). A caller that projects each part before joining
    them (layers/attention.py) saves the copy a concatenation of attention outputs would keep alive
    for backward, so the nested pass keeps no more memory than separate passes."""
    shapes = _check_groups(q.shape[0], group_shapes)
    backend = resolve_backend(backend, q.device, nested=len(shapes) > 1)
    if backend == "varlen" and len(shapes) > 1:
        return [_varlen(q, k, v, shapes)]
    if backend == "xformers":
        bias = _block_diagonal_bias(shapes, q.device)
        return [xformers_ops().memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]]
    heads, dim = q.shape[1:]
    outputs = []
    start = 0
    for b, n in shapes:
        end = start + b * n
        group = [t[start:end].reshape(b, n, heads, dim) for t in (q, k, v)]
        outputs.append(attention(*group, backend=backend).reshape(b * n, heads, dim))
        start = end
    return outputs


def nested_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_shapes: Sequence[tuple[int, int]],
    backend: str = "auto",
) -> torch.Tensor:
    """Attention over concatenated groups of sequences.

    Args:
        q, k, v: ``(T, H, D)``, the tokens of all groups concatenated group by group, each group
            laid out sequence-major (``B_i`` sequences of ``N_i`` consecutive tokens).
        group_shapes: ``[(B_0, N_0), (B_1, N_1), ...]`` with ``sum(B_i * N_i) == T``.
        backend: see :data:`BACKENDS`.

    Returns:
        ``(T, H, D)``; equal to running :func:`attention` on each group separately.
    """
    parts = nested_attention_parts(q, k, v, group_shapes, backend)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
