"""The training loop: schedules -> batch to device -> losses -> backward -> clip -> step -> teacher
EMA -> logging, with checkpoints, exports and online k-NN on their periods.

One :meth:`Trainer.step` is one optimiser step over ``train.grad_accum_steps`` micro-batches. The
loop owns everything around the objective; the objective itself is :class:`SSLMetaArch`.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from dinov2 import distributed
from dinov2.checkpoint import (
    agreed_latest_checkpoint,
    capture_rng_state,
    export_teacher,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from dinov2.checkpoint.lock import lock_for_training, unlock_output_directory
from dinov2.distributed.grads import clip_grad_norm_, total_grad_norm
from dinov2.train.checks import (
    check_finite,
    check_loss_scale,
    check_skipped_fraction,
    resolve_stop_iteration,
    warn_changed_groups,
    warn_changed_run_shape,
)
from dinov2.train.data import build_gpu_augmentation, build_train_dataset, build_train_loader, gpu_augmentation_enabled
from dinov2.train.param_groups import build_optimizer_param_groups, changed_param_settings, param_settings
from dinov2.train.precision import grad_scaler, resolve_precision
from dinov2.train.schedules import apply_optim_scheduler, build_schedulers
from dinov2.utils.device import autocast, batch_to_device, peak_memory_mb, seed_everything
from dinov2.utils.logging import MetricsWriter, format_duration

logger = logging.getLogger("dinov2")


def build_optimizer(cfg: Any, model: torch.nn.Module) -> torch.optim.AdamW:
    groups = build_optimizer_param_groups(
        model.student,
        layerwise_decay=cfg.optim.layerwise_decay,
        patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult,
        decay_tokens=cfg.optim.decay_tokens,
    )
    return torch.optim.AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))


class Trainer:
    """State of one run: model, optimiser, schedules, data stream, writers."""

    def __init__(self, cfg: Any, model: torch.nn.Module, device: torch.device, output_dir: str | Path) -> None:
        self.cfg, self.model, self.device = cfg, model, device
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.optimizer = build_optimizer(cfg, model)
        self.schedules = build_schedulers(cfg)
        self.max_iter = len(self.schedules.lr)  # optim.epochs x OFFICIAL_EPOCH_LENGTH, as every schedule
        self.stop_iter = resolve_stop_iteration(cfg.train.stop_at_iteration, self.max_iter)
        self.accum = int(cfg.train.grad_accum_steps)
        if self.accum < 1:
            raise ValueError(f"train.grad_accum_steps must be >= 1, got {self.accum}")
        self.sharded = distributed.is_sharded(model.student)
        self.autocast_dtype, use_scaler = resolve_precision(cfg, device, self.sharded)
        self.scaler = grad_scaler(device, self.sharded) if use_scaler else None
        self.iteration = 0
        self.samples_consumed = 0  # by all ranks together: where the data stream resumes
        self.extra: dict[str, Any] = {}  # persisted with checkpoints (e.g. the random-init k-NN result)
        self.last_checkpoint: Path | None = None
        self.metrics = MetricsWriter(self.output_dir, enabled=distributed.is_main_process())
        self.online_knn = _online_knn(cfg)  # None when evaluation.knn names no datasets
        self.skipped_images = distributed.RunCount()  # unreadable images the data workers skipped
        self.gpu_augment = build_gpu_augmentation(cfg) if gpu_augmentation_enabled(cfg) else None
        self._skip_limit: tuple[float, int, str] | None = None  # see _take_over_skip_limit
        self._rng_state: dict | None = None
        self._reseed_on_start = False

    # ------------------------------------------------------------------ checkpoints
    def trainer_state(self) -> dict[str, Any]:
        """What a checkpoint holds besides the model, the optimizer and the RNG states."""
        return {
            "iteration": self.iteration,
            "samples_consumed": self.samples_consumed,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "skipped_images": self.skipped_images.total(self.device),  # a collective, as saving is
            "extra": dict(self.extra),
            "max_iter": self.max_iter,  # what the run was trained under, to tell a resume that changes it
            "samples_per_step": self.samples_per_step(),
        }

    def save_checkpoint(self) -> None:
        """A collective: every rank writes its shards of ``checkpoints/step_{it:07d}``."""
        self.model.apply_center_updates()
        self.last_checkpoint = save_checkpoint(
            self.checkpoint_dir,
            self.iteration,
            self.model,
            self.optimizer,
            self.trainer_state(),
            capture_rng_state(),
            keep_last=int(self.cfg.train.checkpoint_keep_last),
        )
        logger.info("checkpoint written: %s", self.last_checkpoint)

    def resume(self, truncate_metrics: bool = True) -> bool:
        """Load the latest checkpoint of the output directory, if any (saved on any world size).

        Training from it rewrites what was logged after it, so ``truncate_metrics`` drops those records
        (all of them on a fresh start); ``--eval-only``, which trains nothing, passes False."""
        if truncate_metrics:  # training: this job becomes the output directory's one writer first
            lock_for_training(self.output_dir)
        path = agreed_latest_checkpoint(self.checkpoint_dir)
        if path is None:  # a fresh start: records of a run lost before its first checkpoint go
            if truncate_metrics:
                self.metrics.truncate_after(-1)
            return False
        configured = param_settings(self.optimizer)
        state = load_checkpoint(path, self.model, self.optimizer)  # its param groups replace the config's
        warn_changed_groups(changed_param_settings(configured, self.optimizer), path)
        warn_changed_run_shape(state, self.max_iter, self.samples_per_step(), path)
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.iteration, self.extra = int(state["iteration"]), dict(state.get("extra", {}))
        self.samples_consumed = int(state["samples_consumed"])
        self.skipped_images = distributed.RunCount(state.get("skipped_images", 0))  # all ranks', before the resume
        self._rng_state = state["rng"]  # restored right before the first step (see run)
        self._reseed_on_start = state["rng"] is None
        if self._reseed_on_start:
            logger.info("checkpoint saved on %s processes, now %d: RNG streams are reseeded from (seed, rank, "
                        "iteration); data and masks are unaffected", state.get("world_size"), distributed.get_world_size())  # fmt: skip
        self.last_checkpoint = path
        check_after_resume = getattr(self.model, "check_after_resume", None)  # distillation: the same teacher
        if truncate_metrics and callable(check_after_resume):
            check_after_resume()
        if truncate_metrics:
            self.metrics.truncate_after(self.iteration)
        logger.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    def samples_per_step(self) -> int:
        """Samples all ranks together consume per optimiser step."""
        return int(self.cfg.train.batch_size_per_gpu) * self.accum * distributed.get_world_size()

    # ------------------------------------------------------------------ one optimiser step
    def apply_schedules(self, it: int) -> dict[str, float]:
        values = {
            "lr": self.schedules.lr[it],
            "wd": self.schedules.wd[it],
            "mom": self.schedules.momentum[it],
            "last_layer_lr": self.schedules.last_layer_lr[it],
            "teacher_temp": self.schedules.teacher_temp[it],
        }
        apply_optim_scheduler(self.optimizer, values["lr"], values["wd"], values["last_layer_lr"])
        return values

    def _set_gradient_sync(self, enabled: bool) -> None:
        """FSDP2: reduce-scatter gradients only after the last micro-batch of a step."""
        for module in self.model.student.values():
            if hasattr(module, "set_requires_gradient_sync"):
                module.set_requires_gradient_sync(enabled)

    def step(self, data_iter, scheduled: dict[str, float]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Micro-batches -> losses -> backward (accumulated) -> clip -> optimiser step -> teacher EMA."""
        self.optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        timing = {"data_time": 0.0, "images": 0}
        for micro in range(self.accum):
            if self.sharded and self.accum > 1:
                self._set_gradient_sync(micro == self.accum - 1)
            start = time.perf_counter()
            batch = next(data_iter)
            timing["data_time"] += time.perf_counter() - start
            self.skipped_images.local += int(batch.pop("skipped_images", 0))
            batch = batch_to_device(batch, self.device)
            if self.gpu_augment is not None:  # train.gpu_augmentation: crops rendered on the device
                batch = self.gpu_augment(batch)
            timing["images"] += len(batch["collated_global_crops"]) // 2
            with autocast(self.device, self.autocast_dtype):
                losses = self.model(batch, teacher_temp=scheduled["teacher_temp"], accumulate=micro > 0)
            check_finite(losses, self.iteration + 1, self.last_checkpoint)
            loss = losses["loss"] / self.accum
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            for name, value in losses.items():
                totals[name] += value.detach().float() / self.accum
        params = [p for p in self.model.student.parameters() if p.requires_grad]
        distributed.all_reduce_mean_grads(
            [p for p in params if not distributed.is_dtensor(p)]
        )  # FSDP2 reduced the rest
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        timing["grad_norm"] = float(self.clip_gradients())
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()  # a step with non-finite gradients is skipped: the scale halves
            if not math.isfinite(timing["grad_norm"]):
                # The scale only falls on a skipped step, whose gradients (so their norm) are non-finite:
                # finite steps need not read it (get_scale waits for the device, which would stall the
                # launch of the teacher update behind the optimiser step).
                check_loss_scale(self.scaler.get_scale(), timing["grad_norm"], self.iteration + 1, self.last_checkpoint)
        else:
            self.optimizer.step()
        self.model.update_teacher(scheduled["mom"])
        self.samples_consumed += self.samples_per_step()
        return dict(totals), timing

    def clip_gradients(self) -> torch.Tensor:
        """Clip each student module's gradients (backbone, each head) to ``optim.clip_grad`` on its own, as
        the original does; returns the norm of all gradients together, before clipping.

        Without a gradient scaler a non-finite norm stops the run here, before the optimiser step, so
        that neither the weights nor the teacher (nor a checkpoint) take it. With a scaler the step is
        skipped by the scaler instead, which is its job in fp16 (until its scale collapses: gradients
        that are non-finite at every scale stop the run in :func:`check_loss_scale`)."""
        max_norm = float(self.cfg.optim.clip_grad or 0.0)
        norms = {}
        for name, module in self.model.student.items():
            params = [p for p in module.parameters() if p.requires_grad and p.grad is not None]
            if params:
                norms[name] = clip_grad_norm_(params, max_norm) if max_norm > 0 else total_grad_norm(params)
        if not norms:
            return torch.zeros(())
        if self.scaler is None:
            check_finite(norms, self.iteration + 1, self.last_checkpoint, what="gradient norm")
        return torch.stack([n.float().to(self.device) for n in norms.values()]).square().sum().sqrt()

    # ------------------------------------------------------------------ logging and evaluation
    def log(self, losses: dict[str, torch.Tensor], scheduled: dict, window: dict, per_iter: float) -> None:
        """One log line and metrics record; ``per_iter``: mean seconds per iteration so far (for the ETA)."""
        names = sorted(losses)
        world = distributed.get_world_size()
        values = torch.stack([losses[n] for n in names])
        distributed.all_reduce(values)
        values = (values / world).tolist()
        skipped = self.skipped_images.total(self.device)
        record = dict(zip(names, values, strict=True))
        record.update(scheduled)
        record.update(
            {
                "images_per_s": window["images"] * world / max(window["seconds"], 1e-9),
                "data_time": window["data_time"] / max(window["steps"], 1),
                "grad_norm": window.get("grad_norm", float("nan")),
                "peak_memory_mb": peak_memory_mb(self.device),
                "skipped_images": skipped,
            }
        )
        self.metrics.write(self.iteration, record)
        terms = " ".join(f"{n.removesuffix('_loss').removesuffix('_crops')} {v:.4f}" for n, v in zip(names, values))
        logger.info(
            "it %d/%d | eta %s | %s | lr %.3g wd %.3g mom %.4f tt %.3f | %.1f img/s data %.3fs | mem %.0f MB%s",
            self.iteration,
            self.stop_iter,
            format_duration(per_iter * (self.stop_iter - self.iteration)),
            terms,
            record["lr"],
            record["wd"],
            record["mom"],
            record["teacher_temp"],
            record["images_per_s"],
            record["data_time"],
            record["peak_memory_mb"],
            f" | skipped images {skipped}" if skipped else "",
        )
        if self._skip_limit is not None:
            check_skipped_fraction(
                skipped, self.samples_consumed, *self._skip_limit, self.iteration, self.last_checkpoint
            )

    def evaluate(self, label: str) -> dict[str, float]:
        """Export the teacher (OUTPUT/eval/training_{it}/) and run the online k-NN, if configured.

        Training's random streams are put back afterwards, whatever the evaluation drew from them
        (the k-NN's loaders seed from generators of their own; a dataset or transform may not), so
        that training goes on as it would without it: the same run with and without
        ``evaluation.knn``, or with another eval period, takes the same steps."""
        rng_state = capture_rng_state()
        try:
            return self._evaluate(label)
        finally:
            restore_rng_state(rng_state)

    def _evaluate(self, label: str) -> dict[str, float]:
        results: dict[str, float] = {}
        if label != "start":  # a collective when sharded; rank 0 writes
            export_teacher(self.output_dir, self.iteration, self.model.teacher, write=distributed.is_main_process())
        if self.online_knn is not None:
            results = self.online_knn(self.model.teacher.backbone, self.device, self.autocast_dtype)
            self.metrics.write(self.iteration, {"eval": label, **results})
            logger.info("online k-NN at iteration %d (%s): %s", self.iteration, label, _fmt(results))
        return results

    # ------------------------------------------------------------------ the run
    def run(self, resume: bool = True) -> dict[str, Any]:
        """Train from the latest checkpoint (or from scratch) to ``stop_iter``; returns a summary.
        The output directory is locked for the run and given back when it ends, also on an error."""
        lock_for_training(self.output_dir)  # a second job on this output directory stops here (or in resume)
        try:
            return self._run(resume)
        finally:  # else held until this process ends, refusing later jobs on the directory
            unlock_output_directory(self.output_dir)

    def _run(self, resume: bool) -> dict[str, Any]:
        if resume:
            self.resume()
        dataset = build_train_dataset(self.cfg)
        self._skip_limit = _take_over_skip_limit(dataset)
        if self.online_knn is not None:  # a bad k-NN dataset fails now, not at the first eval period
            self.online_knn.datasets()
        self._log_plan(len(dataset))
        loader = build_train_loader(self.cfg, dataset, samples_consumed=self.samples_consumed)
        if self.online_knn is not None and self.iteration == 0 and self.cfg.evaluation.knn.at_start:
            self.extra["knn_at_start"] = self.evaluate("start")
        eval_period = int(self.cfg.evaluation.eval_period_iterations)
        ckpt_period = int(self.cfg.train.checkpoint_period_iterations)
        log_period = max(int(self.cfg.train.log_period), 1)
        self.model.train()
        data_iter = iter(loader)
        if self._rng_state is not None:  # after everything that draws at start-up (iter(loader) does)
            restore_rng_state(self._rng_state)
            self._rng_state = None
        elif self._reseed_on_start:
            seed_everything(int(self.cfg.train.seed) + 1_000_003 * self.iteration, distributed.get_rank())
        start_time, start_iteration, window = time.perf_counter(), self.iteration, _new_window()
        while self.iteration < self.stop_iter:
            step_start = time.perf_counter()
            scheduled = self.apply_schedules(self.iteration)
            losses, timing = self.step(data_iter, scheduled)
            self.iteration += 1
            _accumulate(window, timing, time.perf_counter() - step_start)
            if self.iteration % log_period == 0 or self.iteration == self.stop_iter:
                per_iter = (time.perf_counter() - start_time) / (self.iteration - start_iteration)
                self.log(losses, scheduled, window, per_iter)
                window = _new_window()
            checkpoint_due = _due(self.iteration, ckpt_period) or self.iteration == self.stop_iter
            if _due(self.iteration, eval_period) or self.iteration == self.max_iter:
                self._evaluate_then_checkpoint(checkpoint_due)
            elif checkpoint_due:
                self.save_checkpoint()
        self.metrics.close()
        return self.summary()

    def _evaluate_then_checkpoint(self, checkpoint_due: bool) -> None:
        """Evaluation first: a checkpoint of this iteration then means that its export (and k-NN) is
        done, so a job stopped in between redoes them on resume instead of never writing them. An
        evaluation that fails still saves the checkpoint due here before the error stops the run, so
        the training since the last one is kept and a rerun does not stop at the same place again."""
        try:
            self.extra["knn_last"] = self.evaluate(f"training_{self.iteration}")
        except Exception:
            if checkpoint_due:
                logger.error("the evaluation at iteration %d failed; saving its checkpoint before stopping "
                             "(--eval-only redoes the evaluation)", self.iteration)  # fmt: skip
                self.save_checkpoint()
            raise
        self.model.train()
        if checkpoint_due:
            self.save_checkpoint()

    def summary(self) -> dict[str, Any]:
        skipped = self.skipped_images.total(self.device)
        summary = {"iteration": self.iteration, "skipped_images": skipped}
        start, last = self.extra.get("knn_at_start"), self.extra.get("knn_last")
        if start and last and self.iteration == self.max_iter:
            summary.update(knn_top1_random_init=start["knn_top1"], knn_top1_trained=last["knn_top1"])
            logger.info(
                "k-NN top-1 on %s: random init %.2f%% -> trained %.2f%% (%+.2f points)",
                self.cfg.evaluation.knn.val_dataset,
                start["knn_top1"],
                last["knn_top1"],
                last["knn_top1"] - start["knn_top1"],
            )
        if skipped:
            logger.warning("%d unreadable images were skipped in this run (all processes, resumes included)", skipped)
        return summary

    def _log_plan(self, dataset_len: int) -> None:
        cfg, world = self.cfg, distributed.get_world_size()
        batch = int(cfg.train.batch_size_per_gpu) * world * self.accum
        epoch_len = int(cfg.train.OFFICIAL_EPOCH_LENGTH)
        logger.info(
            "training to iteration %d of %d (%s epochs of OFFICIAL_EPOCH_LENGTH=%d iterations; an epoch is a "
            "number of iterations, not a pass over the data: one epoch = %.2f passes over %d images); "
            "effective batch %d = %d per process x %d processes x %d accumulation steps; lr %.4g",
            self.stop_iter,
            self.max_iter,
            cfg.optim.epochs,
            epoch_len,
            epoch_len * batch / max(dataset_len, 1),
            dataset_len,
            batch,
            cfg.train.batch_size_per_gpu,
            world,
            self.accum,
            cfg.optim.lr,
        )
        if self.iteration >= self.stop_iter:
            logger.warning(
                "nothing to train: this run is at iteration %d, and it stops at %d (train.stop_at_iteration, "
                "or optim.epochs x train.OFFICIAL_EPOCH_LENGTH); raise them to train on",
                self.iteration,
                self.stop_iter,
            )
        if str(cfg.train.centering) == "sinkhorn_knopp" and self.accum > 1:
            logger.info(
                "Sinkhorn-Knopp balances the teacher's targets over each micro-batch on all processes "
                "(%d images), not over the effective batch of %d (see docs/distributed.md)",
                batch // self.accum,
                batch,
            )


