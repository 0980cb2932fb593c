"""The training loop: behaviour a mutation audit found untested (teacher EMA with the scheduled
momentum, images counted per step, the last log line, records after a resumed checkpoint, the
start-of-run k-NN, evaluation leaving training's random streams alone, reseeding without saved RNG
states, fp16 gradient norms, checkpoint pruning, and the stop and skip limits at their boundaries)."""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from test_train_loop import ONLINE_KNN, loss_records, records, run, tiny_trainer

from dinov2.checkpoint import find_latest_checkpoint
from dinov2.checkpoint.lock import lock_output_directory, unlock_output_directory
from dinov2.train import loop as loop_module
from dinov2.train.checks import UnreadableDataError, check_skipped_fraction, resolve_stop_iteration
from dinov2.train.data import build_train_dataset, build_train_loader


def test_one_step_moves_the_teacher_by_the_scheduled_momentum_and_counts_the_batch(tmp_path):
    trainer = tiny_trainer(tmp_path)
    loader = build_train_loader(trainer.cfg, build_train_dataset(trainer.cfg), samples_consumed=0)
    scheduled = trainer.apply_schedules(0)
    momentum = scheduled["mom"]
    assert 0.9 < momentum < 1.0  # the schedule's first value: a teacher that moves, not a frozen one
    teacher_before = {k: v.detach().clone() for k, v in trainer.model.teacher.named_parameters()}
    _, timing = trainer.step(iter(loader), scheduled)
    assert timing["images"] == trainer.cfg.train.batch_size_per_gpu  # images, not their two global crops
    student = dict(trainer.model.student.named_parameters())
    moved = 0
    for name, value in trainer.model.teacher.named_parameters():
        expected = momentum * teacher_before[name] + (1 - momentum) * student[name].detach()
        torch.testing.assert_close(value.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
        moved += int(not torch.equal(value, teacher_before[name]))
    assert moved > 0


def test_the_last_iteration_is_logged_also_off_the_log_period(tmp_path):
    run(tmp_path, "train.log_period=4")  # 6 iterations
    assert sorted(loss_records(tmp_path)) == [4, 6]


def test_a_resume_drops_the_records_logged_after_its_checkpoint(tmp_path):
    """A job killed after iteration 5's record but before its checkpoint: the requeue resumes from
    step 3 and logs 4 and 5 again, which must then appear once each."""
    run(tmp_path, "train.stop_at_iteration=5")  # checkpoints at 3 and 5
    shutil.rmtree(tmp_path / "checkpoints" / "step_0000005")
    assert find_latest_checkpoint(tmp_path / "checkpoints").name == "step_0000003"
    run(tmp_path)
    assert [r["iteration"] for r in records(tmp_path) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_the_online_knn_leaves_training_as_it_would_be_without_it_and_runs_at_start_once(tmp_path, monkeypatch):
    # Stochastic depth draws from torch's RNG at every step. The k-NN's own loaders seed from generators
    # of their own, but whatever an evaluation draws from the global streams must not reach training:
    # here it draws from torch's, NumPy's and Python's.
    from dinov2.eval.online import OnlineKNN

    original = OnlineKNN.__call__

    def drawing(self, *args, **kwargs):
        torch.rand(5)
        np.random.rand(5)
        random.random()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OnlineKNN, "__call__", drawing)
    common = ("student.drop_path_rate=0.3", "evaluation.eval_period_iterations=3")
    with_knn, without = tmp_path / "knn", tmp_path / "plain"
    knn = (*ONLINE_KNN, "evaluation.knn.at_start=true")
    run(with_knn, *common, *knn, "train.stop_at_iteration=3")
    run(with_knn, *common, *knn)  # resumed at iteration 3: the start-of-run k-NN is not done again
    run(without, *common)
    evals = [(r["iteration"], r["eval"]) for r in records(with_knn) if r.get("eval")]
    assert evals == [(0, "start"), (3, "training_3"), (6, "training_6")]
    a, b = loss_records(with_knn), loss_records(without)
    assert [a[it]["loss"] for it in range(1, 7)] == [b[it]["loss"] for it in range(1, 7)]


def test_a_resume_without_saved_rng_states_reseeds_per_iteration(tmp_path, monkeypatch):
    """Without RNG states to restore (a checkpoint from another world size; here its file removed)
    the streams are reseeded from the iteration: no resume replays the random draws (stochastic
    depth, masks) of the run's first steps, nor those of a resume at another iteration."""
    states = []
    original = loop_module.Trainer.step

    def recording(self, data_iter, scheduled):
        states.append((self.iteration, torch.random.get_rng_state().clone()))
        return original(self, data_iter, scheduled)

    monkeypatch.setattr(loop_module.Trainer, "step", recording)
    run(tmp_path, "train.stop_at_iteration=3")
    for stop in (4, 5):
        for rng in (tmp_path / "checkpoints").glob("step_*/rng_rank*.pth"):
            rng.unlink()
        run(tmp_path, f"train.stop_at_iteration={stop}")
    first_of_each_job = [s for it, s in states if it in (0, 3, 4)]
    assert [it for it, _ in states] == [0, 1, 2, 3, 4]
    assert len(first_of_each_job) == 3
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.equal(first_of_each_job[i], first_of_each_job[j]), (i, j)


def test_fp16_logs_the_unscaled_gradient_norm(tmp_path, monkeypatch):
    # The norm (and the clipping) act on the true gradients: the loss scale is divided out first.
    # (Scale 8, not 2^16: this tiny model's first gradients would overflow fp16 at 2^16, a skipped step.)
    monkeypatch.setattr(
        loop_module, "grad_scaler", lambda device, sharded: torch.amp.GradScaler(device.type, init_scale=8.0)
    )
    run(tmp_path / "fp32", "train.stop_at_iteration=1")
    run(tmp_path / "fp16", "train.stop_at_iteration=1", "compute_precision.autocast_dtype=fp16")
    fp32, fp16 = loss_records(tmp_path / "fp32")[1], loss_records(tmp_path / "fp16")[1]
    assert fp16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=0.1)


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    run(tmp_path, "train.checkpoint_period_iterations=1", "train.checkpoint_keep_last=2", "train.stop_at_iteration=4")
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert kept == ["step_0000003", "step_0000004"]


