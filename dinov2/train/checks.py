"""Checks that stop or warn a training run, each naming what it found: non-finite loss terms or
gradient norms (decided by all ranks together), an fp16 loss scale that collapsed (gradients
non-finite at every scale), the stop iteration, and what a resumed run does
differently from the run that saved its checkpoint (optimizer settings it overrides, another
schedule length or batch size), and the share of unreadable images over the whole run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from dinov2 import distributed
from dinov2.utils.config import is_integer_at_least

logger = logging.getLogger("dinov2")


class UnreadableDataError(RuntimeError):
    """Too many of the training images failed to decode: the run stops instead of training on the rest."""


def check_skipped_fraction(
    skipped: int, delivered: int, max_fraction: float, min_attempts: int, dataset: str, iteration: int,
    last_checkpoint: Path | None,
) -> None:  # fmt: skip
    """Raise :class:`UnreadableDataError` when more than ``max_fraction`` of the run's decode attempts
    (``skipped`` failures plus ``delivered`` samples, all ranks and workers, resumes included) failed,
    after at least ``min_attempts``. Both counts follow the data stream alone, so the decision does
    not depend on the number of workers or ranks, nor on where the run was resumed."""
    attempts = skipped + delivered
    if attempts < min_attempts or skipped <= max_fraction * attempts:
        return
    kept = f"the last checkpoint {last_checkpoint} is untouched" if last_checkpoint else "no checkpoint was written"
    raise UnreadableDataError(
        f"{dataset}: {skipped} of {attempts} decode attempts failed by iteration {iteration} "
        f"({skipped / attempts:.0%} > {max_fraction:.0%}); check the dataset (the log names the files); "
        f"stopping ({kept})"
    )


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf: the run stops before the optimiser step."""


def check_finite(
    losses: dict[str, torch.Tensor], iteration: int, last_checkpoint: Path | None, what: str = "loss"
) -> None:
    """Raise :class:`NonFiniteLossError` naming every non-finite term of ``iteration`` (1-based, as logged);
    ``what`` says which values these are (loss terms, or per-module gradient norms)."""
    names = list(losses)
    values = torch.stack([losses[n].detach().float() for n in names])
    # Decided together: a term that is non-finite on any rank stops every rank here, with the same
    # error, rather than one rank raising while the others wait in the gradient reduction.
    ranks_bad = distributed.all_reduce((~torch.isfinite(values)).to(torch.int32))
    if not bool(ranks_bad.any()):
        return
    world = distributed.get_world_size()
    bad = ", ".join(
        f"{n}={v:.4g}" + (f" (non-finite on {r} of {world} processes)" if world > 1 else "")
        for n, v, r in zip(names, values.tolist(), ranks_bad.tolist(), strict=True)
        if r > 0
    )
    kept = f"the last checkpoint {last_checkpoint} is untouched" if last_checkpoint else "no checkpoint was written"
    raise NonFiniteLossError(f"non-finite {what} at iteration {iteration}: {bad}; stopping ({kept})")


# The fp16 gradient scaler halves its scale at each step it skips for non-finite gradients. Below this
# scale, a real gradient would have to exceed ~1e12 to overflow fp16: the gradients are non-finite at
# every scale (a NaN from the model, not an overflow), every step is skipped, and the run trains nothing.
MIN_LOSS_SCALE = 2.0**-24


def check_loss_scale(scale: float, grad_norm: float, iteration: int, last_checkpoint: Path | None) -> None:
    """Raise :class:`NonFiniteLossError` when the fp16 gradient scaler's ``scale`` (after its update at
    ``iteration``) fell below :data:`MIN_LOSS_SCALE`. The scaler's state is the same on every rank
    (its found-inf is all-reduced), so every rank stops here together. The loop calls it only after a
    step with a non-finite gradient norm: the scale falls on no other step, and reading it waits for
    the device."""
    if scale >= MIN_LOSS_SCALE:
        return
    kept = f"the last checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was written"
    raise NonFiniteLossError(
        f"non-finite gradients at iteration {iteration}: gradient norm {grad_norm:.4g}, with finite loss terms; "
        f"the fp16 gradient scaler has skipped every recent optimiser step and its scale fell to {scale:.3g} "
        f"(< 2^-24), so no overflow explains it: the run no longer trains; stopping ({kept}; checkpoints "
        "written while the steps were skipped hold the weights of the last step taken)"
    )


def resolve_stop_iteration(stop: Any, max_iter: int) -> int:
    """Where this job stops: ``train.stop_at_iteration``, or the schedule's end ``max_iter`` when it
    is null. Training never goes past the schedules: a later stop is clamped to their end, with a
    warning (raise ``optim.epochs`` to train longer; the schedules then stretch)."""
    if stop is None:
        return max_iter
    if not is_integer_at_least(stop, 0):
        raise ValueError(f"train.stop_at_iteration must be null or a non-negative integer, got {stop!r}")
    if int(stop) > max_iter:
        logger.warning(
            "train.stop_at_iteration=%d is past the end of the schedules (%d iterations = optim.epochs x "
            "train.OFFICIAL_EPOCH_LENGTH): training stops at %d; raise optim.epochs to train longer",
            int(stop), max_iter, max_iter,
        )  # fmt: skip
        return max_iter
    return int(stop)


def warn_changed_groups(changed: list[str], path: Path) -> None:
    """The checkpoint's lr / weight-decay multipliers are kept (the continuation stays exact), so
    optimizer settings changed since it was saved do not apply: say so, naming what differs."""
    if changed:
        logger.warning(
            "%s keeps the lr / weight-decay multipliers it was saved with; %d parameter(s) differ from this "
            "config's (optim.decay_tokens, optim.layerwise_decay, optim.patch_embed_lr_mult), which do not "
            "apply to a resumed run (to change them, start a new run with train.init_from): %s",
            path, len(changed), "; ".join(changed[:4]) + ("; ..." if len(changed) > 4 else ""),
        )  # fmt: skip


def warn_changed_run_shape(saved: dict[str, Any], max_iter: int, samples_per_step: int, path: Path) -> None:
    """A resumed run goes on under this config's schedules and batch, which may not be the ones its
    checkpoint (trainer state ``saved``) was trained with: say so, with both values. Checkpoints
    written before these were recorded are not checked."""
    old_iters, old_batch = saved.get("max_iter"), saved.get("samples_per_step")
    iteration = int(saved.get("iteration", 0))
    if old_iters is not None and int(old_iters) != max_iter:
        logger.warning(
            "%s was trained under schedules of %d iterations; this config's span %d (optim.epochs x "
            "train.OFFICIAL_EPOCH_LENGTH): from iteration %d on, the lr, weight decay, teacher momentum and "
            "temperature and the last-layer freeze follow the new schedules, which may jump there",
            path, int(old_iters), max_iter, iteration,
        )  # fmt: skip
    if old_batch is not None and int(old_batch) != samples_per_step:
        logger.warning(
            "%s was trained with an effective batch of %d images per step; this run's is %d (train.batch_size_per_gpu "
            "x processes x train.grad_accum_steps): the data stream goes on from the same sample, and the lr is "
            "derived for the new batch",
            path, int(old_batch), samples_per_step,
        )  # fmt: skip