def _online_knn(cfg: Any):
    from dinov2.eval.online import OnlineKNN  # the eval package is only needed when training runs

    return OnlineKNN.from_config(cfg.evaluation.knn)


def _due(iteration: int, period: int) -> bool:
    """Whether a periodic action falls on ``iteration``; a period <= 0 never does (the action then
    happens only where the loop also asks for it at the end)."""
    return period > 0 and iteration % period == 0


def _take_over_skip_limit(dataset) -> tuple[float, int, str] | None:
    """The dataset's limit on the share of failed decodes, ``(max fraction, min attempts, name)``, which
    the trainer then checks on the run's counts at each log period; the dataset's own check, on the
    counts of each worker process alone, is switched off, as it would stop a run or not depending on
    the number of workers and on resumes. None for a dataset without one (e.g. Synthetic)."""
    fraction = getattr(dataset, "max_failure_fraction", None)
    if fraction is None:
        return None
    limit = (float(fraction), int(dataset.min_attempts_for_fraction), dataset._describe())
    dataset.max_failure_fraction = float("inf")  # an instance attribute: the workers' copies get it too
    return limit


def _new_window() -> dict[str, float]:
    return {"images": 0, "data_time": 0.0, "seconds": 0.0, "steps": 0}


def _accumulate(window: dict, timing: dict, seconds: float) -> None:
    window["images"] += timing["images"]
    window["data_time"] += timing["data_time"]
    window["seconds"] += seconds
    window["steps"] += 1
    if "grad_norm" in timing:
        window["grad_norm"] = timing["grad_norm"]


def _fmt(results: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in results.items())
