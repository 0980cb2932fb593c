"""DINO, iBOT and KoLeo losses against float64 reference loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss


def log_softmax_ref(row, temp):
    vals = [v / temp for v in row]
    top = max(vals)
    lse = top + math.log(sum(math.exp(v - top) for v in vals))
    return [v - lse for v in vals]


def cross_entropy_ref(student_row, teacher_row, temp):
    """sum_k t_k log_softmax(s / T)_k with Python floats."""
    return sum(t * ls for t, ls in zip(teacher_row, log_softmax_ref(student_row, temp)))


def probs(*shape):
    return torch.softmax(torch.randn(*shape), dim=-1)


# ----------------------------------------------------------------------------- DINO


def dino_ref(students, teachers, temp):
    total = 0.0
    for s in students:
        for t in teachers:
            rows = list(zip(s.tolist(), t.tolist()))
            total -= sum(cross_entropy_ref(sr, tr, temp) for sr, tr in rows) / len(rows)
    return total


def test_dino_loss_matches_loop_over_crop_pairs():
    students = [torch.randn(4, 7) for _ in range(3)]
    teachers = [probs(4, 7) for _ in range(2)]
    loss = DINOLoss(7, student_temp=0.1)(students, teachers)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(dino_ref(students, teachers, 0.1), rel=1e-5)


def test_dino_loss_is_a_sum_over_pairs_not_a_mean():
    students = [torch.randn(3, 5) for _ in range(2)]
    teachers = [probs(3, 5) for _ in range(3)]
    module = DINOLoss(5, student_temp=0.2)
    pairs = [module([s], [t]).item() for s in students for t in teachers]
    assert len(pairs) == 6
    assert module(students, teachers).item() == pytest.approx(sum(pairs), rel=1e-5)
    assert pairs[0] == pytest.approx(dino_ref(students[:1], teachers[:1], 0.2), rel=1e-5)


def test_dino_loss_gradient_flows_to_students_only():
    student = torch.randn(3, 5, requires_grad=True)
    teacher = probs(3, 5)
    DINOLoss(5)([student], [teacher]).backward()
    # d/ds of -mean_b sum_k t log_softmax(s/T) = (softmax(s/T) - t) / (T * B)
    expected = (torch.softmax(student.detach() / 0.1, -1) - teacher) / (0.1 * 3)
    torch.testing.assert_close(student.grad, expected, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- iBOT

MASK_COUNTS = [3, 0, 1, 6]  # images with different numbers of masked patches, one with none


def make_masks(n_tokens=6):
    masks = torch.zeros(len(MASK_COUNTS), n_tokens, dtype=torch.bool)
    for b, count in enumerate(MASK_COUNTS):
        masks[b, torch.randperm(n_tokens)[:count]] = True
    return masks


def ibot_ref(student, teacher, masks, temp):
    """-(1 / n_images) sum_b (1 / max(n_b, 1)) sum_{masked p} CE(s[b, p], t[b, p])."""
    total = 0.0
    for b in range(masks.shape[0]):
        masked = [p for p in range(masks.shape[1]) if masks[b, p]]
        image = sum(cross_entropy_ref(student[b, p].tolist(), teacher[b, p].tolist(), temp) for p in masked)
        total += image / max(len(masked), 1)
    return -total / masks.shape[0]


def test_ibot_forward_matches_loop():
    masks = make_masks()
    student, teacher = torch.randn(4, 6, 5), probs(4, 6, 5)
    loss = iBOTPatchLoss(5, student_temp=0.1)(student, teacher, masks)
    assert loss.item() == pytest.approx(ibot_ref(student, teacher, masks, 0.1), rel=1e-5)


@pytest.mark.parametrize("n_masked_form", ["none", "int", "tensor"])
def test_ibot_forward_masked_matches_loop_and_ignores_padding(n_masked_form):
    masks = make_masks()
    student, teacher = torch.randn(4, 6, 5), probs(4, 6, 5)
    s_masked, t_masked = student[masks], teacher[masks]
    n_masked = s_masked.shape[0]
    assert n_masked == sum(MASK_COUNTS)
    if n_masked_form != "none":  # padded rows with large values must not leak into the loss
        s_masked = torch.cat([s_masked, torch.randn(3, 5) * 50])
        t_masked = torch.cat([t_masked, probs(3, 5)])
    n_arg = {"none": None, "int": n_masked, "tensor": torch.tensor([n_masked])}[n_masked_form]
    loss = iBOTPatchLoss(5).forward_masked(s_masked, t_masked, masks, n_masked_patches=n_arg)
    expected = ibot_ref(student, teacher, masks, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    full = iBOTPatchLoss(5)(student, teacher, masks)
    assert loss.item() == pytest.approx(full.item(), rel=1e-6)


def test_ibot_forward_masked_with_explicit_weights():
    masks = make_masks()
    student, teacher = torch.randn(4, 6, 5), probs(4, 6, 5)
    weights = torch.rand(int(masks.sum()))
    loss = iBOTPatchLoss(5, student_temp=0.2).forward_masked(
        student[masks], teacher[masks], masks, masks_weight=weights
    )
    ces = [cross_entropy_ref(s, t, 0.2) for s, t in zip(student[masks].tolist(), teacher[masks].tolist())]
    expected = -sum(w * ce for w, ce in zip(weights.tolist(), ces)) / masks.shape[0]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_ibot_sinkhorn_single_process_without_process_group():
    assert not dist.is_initialized()
    logits = torch.randn(9, 6)
    n_masked = torch.tensor([9])
    expected = sinkhorn_ref(logits, 0.07, 3)
    loss = iBOTPatchLoss(6)
    for n_arg in (n_masked, 9):
        out = loss.sinkhorn_knopp_teacher(logits, 0.07, n_arg, n_iterations=3)
        assert out.dtype == torch.float32 and out.shape == (9, 6)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-7)
    assert n_masked.tolist() == [9]  # the caller's count is left untouched
    # B = n_masked_patches_tensor: each row sums to 1 and the prototype masses sum to B
    assert out.sum().item() == pytest.approx(9.0, rel=1e-5)


def sinkhorn_ref(logits, temp, n_iterations):
    """Sinkhorn-Knopp with float64 tensors and explicit loops over prototypes and samples."""
    q = torch.exp(logits.double() / temp).t().clone()
    q /= q.sum()
    n_protos, n_samples = q.shape
    for _ in range(n_iterations):
        for k in range(n_protos):
            q[k] /= q[k].sum() * n_protos
        for b in range(n_samples):
            q[:, b] /= q[:, b].sum() * n_samples
    return (q * n_samples).t()


# ----------------------------------------------------------------------------- KoLeo


def koleo_ref(features, eps=1e-8):
    """Brute-force nearest other row on L2-normalised float64 rows; the distance is the original's
    ``torch.nn.PairwiseDistance(eps=eps)``, ``||x_i - x_j + eps||`` (``eps sqrt(D)`` for a duplicate)."""
    rows = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in features.double().tolist()]
    total = 0.0
    for i, ri in enumerate(rows):
        j = min((j for j in range(len(rows)) if j != i), key=lambda j: math.dist(ri, rows[j]))
        total -= math.log(math.sqrt(sum((a - b + eps) ** 2 for a, b in zip(ri, rows[j]))) + eps)
    return total / len(rows)


def koleo_autograd_ref(features, eps=1e-8):
    """The same loss in float64 torch ops (neighbour found by a Python loop) for reference gradients."""
    x = torch.nn.functional.normalize(features, dim=-1)
    terms = []
    for i in range(x.shape[0]):
        others = [j for j in range(x.shape[0]) if j != i]
        j = min(others, key=lambda j: (x[i] - x[j]).norm().item())
        terms.append(-torch.log((x[i] - x[j] + eps).norm() + eps))
    return torch.stack(terms).mean()


def test_koleo_matches_brute_force_loop():
    features = torch.randn(10, 8)
    loss = KoLeoLoss()(features)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(koleo_ref(features), rel=1e-5)


def test_koleo_gradient_matches_float64_reference():
    features = torch.randn(7, 5, dtype=torch.float64)
    x32 = features.float().requires_grad_()
    KoLeoLoss()(x32).backward()
    x64 = features.clone().requires_grad_()
    koleo_autograd_ref(x64).backward()
    torch.testing.assert_close(x32.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_koleo_duplicates_stay_finite(dtype):
    base = torch.randn(5, 8)
    features = torch.cat([base, base[:2], base[:1]]).to(dtype).requires_grad_()  # rows 0 and 1 duplicated
    loss = KoLeoLoss()(features)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(koleo_ref(features.detach().float()), rel=1e-4)
    loss.backward()
    assert torch.isfinite(features.grad).all()
    # rows whose neighbour is an exact copy have the original's d = eps sqrt(D): -log(eps (sqrt(8) + 1)) each
    assert loss.item() > 3 * -math.log(1e-8 * (math.sqrt(8) + 1)) / 8
    # ... and no gradient through that distance (the original's is ~1/eps): gradients stay O(1)
    assert features.grad.abs().max() < 10


def test_koleo_single_row_is_finite():
    features = torch.randn(1, 4, requires_grad=True)
    loss = KoLeoLoss()(features)
    assert loss.item() == pytest.approx(-math.log(1e-8 * (math.sqrt(4) + 1)), rel=1e-6)
    loss.backward()
    assert torch.isfinite(features.grad).all()


def test_koleo_nearly_coincident_features_use_the_originals_distance():
    """At the recipe's start (LayerScale 1e-5) the CLS features nearly coincide; there the eps inside
    the original's ``||x_i - x_j + eps||`` changes the gradient measurably (it used to use ``||x_i - x_j||``,
    and to compute in float32 whatever the input)."""
    features = torch.randn(1, 64, dtype=torch.float64) + 1e-3 * torch.randn(6, 64, dtype=torch.float64)
    ours = features.clone().requires_grad_()
    loss = KoLeoLoss()(ours)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(koleo_ref(features), rel=1e-12)
    loss.backward()
    ref = features.clone().requires_grad_()
    koleo_autograd_ref(ref).backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-9, atol=1e-9 * ref.grad.abs().max().item())
