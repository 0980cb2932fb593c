"""Interrupted and resumed runs against uninterrupted ones, bit for bit: every tensor of the final
checkpoint (student, teacher, centres, optimizer state), the gradient scaler, and the metrics."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_loop import TINY

from dinov2.checkpoint import find_latest_checkpoint
from dinov2.checkpoint.sharded import load_full_tensors, load_trainer_state, read_tensor_metadata
from dinov2.train import loop as loop_module
from dinov2.train.train import main

VOLATILE = ("images_per_s", "data_time", "peak_memory_mb")  # wall-clock and memory readings


def run(output_dir, *overrides):
    return main(["--output-dir", str(output_dir), *TINY, *overrides])


def records(output_dir) -> list[dict]:
    lines = (output_dir / "training_metrics.json").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in lines if line]


def final_state(output_dir) -> tuple[dict, dict]:
    path = find_latest_checkpoint(output_dir / "checkpoints")
    return load_full_tensors(path, ""), load_trainer_state(path)


def test_fp16_run_killed_after_a_checkpoint_of_only_skipped_steps_resumes_exactly(tmp_path, monkeypatch):
    # fp16's gradient scaler skips the first steps (its initial scale overflows; in this tiny model every
    # step of the run), so the checkpoint at 2 holds no optimizer state at all; such a checkpoint could not
    # be loaded ("Missing key optimizer.state..."), and the run could never resume.
    # With Sinkhorn-Knopp, accumulation, device-side crops and stochastic depth on, the job is killed in
    # iteration 3 (after its checkpoint at 2): the resumed run must end exactly where the straight one does.
    opts = (
        "train.OFFICIAL_EPOCH_LENGTH=4", "train.checkpoint_period_iterations=2", "compute_precision.autocast_dtype=fp16",
        "train.centering=sinkhorn_knopp", "train.grad_accum_steps=2", "train.gpu_augmentation=true",
        "student.drop_path_rate=0.3",
    )  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(straight, *opts)
    real_step = loop_module.Trainer.step

    def killed_in_iteration_3(self, *args, **kwargs):
        if self.iteration == 2:
            raise KeyboardInterrupt("job killed")
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(loop_module.Trainer, "step", killed_in_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        run(killed, *opts)
    monkeypatch.setattr(loop_module.Trainer, "step", real_step)
    at_2 = find_latest_checkpoint(killed / "checkpoints")
    assert at_2.name == "step_0000002"
    assert not [k for k in read_tensor_metadata(at_2) if k.startswith("optimizer.state.")]  # all steps skipped
    assert run(killed, *opts)["iteration"] == 4
    (tensors_a, trainer_a), (tensors_b, trainer_b) = final_state(straight), final_state(killed)
    assert tensors_a.keys() == tensors_b.keys()
    for key, value in tensors_a.items():
        assert torch.equal(tensors_b[key], value), key
    assert trainer_b == trainer_a  # the gradient scaler's scale and growth tracker included
    assert records(killed) == records(straight)
