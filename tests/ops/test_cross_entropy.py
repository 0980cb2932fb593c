"""Chunked soft-target cross-entropy against float64 ``torch.log_softmax`` references."""

from __future__ import annotations

import pytest
import torch

from dinov2.loss import DINOLoss, iBOTPatchLoss
from dinov2.ops.cross_entropy import default_chunk_rows, soft_cross_entropy

# The CUDA cases carry the gpu marker: scripts/device/gpu_checks.py selects the GPU tests by it, and
# tests/conftest.py skips them where there is no CUDA device.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def ce_ref(student, teacher, temp):
    """-sum_k t_k log_softmax(s / T)_k in float64 (differentiable in ``student``)."""
    return -(teacher.double() * torch.log_softmax(student.double() / temp, dim=-1)).sum(dim=-1)


def teacher_rows(*shape, mass=1.0, dtype=torch.float32, device="cpu"):
    """Random non-negative rows summing to ``mass`` (e.g. 2 = the sum of two teacher crops' targets)."""
    return (torch.softmax(torch.randn(*shape, device=device) * 2, dim=-1) * mass).to(dtype)


def ref_grad(student, teacher, temp, weights):
    s64 = student.detach().double().requires_grad_()
    (ce_ref(s64, teacher, temp) * weights.double()).sum().backward()
    return s64.grad