def test_the_lock_goes_with_the_process_that_took_it_not_with_its_forked_children(tmp_path):
    # A data-loader worker forked while the lock is held must not keep the directory locked once the
    # trainer process is gone (its lock descriptor is closed in the child).
    script = textwrap.dedent(
        """
        import os, sys, time
        from dinov2.checkpoint.lock import lock_output_directory
        lock_output_directory(sys.argv[1])
        child = os.fork()
        if child == 0:  # off the parent's pipes, which the caller reads to their end
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            time.sleep(30)
            os._exit(0)
        print(child, flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    child = int(out.stdout.split()[0])
    try:
        os.kill(child, 0)  # the forked child still lives
        lock_output_directory(tmp_path)  # raises OutputDirectoryInUseError if the child held the lock
        unlock_output_directory(tmp_path)
    finally:
        os.kill(child, 9)


def test_the_skip_limit_allows_exactly_the_fraction_and_stops_above_it():
    check_skipped_fraction(1, 3, 0.25, 4, "set", 7, None)  # 1 of 4 attempts = 25%: allowed
    with pytest.raises(UnreadableDataError, match=r"set: 2 of 5 decode attempts failed by iteration 7"):
        check_skipped_fraction(2, 3, 0.25, 4, "set", 7, None)
    check_skipped_fraction(2, 1, 0.25, 4, "set", 7, None)  # 3 attempts, fewer than the 4 needed to decide


def test_a_stop_past_the_schedules_is_clamped_to_their_end_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        assert resolve_stop_iteration(100, 6) == 6
    assert "past the end of the schedules" in caplog.text
    assert resolve_stop_iteration(6, 6) == 6 and resolve_stop_iteration(2, 6) == 2
    assert resolve_stop_iteration(None, 6) == 6
