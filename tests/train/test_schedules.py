"""Tests for dinov2.train.schedules: cosine schedules, config-built schedules, optimizer updates."""

from __future__ import annotations

import logging
import math
import re
from fractions import Fraction

import pytest
import torch
from omegaconf import OmegaConf

from dinov2.train.checks import resolve_stop_iteration
from dinov2.train.schedules import (
    CosineScheduler,
    apply_optim_scheduler,
    build_schedulers,
    epochs_to_iterations,
    scaled_lr,
    total_iterations,
)


def expected_cosine(base, final, n):
    return [final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / n)) for i in range(n)]


def test_cosine_start_middle_end():
    sched = CosineScheduler(1.0, 0.1, total_iters=10)
    expected = expected_cosine(1.0, 0.1, 10)
    assert len(sched) == 10
    assert sched[0] == pytest.approx(1.0)
    assert sched[5] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 2)))
    assert sched[5] == pytest.approx(0.55)
    assert sched[9] == pytest.approx(expected[9])
    for it in range(10):
        assert sched[it] == pytest.approx(expected[it])
    values = [sched[it] for it in range(10)]
    assert all(a > b for a, b in zip(values, values[1:]))


def test_cosine_increasing_schedule():
    sched = CosineScheduler(0.99, 1.0, total_iters=7)
    values = [sched[it] for it in range(7)]
    assert values[0] == pytest.approx(0.99)
    assert all(a < b for a, b in zip(values, values[1:]))
    assert sched[7] == 1.0


def test_warmup_is_linear_and_includes_endpoints():
    sched = CosineScheduler(2.0, 0.0, total_iters=15, warmup_iters=5, start_warmup_value=0.5)
    for i in range(5):
        assert sched[i] == pytest.approx(0.5 + i * (2.0 - 0.5) / 4)
    assert sched[4] == pytest.approx(2.0)
    cosine = expected_cosine(2.0, 0.0, 10)
    for i in range(10):
        assert sched[5 + i] == pytest.approx(cosine[i])


def test_freeze_zeros_then_warmup_then_cosine():
    sched = CosineScheduler(1.0, 0.2, total_iters=12, warmup_iters=3, start_warmup_value=0.1, freeze_iters=4)
    assert [sched[i] for i in range(4)] == [0.0] * 4
    assert [sched[4 + i] for i in range(3)] == pytest.approx([0.1, 0.55, 1.0])
    assert [sched[7 + i] for i in range(5)] == pytest.approx(expected_cosine(1.0, 0.2, 5))


def test_past_total_returns_final():
    sched = CosineScheduler(1.0, 0.25, total_iters=4)
    assert sched[4] == 0.25
    assert sched[1000] == 0.25
    assert CosineScheduler(1.0, 0.25, total_iters=0)[0] == 0.25


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(total_iters=5, warmup_iters=6),
        dict(total_iters=5, warmup_iters=3, freeze_iters=3),
        dict(total_iters=-1),
        dict(total_iters=5, warmup_iters=-1),
        dict(total_iters=5, freeze_iters=-2),
    ],
)
def test_bad_counts_raise(kwargs):
    with pytest.raises(ValueError):
        CosineScheduler(1.0, 0.0, **kwargs)


def make_cfg():
    return OmegaConf.create(
        {
            "train": {"OFFICIAL_EPOCH_LENGTH": 4},
            "optim": {
                "epochs": 5,
                "lr": 0.004,
                "min_lr": 1e-6,
                "warmup_epochs": 1,
                "weight_decay": 0.04,
                "weight_decay_end": 0.4,
                "freeze_last_layer_epochs": 2,
            },
            "teacher": {
                "momentum_teacher": 0.992,
                "final_momentum_teacher": 1.0,
                "teacher_temp": 0.07,
                "warmup_teacher_temp": 0.04,
                "warmup_teacher_temp_epochs": 2,
            },
        }
    )


def test_build_schedulers_lr_and_wd():
    lr, wd, _, _, _ = build_schedulers(make_cfg())
    assert len(lr) == 20 and len(wd) == 20
    assert [lr[i] for i in range(4)] == pytest.approx([0.0, 0.004 / 3, 0.008 / 3, 0.004])
    assert [lr[4 + i] for i in range(16)] == pytest.approx(expected_cosine(0.004, 1e-6, 16))
    assert lr[20] == 1e-6
    assert [wd[i] for i in range(20)] == pytest.approx(expected_cosine(0.04, 0.4, 20))
    assert wd[25] == 0.4


def test_build_schedulers_teacher_temp_warmup_then_constant():
    _, _, _, temp, _ = build_schedulers(make_cfg())
    warmup = [0.04 + i * (0.07 - 0.04) / 7 for i in range(8)]
    assert [temp[i] for i in range(8)] == pytest.approx(warmup)
    assert all(temp[i] == pytest.approx(0.07) for i in range(7, 40))


