"""From a training run's output directory to evaluation, as docs/recipes.md step 4 walks it.

A real (one-iteration) training run of a small non-default architecture writes ``config.yaml``,
``checkpoints/step_N/`` and ``eval/training_N/``; every evaluation location of its weights must give
the same frozen backbone, with or without ``--config-file``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dinov2.checkpoint import find_latest_checkpoint
from dinov2.checkpoint.sharded import load_full_tensors
from dinov2.eval.setup import build_eval_model, run_config_of
from dinov2.models import build_model
from dinov2.train.train import main as train_main
from dinov2.utils.config import load_config

# Not the default architecture (ViT-L/16 at 224 px): one register token, width 32, patch 8, 32 px.
ARCH = [
    "student.arch=vit_tiny",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=8",
    "student.num_register_tokens=1",
    "crops.global_crops_size=32",
]
RUN = [
    *ARCH,
    "train.device=cpu",
    "train.dataset_path=Synthetic:split=TRAIN:num_images=16:image_size=32",
    "train.batch_size_per_gpu=4",
    "train.num_workers=0",
    "train.OFFICIAL_EPOCH_LENGTH=1",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "optim.freeze_last_layer_epochs=0",
    "teacher.warmup_teacher_temp_epochs=0",
    "dino.head_n_prototypes=32",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=32",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
    "crops.local_crops_size=16",
    "crops.local_crops_number=2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("handoff") / "OUT"
    torch.manual_seed(0)
    train_main(["--output-dir", str(out), *RUN])
    assert (out / "config.yaml").is_file() and (out / "eval" / "training_1" / "teacher_checkpoint.pth").is_file()
    return out


def reference_teacher(run: Path) -> torch.nn.Module:
    """The run's teacher backbone, built here from the architecture overrides above (not from the
    run's config) and filled from the sharded checkpoint's tensors."""
    cfg = load_config(None, ARCH)
    model, _ = build_model(cfg.student, only_teacher=True, img_size=32)
    state = load_full_tensors(find_latest_checkpoint(run / "checkpoints"), "model.teacher.backbone.")
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_every_location_of_a_runs_weights_evaluates_its_teacher_without_a_config_file(run):
    """Without ``--config-file`` the eval backbone used to be the default config's ViT-L/16 (every
    location of a run's weights then failed with a key mismatch), and the export directory
    ``OUT/eval/training_N`` was refused as "no training checkpoint", though
    ``distillation.teacher_checkpoint`` accepts it."""
    x = torch.randn(2, 3, 32, 32)
    expected = reference_teacher(run)(x)
    export = run / "eval" / "training_1"
    step = find_latest_checkpoint(run / "checkpoints")
    locations = [run, run / "checkpoints", step, export, export / "teacher_checkpoint.pth"]
    locations.append(export / "teacher_backbone.safetensors")
    for location in locations:
        assert run_config_of(location) == run / "config.yaml", location
        model, cfg = build_eval_model(None, str(location), device="cpu")
        assert cfg.student.num_register_tokens == 1 and cfg.student.embed_dim == 32
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0, msg=str(location))
    # with the run's config named explicitly (recipes step 4), the export directory loads too
    model, _ = build_eval_model(str(run / "config.yaml"), str(export), device="cpu")
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_weights_outside_a_run_keep_the_default_config(run, tmp_path):
    copy = tmp_path / "elsewhere" / "teacher_checkpoint.pth"
    copy.parent.mkdir()
    shutil.copy(run / "eval" / "training_1" / "teacher_checkpoint.pth", copy)
    assert run_config_of(copy) is None
    assert run_config_of(tmp_path / "elsewhere") is None
    assert run_config_of("https://example.com/eval/training_1/teacher_checkpoint.pth") is None
    assert run_config_of("") is None and run_config_of(None) is None


def run_knn(weights: Path, output: Path, num_images: int, k: int) -> dict:
    """The k-NN entry point on Synthetic 32 px images with ``weights``; its results JSON."""
    from dinov2.eval.knn import get_args_parser, main

    data = f"Synthetic:split={{}}:num_images={num_images}:image_size=32"
    args = get_args_parser().parse_args(
        ["--pretrained-weights", str(weights), "--output-dir", str(output), "--device", "cpu"]
        + ["--train-dataset", data.format("TRAIN"), "--val-dataset", data.format("VAL"), "--num-workers", "0"]
        + ["--resize-size", "32", "--crop-size", "32", "--no-progress", "--nb_knn", str(k)]
    )
    main(args)
    return json.loads((output / "results_eval_knn.json").read_text())


def test_knn_on_a_run_directory_records_the_runs_config(run, tmp_path):
    results = run_knn(run, tmp_path / "knn", num_images=24, k=5)
    assert results["config_file"] == str(run / "config.yaml")
    assert results["num_train"] == 24 and results["num_val"] == 24
    # the results name the checkpoint that was read, not only the directory that was given: a run
    # that saves again later would otherwise leave no trace of which step these numbers belong to
    assert results["pretrained_weights"] == str(run)
    assert results["weights_read"] == str(find_latest_checkpoint(run / "checkpoints"))


def test_results_of_a_weights_file_name_that_file_as_read(run, tmp_path):
    weights = run / "eval" / "training_1" / "teacher_checkpoint.pth"
    results = run_knn(weights, tmp_path / "knn", num_images=8, k=3)
    assert results["pretrained_weights"] == results["weights_read"] == str(weights)
