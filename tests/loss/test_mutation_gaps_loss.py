"""Behaviour of the centre EMA and the loss defaults that a mutation audit found unpinned.

Golden values come from plain Python loops written here, not from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from dinov2.loss import DINOLoss, iBOTPatchLoss


def column_means(rows: list[list[float]]) -> list[float]:
    return [sum(row[k] for row in rows) / len(rows) for k in range(len(rows[0]))]


def ema(center: list[float], mean: list[float], momentum: float) -> list[float]:
    return [momentum * c + (1 - momentum) * m for c, m in zip(center, mean)]


def softmax_rows(rows: list[list[float]], center: list[float], temp: float) -> torch.Tensor:
    out = []
    for row in rows:
        vals = [(z - c) / temp for z, c in zip(row, center)]
        top = max(vals)
        exps = [math.exp(v - top) for v in vals]
        out.append([e / sum(exps) for e in exps])
    return torch.tensor(out, dtype=torch.float64)


def cross_entropy(student_row: list[float], teacher_row: list[float], temp: float) -> float:
    """-sum_k t_k log_softmax(s / T)_k."""
    vals = [v / temp for v in student_row]
    top = max(vals)
    lse = top + math.log(sum(math.exp(v - top) for v in vals))
    return -sum(t * (v - lse) for t, v in zip(teacher_row, vals))


@pytest.mark.parametrize("loss_cls", [DINOLoss, iBOTPatchLoss])
def test_an_empty_batch_leaves_the_center_unchanged(loss_cls):
    """No row anywhere (iBOT: a batch without masked tokens): the centre keeps its value, it does not
    decay by the momentum towards a zero mean."""
    loss = loss_cls(4, center_momentum=0.5)
    first = torch.tensor([[2.0, -4.0, 6.0, 1.0]])
    loss.update_center(first)
    loss.apply_center_update()
    expected = ema([0.0] * 4, first[0].tolist(), 0.5)
    torch.testing.assert_close(loss.center.reshape(-1).double(), torch.tensor(expected, dtype=torch.float64))

    loss.update_center(torch.empty(0, 4))
    loss.apply_center_update()
    torch.testing.assert_close(loss.center.reshape(-1).double(), torch.tensor(expected, dtype=torch.float64))

    # an empty micro-batch accumulated with a non-empty one counts for nothing in the mean
    rows = torch.randn(3, 4)
    loss.update_center(torch.empty(0, 4))
    loss.update_center(rows, accumulate=True)
    loss.apply_center_update()
    expected = ema(expected, column_means(rows.tolist()), 0.5)
    torch.testing.assert_close(
        loss.center.reshape(-1).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6
    )


def test_accumulated_micro_batches_make_one_ema_step_over_all_their_rows():
    """Gradient accumulation: the micro-batches of one optimiser step keep the step's centre for their
    targets, then update it once, towards the mean of all their rows (unequal counts, as iBOT's masked
    tokens), exactly as one batch holding all of them would."""
    momentum, temp = 0.8, 0.06
    loss = iBOTPatchLoss(5, center_momentum=momentum)
    start = torch.randn(6, 5) + 2
    loss.update_center(start)
    loss.apply_center_update()
    c0 = ema([0.0] * 5, column_means(start.tolist()), momentum)

    micro = [torch.randn(n, 5) * 2 + i for i, n in enumerate((3, 7, 2))]
    probe = torch.randn(4, 5)
    for i, rows in enumerate(micro):
        targets = loss.softmax_center_teacher(probe, temp, accumulate=i > 0)
        torch.testing.assert_close(targets.double(), softmax_rows(probe.tolist(), c0, temp), rtol=1e-5, atol=1e-7)
        loss.update_center(rows, accumulate=i > 0)
    torch.testing.assert_close(loss.center.reshape(-1).double(), torch.tensor(c0, dtype=torch.float64))  # pending

    all_rows = [row for rows in micro for row in rows.tolist()]
    expected = ema(c0, column_means(all_rows), momentum)
    # the next step's first use applies the one pending update
    targets = loss.softmax_center_teacher(probe, temp)
    torch.testing.assert_close(
        loss.center.reshape(-1).double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(targets.double(), softmax_rows(probe.tolist(), expected, temp), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("loss_cls", [DINOLoss, iBOTPatchLoss])
def test_default_center_momentum_is_the_recipes_0_9(loss_cls):
    """SSLMetaArch builds both losses with their defaults, so the defaults are the recipe's: the centre
    moves 10% of the way to the batch mean per step (DINO/iBOT: center momentum 0.9)."""
    loss = loss_cls(3)
    batches = [torch.randn(5, 3) + 4 for _ in range(3)]
    center = [0.0] * 3
    for rows in batches:
        loss.update_center(rows)
        center = ema(center, column_means(rows.tolist()), 0.9)
    loss.apply_center_update()
    torch.testing.assert_close(
        loss.center.reshape(-1).double(), torch.tensor(center, dtype=torch.float64), rtol=1e-5, atol=1e-6
    )


def test_default_student_temperature_is_the_recipes_0_1():
    """Both losses sharpen the student with T_s = 0.1 unless told otherwise."""
    students, teacher = torch.randn(2, 3, 6), torch.softmax(torch.randn(2, 3, 6), dim=-1)
    dino = DINOLoss(6)([students[0]], [teacher[0]]).item()
    expected = sum(cross_entropy(s, t, 0.1) for s, t in zip(students[0].tolist(), teacher[0].tolist())) / 3
    assert dino == pytest.approx(expected, rel=1e-5)

    masks = torch.tensor([[True, False, True], [False, False, True]])
    ibot = iBOTPatchLoss(6)(students, teacher, masks).item()
    per_image = []
    for b in range(2):
        rows = [cross_entropy(students[b, p].tolist(), teacher[b, p].tolist(), 0.1) for p in range(3) if masks[b, p]]
        per_image.append(sum(rows) / len(rows))
    assert ibot == pytest.approx(sum(per_image) / 2, rel=1e-5)


def test_softmax_centering_of_large_logits_is_finite():
    # 1000 / 0.5 = 2000: exp overflows float32 (above ~88) unless the row maximum is subtracted first
    from dinov2.loss.centering import softmax_center

    logits = torch.tensor([[1000.0, 0.0, 999.5], [-500.0, -500.0, -500.0]])
    probs = softmax_center(logits, torch.zeros(1, 3), teacher_temp=0.5)
    e = math.exp(-0.5 / 0.5)  # the third logit is 0.5 below the first: weight e^-1 relative to it
    torch.testing.assert_close(probs[0], torch.tensor([1 / (1 + e), 0.0, e / (1 + e)]))
    torch.testing.assert_close(probs[1], torch.full((3,), 1 / 3))
