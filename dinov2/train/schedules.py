"""Per-iteration hyper-parameter schedules (learning rate, weight decay, teacher momentum and
temperature) and the helpers that push them into an optimizer.

Every schedule is precomputed as a numpy array indexed by training iteration; epochs are
converted to iterations with ``cfg.train.OFFICIAL_EPOCH_LENGTH``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from dinov2.utils.config import is_integer_at_least, select

SCALING_RULES = ("sqrt_wrt_1024", "linear_wrt_256")


class CosineScheduler:
    """``freeze_iters`` zeros, a linear warm-up from ``start_warmup_value`` to ``base_value``
    (``warmup_iters`` points, both ends included), then a half-cosine from ``base_value`` to
    ``final_value`` over the remaining iterations. ``sched[it]`` is ``final_value`` once
    ``it >= total_iters``."""

    def __init__(
        self,
        base_value: float,
        final_value: float,
        total_iters: int,
        warmup_iters: int = 0,
        start_warmup_value: float = 0.0,
        freeze_iters: int = 0,
    ) -> None:
        counts = {"total_iters": total_iters, "warmup_iters": warmup_iters, "freeze_iters": freeze_iters}
        for key, value in counts.items():
            if int(value) != value or value < 0:
                raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
        total_iters, warmup_iters, freeze_iters = int(total_iters), int(warmup_iters), int(freeze_iters)
        if warmup_iters + freeze_iters > total_iters:
            raise ValueError(
                f"warmup_iters ({warmup_iters}) + freeze_iters ({freeze_iters}) exceed total_iters ({total_iters})"
            )
        self.base_value = float(base_value)
        self.final_value = float(final_value)
        self.total_iters = total_iters
        freeze = np.zeros(freeze_iters)
        warmup = np.linspace(float(start_warmup_value), self.base_value, warmup_iters)
        remaining = total_iters - warmup_iters - freeze_iters
        phase = np.pi * np.arange(remaining) / max(remaining, 1)
        cosine = self.final_value + 0.5 * (self.base_value - self.final_value) * (1.0 + np.cos(phase))
        self.schedule = np.concatenate((freeze, warmup, cosine)).astype(np.float64)

    def __len__(self) -> int:
        return self.total_iters

    def __getitem__(self, it: int) -> float:
        if it < 0:
            raise IndexError(f"iteration must be non-negative, got {it}")
        if it >= self.total_iters:
            return self.final_value
        return float(self.schedule[it])


class Schedulers(NamedTuple):
    """The five schedules of a DINOv2 run, all indexed by iteration."""

    lr: CosineScheduler
    wd: CosineScheduler
    momentum: CosineScheduler
    teacher_temp: CosineScheduler
    last_layer_lr: CosineScheduler


def epochs_to_iterations(epochs: Any, epoch_len: int, key: str = "optim.epochs") -> int:
    """``epochs * epoch_len`` iterations, rounded down (fractional epochs are allowed). A product
    that float arithmetic puts a hair below an integer (``2.3 * 50 = 114.99999999999999``) counts
    as that integer, so that it does not lose an iteration. ``key`` names the setting in errors."""
    try:
        value = float(epochs)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number of epochs, got {epochs!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{key} must be a non-negative number of epochs, got {epochs!r}")
    product = value * epoch_len
    nearest = round(product)
    return int(nearest) if abs(product - nearest) <= 1e-9 * max(1.0, product) else math.floor(product)


def official_epoch_length(cfg: Any) -> int:
    """``train.OFFICIAL_EPOCH_LENGTH``, checked to be a positive integer."""
    value = select(cfg, "train.OFFICIAL_EPOCH_LENGTH")
    if not is_integer_at_least(value, 1):
        raise ValueError(
            f"train.OFFICIAL_EPOCH_LENGTH must be a positive integer (iterations per epoch), got {value!r}"
        )
    return int(value)


def total_iterations(cfg: Any) -> int:
    """The length of every epoch-long schedule: ``optim.epochs x train.OFFICIAL_EPOCH_LENGTH``."""
    return epochs_to_iterations(select(cfg, "optim.epochs"), official_epoch_length(cfg), "optim.epochs")


# Schedule endpoints and the range each must lie in (a temperature of 0 gives NaN targets, a momentum
# above 1 an EMA that diverges, a negative lr or weight decay the opposite update).
SCHEDULE_VALUE_RANGES = {
    "optim.lr": "non-negative",
    "optim.min_lr": "non-negative",
    "optim.weight_decay": "non-negative",
    "optim.weight_decay_end": "non-negative",
    "teacher.momentum_teacher": "in [0, 1]",
    "teacher.final_momentum_teacher": "in [0, 1]",
    "teacher.warmup_teacher_temp": "positive",
    "teacher.teacher_temp": "positive",
}


def check_schedule_values(cfg: Any) -> None:
    """Every schedule endpoint is a finite number in its range (:data:`SCHEDULE_VALUE_RANGES`), else a
    ``ValueError`` naming the key."""
    tests = {"non-negative": lambda v: v >= 0, "in [0, 1]": lambda v: 0 <= v <= 1, "positive": lambda v: v > 0}
    for key, wanted in SCHEDULE_VALUE_RANGES.items():
        value = select(cfg, key)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if isinstance(value, (bool, str)) or not math.isfinite(number) or not tests[wanted](number):
            raise ValueError(f"{key} must be a finite number, {wanted}, got {value!r}")


def build_schedulers(cfg: Any) -> Schedulers:
    """Build (lr, wd, momentum, teacher_temp, last_layer_lr) schedules from a training config.

    ``cfg.optim.lr`` is used as is: it should already be scaled to the batch size (see
    :func:`scaled_lr`). The last-layer lr equals the lr schedule, zeroed for the first
    ``cfg.optim.freeze_last_layer_epochs`` epochs. Epoch counts become iterations with
    :func:`epochs_to_iterations`; a warm-up longer than the run is refused, naming both keys, and so
    is a schedule endpoint out of range (:func:`check_schedule_values`).
    """
    check_schedule_values(cfg)
    epoch_len = official_epoch_length(cfg)
    total = total_iterations(cfg)

    def iters(key: str) -> int:
        return epochs_to_iterations(select(cfg, key), epoch_len, key)

    warmup = iters("optim.warmup_epochs")
    if warmup > total:
        raise ValueError(
            f"optim.warmup_epochs ({select(cfg, 'optim.warmup_epochs')}, {warmup} iterations) is longer than the "
            f"run, optim.epochs ({select(cfg, 'optim.epochs')}, {total} iterations); shorten the warm-up"
        )

    def lr_schedule() -> CosineScheduler:
        return CosineScheduler(
            base_value=select(cfg, "optim.lr"),
            final_value=select(cfg, "optim.min_lr"),
            total_iters=total,
            warmup_iters=warmup,
            start_warmup_value=0.0,
        )

    wd = CosineScheduler(select(cfg, "optim.weight_decay"), select(cfg, "optim.weight_decay_end"), total)
    momentum = CosineScheduler(
        select(cfg, "teacher.momentum_teacher"), select(cfg, "teacher.final_momentum_teacher"), total
    )
    temp_iters = iters("teacher.warmup_teacher_temp_epochs")
    teacher_temp = CosineScheduler(
        base_value=select(cfg, "teacher.teacher_temp"),
        final_value=select(cfg, "teacher.teacher_temp"),
        total_iters=temp_iters,
        warmup_iters=temp_iters,
        start_warmup_value=select(cfg, "teacher.warmup_teacher_temp"),
    )
    last_layer_lr = lr_schedule()
    last_layer_lr.schedule[: iters("optim.freeze_last_layer_epochs")] = 0.0
    return Schedulers(lr_schedule(), wd, momentum, teacher_temp, last_layer_lr)


def apply_optim_scheduler(optimizer: Any, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every param group's ``lr`` and ``weight_decay`` from the current schedule values and
    the group's ``lr_multiplier`` / ``wd_multiplier`` / ``is_last_layer`` keys."""
    for group in optimizer.param_groups:
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
        base = last_layer_lr if group.get("is_last_layer", False) else lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)


def scaled_lr(base_lr: float, global_batch_size: int, scaling_rule: str) -> float:
    """The learning rate for ``global_batch_size`` under ``scaling_rule``:
    ``sqrt_wrt_1024`` (base * sqrt(B / 1024)) or ``linear_wrt_256`` (base * B / 256)."""
    if scaling_rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024)
    if scaling_rule == "linear_wrt_256":
        return base_lr * global_batch_size / 256
    raise ValueError(
        f"optim.scaling_rule={scaling_rule!r} is not a known lr scaling rule; valid: {', '.join(SCALING_RULES)}"
    )