def test_build_schedulers_last_layer_frozen_then_equal_to_lr():
    lr, _, _, _, last = build_schedulers(make_cfg())
    assert [last[i] for i in range(8)] == [0.0] * 8
    for i in range(8, 25):
        assert last[i] == lr[i]
    assert lr[5] > 0


def test_build_schedulers_momentum_increases_to_final():
    _, _, momentum, _, _ = build_schedulers(make_cfg())
    values = [momentum[i] for i in range(21)]
    assert values[0] == pytest.approx(0.992)
    assert all(a < b for a, b in zip(values, values[1:]))
    assert values[-1] == 1.0


def test_build_schedulers_accepts_plain_objects():
    cfg = OmegaConf.to_container(make_cfg())
    lr, *_ = build_schedulers(cfg)
    assert lr[3] == pytest.approx(0.004)


def test_apply_optim_scheduler_sets_each_group():
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(3)]
    groups = [
        {"params": [params[0]], "lr_multiplier": 0.5, "wd_multiplier": 1.0, "is_last_layer": False},
        {"params": [params[1]], "lr_multiplier": 1.0, "wd_multiplier": 0.0, "is_last_layer": False},
        {"params": [params[2]], "lr_multiplier": 2.0, "wd_multiplier": 1.0, "is_last_layer": True},
    ]
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    apply_optim_scheduler(optimizer, lr=0.1, wd=0.05, last_layer_lr=0.01)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.1, 0.02])
    assert [g["weight_decay"] for g in optimizer.param_groups] == pytest.approx([0.05, 0.0, 0.05])
    apply_optim_scheduler(optimizer, lr=0.1, wd=0.05, last_layer_lr=0.0)
    assert optimizer.param_groups[2]["lr"] == 0.0


def test_scaled_lr_rules():
    assert scaled_lr(0.004, 1024, "sqrt_wrt_1024") == pytest.approx(0.004)
    assert scaled_lr(0.004, 256, "sqrt_wrt_1024") == pytest.approx(0.002)
    assert scaled_lr(0.001, 512, "linear_wrt_256") == pytest.approx(0.002)
    assert scaled_lr(0.001, 64, "linear_wrt_256") == pytest.approx(0.00025)
    with pytest.raises(ValueError, match="optim.scaling_rule='quadratic'.*sqrt_wrt_1024.*linear_wrt_256"):
        scaled_lr(0.001, 64, "quadratic")  # the error names the key to fix


# ---------------------------------------------------------------- epochs -> iterations, edges


@pytest.mark.parametrize(
    ("epochs", "epoch_len"),
    [("2.3", 50), ("0.58", 50), ("4.02", 50), ("0.29", 100), ("0.25", 6), ("1", 1250), ("0", 50), ("2.35", 10)],
)
def test_epochs_to_iterations_is_exact_for_decimal_epochs(epochs, epoch_len):
    # golden: exact rational arithmetic on the decimal the user typed, rounded down
    expected = math.floor(Fraction(epochs) * epoch_len)
    assert epochs_to_iterations(float(epochs), epoch_len) == expected


def test_fractional_epochs_do_not_lose_an_iteration():
    cfg = make_cfg()
    cfg.train.OFFICIAL_EPOCH_LENGTH = 50
    cfg.optim.epochs = 2.3  # 115 iterations; 2.3 * 50 is 114.99999999999999 in floats
    cfg.optim.warmup_epochs = 0.58  # 29 warm-up points; 0.58 * 50 is 28.999999999999996
    lr, wd, momentum, _, _ = build_schedulers(cfg)
    assert len(lr) == len(wd) == len(momentum) == total_iterations(cfg) == 115
    warmup = [i * 0.004 / 28 for i in range(29)]
    assert [lr[i] for i in range(29)] == pytest.approx(warmup)
    assert [lr[29 + i] for i in range(86)] == pytest.approx(expected_cosine(0.004, 1e-6, 86))


def test_a_warmup_longer_than_the_run_names_both_keys():
    cfg = make_cfg()
    cfg.optim.warmup_epochs = 10  # the default warm-up, with a 5-epoch run
    with pytest.raises(ValueError, match=r"optim\.warmup_epochs \(10.*optim\.epochs \(5"):
        build_schedulers(cfg)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train.OFFICIAL_EPOCH_LENGTH", 0),
        ("train.OFFICIAL_EPOCH_LENGTH", 2.5),
        ("optim.epochs", -1),
        ("optim.warmup_epochs", -0.5),
        ("optim.freeze_last_layer_epochs", -1),
        ("teacher.warmup_teacher_temp_epochs", float("nan")),
    ],
)
def test_bad_epoch_settings_name_the_key(key, value):
    cfg = make_cfg()
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ValueError, match=re.escape(key)):
        build_schedulers(cfg)