SHAPES = [(5, 7), (1, 1), (64, 33), (3, 4, 9), (2, 3, 5, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mass", [1.0, 2.0])
@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 4, 1000])
def test_float32_value_and_gradient_match_float64_reference(device, shape, mass, chunk_rows):
    student = (torch.randn(*shape, device=device) * 3).requires_grad_()
    teacher = teacher_rows(*shape, mass=mass, device=device)
    out = soft_cross_entropy(student, teacher, 0.1, chunk_rows=chunk_rows)
    assert out.shape == shape[:-1] and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ce_ref(student.detach(), teacher, 0.1), rtol=1e-5, atol=1e-5)

    weights = torch.randn(shape[:-1], device=device)  # a non-uniform upstream gradient
    (out * weights).sum().backward()
    assert student.grad.dtype == torch.float32
    torch.testing.assert_close(student.grad.double(), ref_grad(student, teacher, 0.1, weights), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_low_precision_logits(device, dtype, teacher_dtype):
    student = (torch.randn(37, 50, device=device) * 0.5).to(dtype).requires_grad_()
    teacher = teacher_rows(37, 50, mass=2.0, dtype=teacher_dtype, device=device)
    out = soft_cross_entropy(student, teacher, 0.1, chunk_rows=8)
    assert out.dtype == torch.float32
    # the inputs are exactly representable in float64: only the float32 maths differs from the reference
    torch.testing.assert_close(out.double(), ce_ref(student.detach(), teacher, 0.1), rtol=1e-5, atol=1e-5)
    weights = torch.rand(37, device=device)
    (out * weights).sum().backward()
    assert student.grad.dtype == dtype
    expected = ref_grad(student, teacher, 0.1, weights)
    torch.testing.assert_close(student.grad.double(), expected, rtol=1.6e-2, atol=2e-3 * expected.abs().max().item())


def test_gradcheck_float64():
    student = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    teacher = teacher_rows(3, 2, 5, mass=1.5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: soft_cross_entropy(s, teacher, 0.3, chunk_rows=4), (student,))
    out = soft_cross_entropy(student, teacher, 0.3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ce_ref(student.detach(), teacher, 0.3), rtol=1e-12, atol=1e-12)


def test_large_logits_stay_finite_and_exact():
    student = (torch.randn(6, 40) * 50).requires_grad_()  # z up to ~1e3 / 0.04: exp overflows without a shift
    teacher = teacher_rows(6, 40, mass=2.0)
    out = soft_cross_entropy(student, teacher, 0.04, chunk_rows=4)
    torch.testing.assert_close(out.double(), ce_ref(student.detach(), teacher, 0.04), rtol=1e-5, atol=1e-3)
    out.sum().backward()
    assert torch.isfinite(student.grad).all()
    torch.testing.assert_close(
        student.grad.double(), ref_grad(student, teacher, 0.04, torch.ones(6)), rtol=1e-4, atol=1e-4
    )


def test_under_cpu_autocast_the_maths_stays_float32():
    head = torch.nn.Linear(16, 30)
    x, teacher = torch.randn(10, 16), teacher_rows(10, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head(x)
        assert logits.dtype == torch.bfloat16
        out = soft_cross_entropy(logits, teacher, 0.1, chunk_rows=3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ce_ref(logits.detach(), teacher, 0.1), rtol=1e-5, atol=1e-5)
    out.mean().backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()


def test_teacher_is_a_target():
    student = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(ValueError, match="target"):
        soft_cross_entropy(student, teacher_rows(4, 6).requires_grad_(), 0.1)
    with pytest.raises(ValueError, match="shapes differ"):
        soft_cross_entropy(student, teacher_rows(4, 5), 0.1)
    with pytest.raises(ValueError, match="chunk_rows"):
        soft_cross_entropy(student, teacher_rows(4, 6), 0.1, chunk_rows=0)
    with pytest.raises(ValueError, match="at least one dimension"):  # a scalar has no class axis
        soft_cross_entropy(torch.tensor(1.0), torch.tensor(1.0), 0.1)
    with torch.no_grad():  # a teacher requiring grad is fine where no graph is built
        soft_cross_entropy(student, teacher_rows(4, 6).requires_grad_(), 0.1)


def test_default_chunk_rows():
    assert default_chunk_rows(65536) == 512  # 512 x 65536 x 4 bytes = 128 MiB
    assert default_chunk_rows(131072) == 256
    assert default_chunk_rows(10**12) == 1


# ----------------------------------------------------------------------------- memory saved for backward


def saved_tensors(fn):
    """Run ``fn`` and return the distinct tensors autograd saves for backward (one per storage)."""
    saved = {}

    def pack(tensor):
        saved.setdefault(tensor.untyped_storage().data_ptr(), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return list(saved.values())


def nbytes(tensors):
    return sum(t.untyped_storage().nbytes() for t in tensors)


def reference_path(student, teacher, temp):
    """The previous implementation: float32 log-softmax, kept by autograd until backward."""
    lsm = torch.log_softmax(student.float() / temp, dim=-1)
    return -(teacher.float() * lsm).sum(dim=-1)


@pytest.mark.parametrize("teacher_dtype", [torch.float32, torch.bfloat16])
def test_saves_no_float32_rows_by_k_tensor(teacher_dtype):
    rows, k = 256, 65536
    student = torch.randn(rows, k).to(torch.bfloat16).requires_grad_()
    teacher = teacher_rows(rows, k, dtype=teacher_dtype)
    new = saved_tensors(lambda: soft_cross_entropy(student, teacher, 0.1).mean())
    old = saved_tensors(lambda: reference_path(student, teacher, 0.1).mean())

    big_fp32 = [t for t in new if t.dtype == torch.float32 and t.numel() >= rows * k]
    inputs = {student.untyped_storage().data_ptr(), teacher.untyped_storage().data_ptr()}
    assert all(t.untyped_storage().data_ptr() in inputs for t in big_fp32)  # at most the fp32 teacher itself
    assert nbytes(new) <= student.nbytes + teacher.nbytes + 4 * rows  # inputs + per-row logsumexp
    assert any(t.dtype == torch.float32 and t.numel() == rows * k and t.data_ptr() not in inputs for t in old)
    assert nbytes(new) < nbytes(old)
    # the fp32 log-softmax (4 bytes x rows x K) is gone; the bf16 logits and the logsumexp are kept instead
    assert nbytes(old) - nbytes(new) >= 4 * rows * k - student.nbytes - 4 * rows


# ----------------------------------------------------------------------------- the losses use it


def test_dino_and_ibot_gradients_match_float64_formula():
    students = [torch.randn(5, 12).to(torch.bfloat16).requires_grad_() for _ in range(3)]
    teachers = [teacher_rows(5, 12) for _ in range(2)]  # summed inside: rows sum to 2
    DINOLoss(12, student_temp=0.1)(students, teachers).backward()
    for s in students:
        s64 = s.detach().double().requires_grad_()
        sum(ce_ref(s64, t, 0.1).mean() for t in teachers).backward()
        assert s.grad.dtype == torch.bfloat16
        torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1.6e-2, atol=1e-4)

    masks = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    tokens = torch.randn(int(masks.sum()), 9, requires_grad=True)
    targets = teacher_rows(int(masks.sum()), 9)
    iBOTPatchLoss(9, student_temp=0.2).forward_masked(tokens, targets, masks).backward()
    t64 = tokens.detach().double().requires_grad_()
    per_token = torch.tensor([1 / 2, 1 / 2, 1 / 3, 1 / 3, 1 / 3], dtype=torch.float64)
    ((ce_ref(t64, targets, 0.2) * per_token).sum() / 3).backward()
    torch.testing.assert_close(tokens.grad.double(), t64.grad, rtol=1e-4, atol=1e-7)
