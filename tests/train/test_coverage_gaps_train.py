"""Training-entry behaviour that a line-coverage pass of the suite found unexercised: ``--no-resume``
in a directory without a run (nothing moved) and twice within one second (a second folder, the first
kept), ``--eval-only`` before any checkpoint, the initialisation rules for loss centres, running
statistics and tensors no rule covers, and schedules read at a negative iteration or given epochs
that are no number."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_train_loop import run
from torch import nn

from dinov2.models.init import seeded_init_
from dinov2.train import train as train_module


def test_no_resume_in_a_directory_without_a_run_moves_nothing(tmp_path):
    (tmp_path / "checkpoints").mkdir()  # an empty checkpoint folder is no run
    (tmp_path / "config.yaml").write_text("a config alone\n")
    assert train_module.set_aside_previous_run(tmp_path) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "config.yaml"]


def test_two_runs_set_aside_within_one_second_go_to_two_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(train_module.time, "strftime", lambda fmt: "replaced_20261203-120000")
    for run_number in (1, 2):  # the second finds the first's folder: it takes the next name
        (tmp_path / "training_metrics.json").write_text(f'{{"run": {run_number}}}\n')
        (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
        aside = train_module.set_aside_previous_run(tmp_path)
        expected = "replaced_20261203-120000" + ("" if run_number == 1 else ".1")
        assert aside == tmp_path / expected
        assert (aside / "training_metrics.json").read_text() == f'{{"run": {run_number}}}\n'
        assert (aside / "checkpoints" / "step_0000001").is_dir()
    assert (tmp_path / "replaced_20261203-120000" / "training_metrics.json").read_text() == '{"run": 1}\n'


def test_eval_only_before_any_checkpoint_evaluates_the_initial_weights_and_writes_the_config(tmp_path, dinov2_logger):
    result = run(tmp_path, extra_args=("--eval-only",))
    assert result["iteration"] == 0
    log = (tmp_path / "log.txt").read_text()
    assert f"--eval-only: no checkpoint in {tmp_path / 'checkpoints'}; evaluating the initial weights" in log
    assert (tmp_path / "eval" / "training_0" / "teacher_checkpoint.pth").is_file()
    assert OmegaConf.load(tmp_path / "config.yaml").train.seed is not None  # the run's config, written
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


class _WithStatistics(nn.Module):
    """A module of no known layer type holding a loss centre and running statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("center", torch.full((3,), 5.0))
        self.register_buffer("running_mean", torch.full((3,), 5.0))
        self.register_buffer("running_var", torch.full((3,), 5.0))
        self.register_buffer("num_batches_tracked", torch.tensor(7))


def test_loss_centres_and_running_statistics_start_at_zero_and_one():
    module = nn.ModuleDict({"loss": _WithStatistics()})
    seeded_init_(module, seed=0)
    loss = module["loss"]
    assert loss.center.tolist() == [0.0] * 3 and loss.running_mean.tolist() == [0.0] * 3
    assert loss.running_var.tolist() == [1.0] * 3 and int(loss.num_batches_tracked) == 0


class _Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(2))


def test_a_tensor_no_rule_covers_is_refused_by_its_name_and_owner():
    model = nn.ModuleDict({"head": nn.ModuleDict({"extra": _Unknown()})})
    with pytest.raises(TypeError, match=r"no initialisation rule for 'head\.extra\.gate' \(_Unknown\.gate\)"):
        seeded_init_(model, seed=0)


def test_a_schedule_refuses_a_negative_iteration_and_epochs_that_are_no_number():
    from dinov2.train.schedules import CosineScheduler, epochs_to_iterations

    schedule = CosineScheduler(base_value=1.0, final_value=0.0, total_iters=10)
    assert schedule[0] == 1.0
    with pytest.raises(IndexError, match="iteration must be non-negative, got -1"):
        schedule[-1]  # not the last value, as a Python sequence would give
    with pytest.raises(ValueError, match="teacher.warmup_teacher_temp_epochs must be a number of epochs, got 'ten'"):
        epochs_to_iterations("ten", 100, key="teacher.warmup_teacher_temp_epochs")
    with pytest.raises(ValueError, match="optim.epochs must be a number of epochs, got None"):
        epochs_to_iterations(None, 100)
