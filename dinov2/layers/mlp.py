"""Feed-forward layers: the classic GELU MLP and SwiGLU (as in ViT-g/14)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dinov2.ops.swiglu import swiglu


class Mlp(nn.Module):
    """``fc1 -> act -> drop -> fc2 -> drop``; hidden width defaults to the input width."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def swiglu_hidden_features(hidden_features: int) -> int:
    """SwiGLU keeps the parameter count of a GELU MLP of width ``hidden_features``: 2/3 of it,
    rounded up to a multiple of 8 (ViT-g/14: 4 * 1536 -> 4096)."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """``w3(silu(x W1) * (x W2))`` with ``W1`` and ``W2`` stored as one ``w12`` projection.

    The key names ``w12`` / ``w3`` and the hidden width rule match the published ViT-g/14
    checkpoints. ``hidden_features`` is the nominal MLP width (``mlp_ratio * dim``); the actual
    width is :func:`swiglu_hidden_features` of it.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden = swiglu_hidden_features(hidden_features or in_features)
        self.hidden_features = hidden
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, out_features, bias=bias)

    fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w12.weight, self.w12.bias, self.w3.weight, self.w3.bias, fused=self.fused)


class SwiGLUFFNFused(SwiGLUFFN):
    """``ffn_layer: swiglufused``: the same parameters and state-dict keys as :class:`SwiGLUFFN`,
    computed by xFormers' fused SwiGLU on CUDA when installed, else by the native path that saves
    a third less activation memory (:mod:`dinov2.ops.swiglu`)."""

    fused = True
