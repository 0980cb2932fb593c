"""Multi-head self-attention with a fused ``qkv`` projection (published key names)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dinov2.ops.attention import attention, nested_attention_parts, resolve_backend


class Attention(nn.Module):
    """Self-attention over ``(B, N, C)`` tokens, or over concatenated token groups.

    The kernel is chosen by ``backend`` (``math`` | ``sdpa`` | ``xformers`` | ``auto``, see
    :mod:`dinov2.ops.attention`); it can be changed after construction by assigning
    ``module.backend``. Parameters and state-dict keys do not depend on the backend.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        if attn_drop:
            raise ValueError("Attention: attn_drop > 0 is not supported (DINOv2 never uses attention dropout)")
        resolve_backend(backend, torch.device("cpu"))  # validate the name early
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.backend = backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).unbind(2)
        out = attention(q, k, v, backend=self.backend).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(out))

    def forward_nested(self, x: torch.Tensor, group_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        """``x``: ``(T, C)`` tokens of several groups of sequences, see :func:`nested_attention`."""
        total, channels = x.shape
        q, k, v = self.qkv(x).reshape(total, 3, self.num_heads, self.head_dim).unbind(1)
        parts = nested_attention_parts(q, k, v, group_shapes, backend=self.backend)
        # Project each part, then join: a Linear keeps its input, not its output, so joining after
        # the projection keeps nothing extra alive for backward (joining before would).
        out = [self.proj(part.reshape(-1, channels)) for part in parts]
        return self.proj_drop(out[0] if len(out) == 1 else torch.cat(out, dim=0))


# The original code base has a separate xFormers class; here the backend is a setting.
MemEffAttention = Attention
