"""Teacher-target normalisation: softmax centering, center EMA and Sinkhorn-Knopp against float64 loops."""

from __future__ import annotations

import math

import pytest
import torch

from dinov2.loss import DINOLoss, iBOTPatchLoss, sinkhorn_knopp, softmax_center


def softmax_ref(rows, center, temp):
    """Row-wise softmax((z - c) / T) with Python floats."""
    out = []
    for row in rows:
        vals = [(z - c) / temp for z, c in zip(row, center)]
        top = max(vals)
        exps = [math.exp(v - top) for v in vals]
        total = sum(exps)
        out.append([e / total for e in exps])
    return torch.tensor(out, dtype=torch.float64)


def ema_ref(batches, momentum):
    """Center EMA towards the column means of each batch (list of lists of rows), Python floats."""
    n_dims = len(batches[0][0])
    center = [0.0] * n_dims
    for rows in batches:
        for k in range(n_dims):
            mean = sum(row[k] for row in rows) / len(rows)
            center[k] = momentum * center[k] + (1 - momentum) * mean
    return torch.tensor(center, dtype=torch.float64)


def sinkhorn_ref(logits, temp, n_iterations):
    """Sinkhorn-Knopp on Q[k][b] = exp(z[b][k] / T) with explicit loops, float64; returns (B, K)."""
    rows = logits.tolist()
    n_samples, n_protos = len(rows), len(rows[0])
    q = [[math.exp(rows[b][k] / temp) for b in range(n_samples)] for k in range(n_protos)]
    total = sum(sum(r) for r in q)
    q = [[v / total for v in r] for r in q]
    for _ in range(n_iterations):
        for k in range(n_protos):
            mass = sum(q[k])
            q[k] = [v / mass / n_protos for v in q[k]]
        for b in range(n_samples):
            mass = sum(q[k][b] for k in range(n_protos))
            for k in range(n_protos):
                q[k][b] = q[k][b] / mass / n_samples
    return torch.tensor([[q[k][b] * n_samples for k in range(n_protos)] for b in range(n_samples)], dtype=torch.float64)


def test_softmax_center_matches_loop_and_rows_sum_to_one():
    logits, center = torch.randn(5, 7), torch.randn(1, 7)
    out = softmax_center(logits, center, 0.07)
    assert out.dtype == torch.float32 and out.shape == logits.shape
    torch.testing.assert_close(out.sum(-1), torch.ones(5))
    expected = softmax_ref(logits.tolist(), center[0].tolist(), 0.07)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_softmax_center_half_input_gives_float32():
    logits = torch.randn(4, 6).to(torch.bfloat16)
    out = softmax_center(logits, torch.zeros(1, 6), 0.1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.softmax(logits.float() / 0.1, dim=-1))


def test_dino_center_ema_matches_loop_and_is_used_by_the_teacher_softmax():
    loss = DINOLoss(6, center_momentum=0.8)
    batches = [torch.randn(4, 6) * 3 + i for i in range(4)]
    for batch in batches:
        loss.update_center(batch)
    expected = ema_ref([b.tolist() for b in batches], 0.8)
    probe = torch.randn(3, 6)
    out = loss.softmax_center_teacher(probe, 0.05)  # applies the pending (last) update first
    torch.testing.assert_close(loss.center[0].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), softmax_ref(probe.tolist(), expected.tolist(), 0.05), rtol=1e-4, atol=1e-6)


def test_center_update_is_deferred_until_next_use():
    loss = DINOLoss(3, center_momentum=0.5)
    loss.update_center(torch.full((2, 3), 4.0))
    torch.testing.assert_close(loss.center, torch.zeros(1, 3))  # still pending
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, torch.full((1, 3), 2.0))
    loss.apply_center_update()  # idempotent: nothing pending any more
    torch.testing.assert_close(loss.center, torch.full((1, 3), 2.0))


@pytest.mark.parametrize("shape", ["flat", "batched"])
def test_ibot_center_ema_is_the_masked_token_mean(shape):
    loss = iBOTPatchLoss(5, center_momentum=0.7)
    batches = [torch.randn(n, 5) + n for n in (3, 8, 1)]
    for batch in batches:
        loss.update_center(batch if shape == "flat" else batch.unsqueeze(0))
    loss.apply_center_update()
    assert loss.center.shape == (1, 1, 5)
    expected = ema_ref([b.tolist() for b in batches], 0.7)
    torch.testing.assert_close(loss.center.reshape(-1).double(), expected, rtol=1e-5, atol=1e-6)


def test_ibot_softmax_center_keeps_the_input_shape():
    loss = iBOTPatchLoss(4)
    loss.center.fill_(0.3)
    tokens = torch.randn(9, 4)
    out = loss.softmax_center_teacher(tokens, 0.1)
    assert out.shape == (9, 4)
    torch.testing.assert_close(out.double(), softmax_ref(tokens.tolist(), [0.3] * 4, 0.1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_iterations", [0, 1, 3])
def test_sinkhorn_matches_loop_reference(n_iterations):
    logits = torch.randn(6, 5)
    out = sinkhorn_knopp(logits, 0.1, n_iterations=n_iterations)
    assert out.shape == (6, 5) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), sinkhorn_ref(logits, 0.1, n_iterations), rtol=1e-5, atol=1e-7)


def test_sinkhorn_does_not_overflow_on_large_logits():
    # exp(20 / 0.04) = exp(500) overflows float32; the per-prototype max shift must make it exact anyway.
    logits = torch.randn(8, 4) * 0.5 + 20
    logits[:, 2] -= 8  # a dead prototype: exp(-200) would zero its whole row after a single global shift
    out = sinkhorn_knopp(logits, 0.04, n_iterations=3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), sinkhorn_ref(logits, 0.04, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_converges_to_uniform_prototype_marginals():
    logits = torch.randn(12, 4)
    q = sinkhorn_knopp(logits, 0.5, n_iterations=50)
    n_samples, n_protos = q.shape
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n_samples))
    torch.testing.assert_close(q.sum(dim=0) / n_samples, torch.full((n_protos,), 1 / n_protos), rtol=1e-4, atol=1e-5)
    # three iterations are not converged yet: the test above is not vacuous
    q3 = sinkhorn_knopp(logits, 0.5, n_iterations=1)
    assert (q3.sum(dim=0) / n_samples - 1 / n_protos).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sinkhorn_low_precision_input_gives_float32(dtype):
    logits = torch.randn(6, 5).to(dtype)
    out = sinkhorn_knopp(logits, 0.1, n_iterations=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), sinkhorn_ref(logits.double(), 0.1, 3), rtol=1e-5, atol=1e-7)


def test_sinkhorn_n_samples_accepts_int_and_tensor():
    logits = torch.randn(5, 3)
    ref = sinkhorn_ref(logits, 0.2, 3)
    for n_samples in (5, torch.tensor([5]), torch.tensor(5.0)):
        out = sinkhorn_knopp(logits, 0.2, 3, n_samples=n_samples)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)


def test_dino_sinkhorn_teacher_delegates():
    logits = torch.randn(7, 6)
    out = DINOLoss(6).sinkhorn_knopp_teacher(logits, 0.07, n_iterations=4)
    torch.testing.assert_close(out.double(), sinkhorn_ref(logits, 0.07, 4), rtol=1e-5, atol=1e-7)
