"""Soft-target cross-entropy over many classes, chunked over rows, with no fp32 (rows x K) tensor kept for backward.

For student logits ``s`` and teacher weights ``t`` (rows of K prototypes, usually probabilities) and
``z = s / T``, :func:`soft_cross_entropy` returns, per row::

    CE(t, s) = - sum_k t_k log_softmax(z)_k = (sum_k t_k) * logsumexp(z) - t . z

The factor ``sum_k t_k`` makes the formula exact for teacher rows that do not sum to 1 (e.g. the sum of
several teacher crops' targets). The gradient with respect to ``s`` is::

    d CE / d s = ((sum_k t_k) * softmax(z) - t) / T

Memory. The plain ``log_softmax(s.float() / T)`` path materialises several fp32 (rows x K) tensors and
autograd keeps the fp32 log-softmax alive until backward. Here rows are processed in chunks of
``chunk_rows`` rows (by default about :data:`DEFAULT_CHUNK_BYTES` of fp32 per chunk), each chunk is
converted to the compute dtype, reduced to one value per row and dropped. Saved for backward are
only the two inputs, in their own dtype and storage (bf16 logits stay bf16), and the per-row
``logsumexp(z)`` (rows values in the compute dtype). Backward recomputes ``softmax(z)`` per chunk
from the saved logits and the saved logsumexp and writes the gradient chunk by chunk into a tensor
of the logits' dtype. The teacher is a target: it gets no gradient.

Numerics. The compute dtype is float32, or float64 for float64 logits. Each chunk subtracts its
row maximum ``m`` first: with ``z' = z - m <= 0``, ``CE = (sum_k t_k) * logsumexp(z') + t . (-z')``;
for non-negative ``t`` both terms are non-negative, so the subtraction of two large numbers is
avoided. Autocast is switched off inside the op (there is no matmul to benefit from it).
"""

from __future__ import annotations

import contextlib

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_BYTES = 128 * 2**20
"""Default chunk size: rows per chunk are chosen so that one (chunk_rows x K) fp32 buffer is about this big."""


def default_chunk_rows(n_classes: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk such that a (rows x ``n_classes``) float32 buffer takes about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * max(n_classes, 1)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _scaled(s: torch.Tensor, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """A fresh ``s / temperature`` in ``dtype`` (one allocation, then in place)."""
    return s.to(dtype, copy=True).div_(temperature)


def _forward_chunk(s: torch.Tensor, t: torch.Tensor, temperature: float, dtype: torch.dtype):
    """Per-row cross-entropy and ``logsumexp(s / T)`` of one chunk of rows."""
    z = _scaled(s, temperature, dtype)
    top = z.amax(dim=-1, keepdim=True)
    z.sub_(top)  # z' = z - max <= 0
    lse_shifted = torch.logsumexp(z, dim=-1)
    t_sum = t.sum(dim=-1, dtype=dtype)
    neg_dot = z.mul_(t).sum(dim=-1).neg_()  # t . (-z')
    return t_sum * lse_shifted + neg_dot, lse_shifted + top.squeeze(-1)


def _backward_chunk(s, t, lse, grad_rows, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    """``grad_rows * ((sum_k t_k) softmax(s / T) - t) / T`` for one chunk of rows, in ``dtype``."""
    g = _scaled(s, temperature, dtype).sub_(lse.unsqueeze(-1)).exp_()  # softmax(z)
    g.mul_(t.sum(dim=-1, dtype=dtype, keepdim=True)).sub_(t)
    return g.mul_((grad_rows.to(dtype) / temperature).unsqueeze(-1))


class _SoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student_logits, teacher_probs, temperature, chunk_rows):
        n_classes = student_logits.shape[-1]
        s = student_logits.reshape(-1, n_classes)
        t = teacher_probs.reshape(-1, n_classes)
        dtype = _compute_dtype(student_logits.dtype)
        loss = torch.empty(s.shape[0], dtype=dtype, device=s.device)
        lse = torch.empty_like(loss)
        with _no_autocast(s.device):
            for start in range(0, s.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                loss[rows], lse[rows] = _forward_chunk(s[rows], t[rows], temperature, dtype)
        ctx.save_for_backward(student_logits, teacher_probs, lse)
        ctx.temperature, ctx.chunk_rows = temperature, chunk_rows
        return loss.reshape(student_logits.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        student_logits, teacher_probs, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        n_classes = student_logits.shape[-1]
        s = student_logits.reshape(-1, n_classes)
        t = teacher_probs.reshape(-1, n_classes)
        grad_rows = grad_out.reshape(-1)
        grad = torch.empty(s.shape, dtype=s.dtype, device=s.device)
        step = ctx.chunk_rows
        with _no_autocast(s.device):
            for start in range(0, s.shape[0], step):
                rows = slice(start, start + step)
                grad[rows] = _backward_chunk(s[rows], t[rows], lse[rows], grad_rows[rows], ctx.temperature, lse.dtype)
        return grad.reshape(student_logits.shape), None, None, None


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_probs: torch.Tensor,
    temperature: float,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Per-row ``-sum_k t_k log_softmax(s / T)_k`` (a positive cross-entropy), chunked over rows.

    ``student_logits`` and ``teacher_probs`` have the same shape ``(..., K)`` and any floating dtypes;
    the result has shape ``(...)`` and dtype float32 (float64 for float64 logits). Teacher rows need
    not sum to 1 (the formula scales the log-partition term by the row sum). Only ``student_logits``
    gets a gradient; ``teacher_probs`` is a target and must not require one. ``chunk_rows``: rows per
    chunk (default :func:`default_chunk_rows`). See the module docstring for memory and numerics.
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"shapes differ: student {tuple(student_logits.shape)}, teacher {tuple(teacher_probs.shape)}")
    if student_logits.dim() == 0:
        raise ValueError("expected at least one dimension (the K classes)")
    if teacher_probs.requires_grad and torch.is_grad_enabled():
        raise ValueError("teacher_probs is a target and gets no gradient: pass teacher_probs.detach()")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(student_logits.shape[-1])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _SoftCrossEntropy.apply(student_logits, teacher_probs, float(temperature), int(chunk_rows))
