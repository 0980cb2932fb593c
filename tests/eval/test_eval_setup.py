"""Evaluation setup: arguments, devices, and loading every weights layout into the frozen backbone."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from safetensors.torch import save_file

from dinov2.checkpoint import StateDictMismatchError
from dinov2.eval.features import make_eval_dataset
from dinov2.eval.setup import (
    autocast_dtype_for,
    build_eval_model,
    get_args_parser,
    resolve_device,
    setup_and_build_model,
)
from dinov2.utils.config import load_config
from dinov2.utils.device import full_precision_matmuls


def source_model(opts):
    """A trained-looking backbone: built from the same config, then perturbed away from any init."""
    model, _ = build_eval_model(None, None, opts)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def test_random_init_is_frozen_in_eval_mode_and_warns(micro_arch, caplog):
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        model, cfg = build_eval_model(None, "", micro_arch)
    assert "randomly initialised" in caplog.text
    assert cfg.student.embed_dim == 32 and cfg.crops.global_crops_size == 32
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32)
    assert "student.pretrained_weights" not in caplog.text  # nothing of the kind in this config


def test_random_init_warning_explains_a_config_that_names_starting_weights(micro_arch, caplog):
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        build_eval_model(None, "", [*micro_arch, "student.pretrained_weights=start.pth"])
    warning = [r.getMessage() for r in caplog.records if "randomly initialised" in r.getMessage()]
    assert len(warning) == 1 and "student.pretrained_weights='start.pth'" in warning[0]
    assert "pass it as --pretrained-weights" in warning[0]


def test_teacher_checkpoint_and_safetensors_load_exactly(micro_arch, tmp_path):
    source = source_model(micro_arch)
    x = torch.randn(3, 3, 32, 32)
    expected = source(x)
    teacher = {"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()}}
    teacher["teacher"]["dino_head.mlp.0.weight"] = torch.zeros(4, 32)  # a head next to the backbone is set aside
    torch.save(teacher, tmp_path / "teacher_checkpoint.pth")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "backbone.safetensors")
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    for name in ("teacher_checkpoint.pth", "backbone.safetensors", "backbone.pth"):
        model, _ = build_eval_model(None, str(tmp_path / name), micro_arch)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_sharded_training_checkpoint_directory_loads_its_teacher(micro_arch, tmp_path):
    """``--pretrained-weights OUT/checkpoints/step_N`` (or the run directory, for its latest
    checkpoint) reads the teacher backbone of the sharded training checkpoint; it used to stop with
    "weights file not found" for the existing directory."""
    from torch import nn

    from dinov2.checkpoint.sharded import save_checkpoint

    teacher = source_model(micro_arch)
    run = nn.ModuleDict({"teacher": nn.ModuleDict({"backbone": teacher})})
    step = save_checkpoint(tmp_path / "run" / "checkpoints", 3, run, torch.optim.SGD(run.parameters(), lr=0.1), {}, {})
    x = torch.randn(2, 3, 32, 32)
    for location in (step, tmp_path / "run"):
        model, _ = build_eval_model(None, str(location), micro_arch)
        torch.testing.assert_close(model(x), teacher(x), rtol=0, atol=0)


def test_unknown_home_directory_in_pretrained_weights_is_a_missing_file():
    """``Path.expanduser`` raised ``RuntimeError: Could not determine home directory`` for
    ``~unknown_user/...`` before the file was even looked for."""
    from dinov2.eval.setup import read_pretrained_weights

    with pytest.raises(FileNotFoundError, match="weights file not found: ~no_such_user_x1/w.pth"):
        read_pretrained_weights("~no_such_user_x1/w.pth")


def test_chunked_training_config_loads_flat_weights(micro_arch, tmp_path):
    source = source_model(micro_arch)
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    model, _ = build_eval_model(None, str(tmp_path / "backbone.pth"), [*micro_arch, "student.block_chunks=2"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_weights_of_another_architecture_raise_with_key_names(micro_arch, tmp_path):
    source = source_model([*micro_arch, "student.num_register_tokens=2"])
    torch.save(source.state_dict(), tmp_path / "reg.pth")
    with pytest.raises(StateDictMismatchError, match="register_tokens") as info:
        build_eval_model(None, str(tmp_path / "reg.pth"), micro_arch)
    assert info.value.unexpected == ["register_tokens"]
    source = source_model([*micro_arch, "student.patch_size=4"])
    torch.save(source.state_dict(), tmp_path / "p4.pth")
    with pytest.raises(StateDictMismatchError, match=r"patch_embed\.proj\.weight") as info:
        build_eval_model(None, str(tmp_path / "p4.pth"), micro_arch)
    assert any(m.startswith("pos_embed ") for m in info.value.mismatched)


def test_missing_weights_file_and_bad_config_key_fail_clearly(micro_arch, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_eval_model(None, str(tmp_path / "nowhere.pth"), micro_arch)
    with pytest.raises(ValueError, match="student.archh"):
        build_eval_model(None, None, ["student.archh=vit_small"])


@pytest.mark.parametrize("name", ["vits14", "vitb14", "vitl14", "vitg14"])
@pytest.mark.parametrize("reg", ["", "_reg4"])
def test_released_eval_configs_match_the_hub_settings(name, reg):
    from dinov2.hub.backbones import released_kwargs

    cfg = load_config(f"{name}{reg}_pretrain")
    assert cfg.student.patch_size == 14 and cfg.crops.global_crops_size == 518
    expected = released_kwargs(cfg.student.arch, registers=bool(reg))
    for key, value in expected.items():
        assert cfg.student[key] == value, key
    assert cfg.student.ffn_layer == ("swiglufused" if name == "vitg14" else "mlp")
    assert cfg.student.num_register_tokens == (4 if reg else 0)


def test_parser_reads_shared_options_and_trailing_overrides():
    parent = get_args_parser(add_help=False)
    parser = argparse.ArgumentParser(parents=[parent])
    parser.add_argument("--temperature", type=float, default=0.07)
    args = parser.parse_args(
        ["--config", "vits14_pretrain", "--pretrained-weights", "w.pth", "--batch-size", "8",
         "--temperature", "0.1", "student.attn_backend=math", "crops.global_crops_size=224"]
    )  # fmt: skip
    assert args.config_file == "vits14_pretrain" and args.pretrained_weights == "w.pth"
    assert args.batch_size == 8 and args.temperature == 0.1 and args.device == "auto"
    assert args.opts == ["student.attn_backend=math", "crops.global_crops_size=224"]


def test_protocol_defaults_of_the_three_evaluations():
    """The published protocols (the original scripts' defaults, written out here): k-NN with k in
    10/20/100/200 and T = 0.07; linear probing 10 x 1250 iterations at 128 images per GPU (a global
    1024 on 8 GPUs), the 13-rate grid, last 1 and 4 blocks; logistic regression over 45 C values
    log-spaced in [1e-6, 1e5], 1000 L-BFGS iterations in float64, on 224 px images resized to 224."""
    from dinov2.eval import knn, linear, log_regression

    k = knn.get_args_parser().parse_args([])
    assert k.nb_knn == [10, 20, 100, 200] and k.temperature == 0.07
    lin = linear.get_args_parser().parse_args([])
    assert lin.batch_size == 128 and lin.epochs * lin.epoch_length == 12500
    assert lin.learning_rates == [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]
    assert lin.n_last_blocks == [1, 4] and lin.eval_period_iterations == 1250
    assert linear.get_args_parser().parse_args(["--batch-size", "64"]).batch_size == 64
    lr = log_regression.get_args_parser().parse_args([])
    c = log_regression.default_c_values(lr.c_count, *lr.c_powers)
    assert len(c) == 45 and c[0] == pytest.approx(1e-6) and c[-1] == pytest.approx(1e5)
    assert c[22] == pytest.approx(10 ** (-6 + 11 * 22 / 44))
    assert lr.max_iter == 1000 and lr.train_dtype == "float64"
    # the evaluation transforms: k-NN resizes to 256, logistic regression to 224, both crop 224
    assert (k.resize_size, k.crop_size) == (256, 224) and (lr.resize_size, lr.crop_size) == (224, 224)


def test_devices_and_autocast_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert autocast_dtype_for(torch.device("cpu")) is None
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            resolve_device("cuda")


def test_cuda_devices_get_this_process_index_and_become_current(monkeypatch):
    """``cuda`` alone (as ``auto``) is this process's GPU under torchrun, not an index-less device that
    NCCL and ``set_device`` refuse; every CUDA device is made current (xFormers launches there)."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == torch.device("cuda", 2) == resolve_device("auto")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 2)
    assert current == [torch.device("cuda", 2)] * 2 + [torch.device("cuda", 1), torch.device("cuda", 2)]
    assert resolve_device("cpu") == torch.device("cpu") and len(current) == 4
    # torchrun inside a SLURM job (one srun task per node): SLURM_LOCALID is 0 on every process, and
    # LOCAL_RANK is the one that tells them apart
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert resolve_device("auto") == torch.device("cuda", 2)


def test_more_local_ranks_than_gpus_is_an_error_unless_each_process_sees_its_own(monkeypatch):
    """Local rank 6 with 4 visible GPUs would share a GPU with rank 2 (NCCL stops with "duplicate GPU");
    with one visible GPU per process (srun --gpus-per-task=1) every rank takes index 0."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("LOCAL_RANK", "6")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(RuntimeError, match="local rank 6 .* only 4 CUDA devices"):
        resolve_device("auto")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert resolve_device("cuda") == torch.device("cuda", 3)


@pytest.mark.gpu
def test_cuda_autocast_dtype():
    native_bf16 = torch.cuda.get_device_capability() >= (8, 0)  # emulated bf16 before Ampere
    expected = torch.bfloat16 if native_bf16 else torch.float16
    assert autocast_dtype_for(torch.device("cuda")) == expected


def test_setup_and_build_model_from_arguments(micro_arch, tmp_path):
    args = get_args_parser().parse_args(["--output-dir", str(tmp_path / "out"), "--device", "cpu", *micro_arch])
    model, autocast_dtype, cfg = setup_and_build_model(args)
    assert (tmp_path / "out" / "log.txt").is_file() and autocast_dtype is None
    assert cfg.crops.global_crops_size == 32 and next(model.parameters()).device.type == "cpu"


def test_dataset_errors_name_the_dataset_and_role():
    with pytest.raises(ValueError, match="train dataset 'Nope:split=TRAIN'.*unknown dataset"):
        make_eval_dataset("Nope:split=TRAIN", role="train dataset")
    with pytest.raises(ValueError, match="'Synthetic:split=VAL:num_images=0' is empty"):
        make_eval_dataset("Synthetic:split=VAL:num_images=0")
    with pytest.raises(ValueError, match="no val dataset given"):
        make_eval_dataset("", role="val dataset")
    with pytest.raises(ValueError, match="missing_dir"):
        make_eval_dataset("ImageFolder:root=/missing_dir")


@pytest.mark.parametrize("tf32", [True, False])
def test_setup_follows_the_configs_tf32_setting(tf32, micro_arch, tmp_path, monkeypatch):
    """``compute_precision.tf32=false`` (fp32 feature extraction on CUDA) must not be overridden."""
    from dinov2.utils import device as device_utils

    calls = []
    monkeypatch.setattr(device_utils, "enable_tf32", lambda device, enabled=True: calls.append(enabled))
    overrides = [*micro_arch, f"compute_precision.tf32={str(tf32).lower()}"]
    setup_and_build_model(get_args_parser().parse_args(["--output-dir", str(tmp_path), "--device", "cpu", *overrides]))
    assert calls == [tf32]


def test_full_precision_matmuls_turn_tf32_off_inside_and_restore_the_setting_after():
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for setting in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = setting
            with full_precision_matmuls():
                assert torch.backends.cuda.matmul.allow_tf32 is False
            assert torch.backends.cuda.matmul.allow_tf32 is setting
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