def test_stop_at_iteration_past_the_schedules_is_clamped_with_a_warning(caplog):
    assert resolve_stop_iteration(None, 20) == 20
    assert resolve_stop_iteration(7, 20) == 7
    assert resolve_stop_iteration(20, 20) == 20
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        assert resolve_stop_iteration(25, 20) == 20
    assert "past the end of the schedules" in caplog.text and "optim.epochs" in caplog.text
    for bad in (-1, 2.5, "10", True):
        with pytest.raises(ValueError, match=r"train\.stop_at_iteration"):
            resolve_stop_iteration(bad, 20)


# ---------------------------------------------------------------- the schedules over a whole run


def test_whole_run_follows_the_schedules_by_optimiser_step_under_accumulation(tmp_path):
    """Six optimiser steps of two micro-batches each: every logged value is the schedule at the
    step's index (not the micro-batch's), the last step included; computed here from the recipe."""
    from test_train_loop import loss_records, run

    summary = run(tmp_path, "train.grad_accum_steps=2", "train.batch_size_per_gpu=2")
    assert summary["iteration"] == 6
    saved = OmegaConf.load(tmp_path / "config.yaml")
    peak = 0.004 * math.sqrt(4 / 1024)  # base_lr, sqrt rule, effective batch 2 x 1 x 2
    assert saved.optim.lr == pytest.approx(peak)
    lr = [0.0, peak / 2, peak] + expected_cosine(peak, 1e-6, 3)  # warm-up 0.5 x 6 = 3 points
    wd = expected_cosine(0.04, 0.4, 6)
    mom = expected_cosine(0.992, 1.0, 6)
    temp = [0.04, 0.055, 0.07, 0.07, 0.07, 0.07]
    last_layer = [0.0, 0.0, 0.0] + lr[3:]
    logged = loss_records(tmp_path)
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    for it in range(1, 7):
        record, i = logged[it], it - 1
        assert record["lr"] == pytest.approx(lr[i], rel=1e-9, abs=1e-15), it
        assert record["wd"] == pytest.approx(wd[i]), it
        assert record["mom"] == pytest.approx(mom[i]), it
        assert record["teacher_temp"] == pytest.approx(temp[i]), it
        assert record["last_layer_lr"] == pytest.approx(last_layer[i], abs=1e-15), it


def test_the_loop_runs_as_long_as_the_schedules(tmp_path):
    """The training loop's end is the schedules' length, float noise in epochs x length included;
    a stop past that end is clamped to it, with a warning."""
    from test_train_loop import run

    opts = ("train.OFFICIAL_EPOCH_LENGTH=50", "optim.epochs=0.58", "train.checkpoint_period_iterations=0")
    summary = run(tmp_path / "short", *opts, "train.stop_at_iteration=1")
    assert summary["iteration"] == 1
    log = (tmp_path / "short" / "log.txt").read_text()
    assert "training to iteration 1 of 29" in log  # 0.58 x 50
    assert "past the end" not in log
    summary = run(tmp_path / "past", "train.stop_at_iteration=8")  # TINY: 1 epoch of 6 iterations
    assert summary["iteration"] == 6
    log = (tmp_path / "past" / "log.txt").read_text()
    assert "train.stop_at_iteration=8 is past the end of the schedules (6 iterations" in log


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("teacher", "teacher_temp", 0.0),  # softmax((u - c) / 0): NaN teacher targets
        ("teacher", "warmup_teacher_temp", -0.04),
        ("teacher", "momentum_teacher", 1.5),  # an EMA that diverges
        ("teacher", "final_momentum_teacher", -0.1),
        ("teacher", "final_momentum_teacher", 1.01),  # above 1 at the end too
        ("optim", "weight_decay_end", -0.4),
        ("optim", "min_lr", float("nan")),
        ("optim", "lr", "abc"),
        ("optim", "lr", "0.004"),  # a quoted number: the schedules would hold a string
    ],
)
def test_a_schedule_endpoint_out_of_range_names_its_key(section, key, value):
    cfg = make_cfg()
    cfg[section][key] = value
    with pytest.raises(ValueError, match=rf"{section}\.{key} must be a finite number"):
        build_schedulers(cfg)


def test_a_warmup_as_long_as_the_run_is_accepted_and_ends_at_the_base_lr():
    # The refusal is for a warm-up longer than the run; one exactly as long is a run without cosine.
    cfg = make_cfg()
    cfg.optim.warmup_epochs = cfg.optim.epochs
    lr, *_ = build_schedulers(cfg)
    n = 5 * 4
    assert [lr[i] for i in range(n)] == pytest.approx([0.004 * i / (n - 1) for i in range(n)])
