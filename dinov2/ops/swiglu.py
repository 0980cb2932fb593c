"""SwiGLU feed-forward: ``w3(silu(x W1 + b1) * (x W2 + b2)) + b3`` with ``W1``/``W2`` packed in ``w12``.

Two implementations behind :func:`swiglu`:

- ``xformers.ops.swiglu`` on CUDA when ``fused`` is asked for and xFormers' dispatcher would run a
  fused kernel (:func:`dinov2.ops.xformers.fused_swiglu_usable`; xFormers 0.0.35 never does: it
  dispatches to three plain matmuls, which would keep more for backward than the native path);
- the PyTorch-native path otherwise: one ``w12`` GEMM, then :func:`silu_mul`, an autograd function
  that keeps only its two inputs for backward and recomputes ``silu`` there. Plain autograd keeps
  three hidden-width tensors (``x1`` for SiLU's backward, ``silu(x1)`` and ``x2`` for the product);
  this keeps two, i.e. a third less activation memory in the SwiGLU hidden layer (ViT-g/14: 2 x 4096
  values per token instead of 3 x 4096).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinov2.ops.xformers import fused_swiglu_usable, xformers_ops


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, value)
        return F.silu(gate) * value

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, value = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (double backward, e.g. a gradient penalty): aten's silu_backward has no
            # derivative, so spell the gradient out in differentiable ops (float32 for low precision).
            return _silu_mul_grads_differentiable(grad_out, gate, value)
        # PyTorch's own SiLU backward (d silu / dg in float32 inside the kernel, rounded once), on the
        # product's gradient: the same values as autograd through F.silu(gate) * value, bit for bit.
        # Spelled out in bf16 (sigmoid * (1 + g * (1 - sigmoid))) each step would round, and the sum
        # cancels where the derivative crosses zero (g near -1.28).
        grad_gate = torch.ops.aten.silu_backward(grad_out * value, gate)
        return grad_gate, grad_out * F.silu(gate)


def _silu_mul_grads_differentiable(grad_out, gate, value) -> tuple[torch.Tensor, torch.Tensor]:
    """``(grad_out * value * silu'(gate), grad_out * silu(gate))`` with autograd-differentiable ops, where
    ``silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))``; computed in at least float32."""
    dtype = torch.promote_types(gate.dtype, torch.float32)
    g = gate.to(dtype)
    sig = torch.sigmoid(g)
    grad = grad_out.to(dtype)
    grad_gate = grad * value.to(dtype) * sig * (1 + g * (1 - sig))
    return grad_gate.to(gate.dtype), (grad * g * sig).to(value.dtype)


def silu_mul(gate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * value``, saving only ``gate`` and ``value`` for backward. Differentiable twice:
    under ``create_graph=True`` the backward uses plain differentiable ops (not the single SiLU kernel)."""
    return _SiluMul.apply(gate, value)


def swiglu(
    x: torch.Tensor,
    w12: torch.Tensor,
    b12: torch.Tensor | None,
    w3: torch.Tensor,
    b3: torch.Tensor | None,
    fused: bool = True,
) -> torch.Tensor:
    """SwiGLU over the last dimension of ``x``; ``w12`` is ``(2 * hidden, in)`` with ``W1`` on top."""
    if fused and x.is_cuda:
        autocast = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
        if fused_swiglu_usable(x.device.type, dtype, b12 is not None and b3 is not None):
            if autocast:  # the xFormers op takes one dtype for all operands
                x, w12, w3 = x.to(dtype), w12.to(dtype), w3.to(dtype)
                b12, b3 = (b.to(dtype) if b is not None else None for b in (b12, b3))
            w1, w2 = w12.chunk(2, dim=0)  # views of one tensor: xFormers' packed kernel applies
            b1, b2 = b12.chunk(2, dim=0) if b12 is not None else (None, None)
            return xformers_ops().swiglu(x, w1, b1, w2, b2, w3, b3)
    gate, value = F.linear(x, w12, b12).chunk(2, dim=-1)
    hidden = silu_mul(gate, value) if fused else F.silu(gate) * value
    return F.linear(hidden, w3, b3)
