"""The training entry point and loop, end to end on CPU with a tiny ViT on the Synthetic set."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from dinov2.checkpoint import find_latest_checkpoint, load_backbone_state_dict
from dinov2.checkpoint.sharded import load_full_tensors, load_trainer_state
from dinov2.train import loop as loop_module
from dinov2.train.checks import NonFiniteLossError
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.train.train import build_model, main
from dinov2.utils.config import ConfigError
from dinov2.utils.device import seed_everything

TINY = [
    "train.device=cpu",  # CPU tests also on a machine with a GPU
    "train.dataset_path=Synthetic:split=TRAIN:num_images=64:image_size=32",
    "train.batch_size_per_gpu=4",
    "train.num_workers=0",
    "train.OFFICIAL_EPOCH_LENGTH=6",
    "train.log_period=1",
    "train.checkpoint_period_iterations=3",
    "student.arch=vit_tiny",
    "student.embed_dim=32",
    "student.depth=2",
    "student.num_heads=2",
    "student.patch_size=8",
    "student.drop_path_rate=0.1",
    "dino.head_n_prototypes=64",
    "dino.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16",
    "ibot.head_n_prototypes=64",
    "ibot.head_hidden_dim=32",
    "ibot.head_bottleneck_dim=16",
    "optim.epochs=1",
    "optim.warmup_epochs=0.5",
    "optim.freeze_last_layer_epochs=0.5",
    "teacher.warmup_teacher_temp_epochs=0.5",
    "crops.global_crops_size=32",
    "crops.local_crops_size=16",
    "crops.local_crops_number=2",
    "evaluation.eval_period_iterations=1000",
]


def run(output_dir: Path, *overrides: str, extra_args: tuple[str, ...] = ()):
    return main(["--output-dir", str(output_dir), *extra_args, *TINY, *overrides])


def records(output_dir: Path) -> list[dict]:
    lines = (output_dir / "training_metrics.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line]


def loss_records(output_dir: Path) -> dict[int, dict]:
    return {r["iteration"]: r for r in records(output_dir) if "loss" in r}


def initial_state(output_dir: Path) -> dict:
    """The model as ``main`` builds it before training (same resolved config, same seed)."""
    cfg = OmegaConf.load(output_dir / "config.yaml")
    seed_everything(int(cfg.train.seed))
    return build_model(cfg, torch.device("cpu")).state_dict()


def load_training_checkpoint(path: Path) -> dict:
    """A saved training checkpoint as plain tensors: ``{"model": {...}, **trainer state}``."""
    return {"model": load_full_tensors(path, "model."), **load_trainer_state(path)}


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file():
            digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def test_three_iterations_through_main(tmp_path):
    summary = run(tmp_path, "train.stop_at_iteration=3")
    assert summary["iteration"] == 3
    logged = loss_records(tmp_path)
    assert sorted(logged) == [1, 2, 3]
    for record in logged.values():
        for term in ("loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"):
            assert torch.isfinite(torch.tensor(record[term]))
        assert record["images_per_s"] > 0 and record["peak_memory_mb"] > 0
    saved = OmegaConf.load(tmp_path / "config.yaml")
    # derived lr: sqrt rule for a global batch of 4
    assert saved.optim.lr == pytest.approx(saved.optim.base_lr * (4 / 1024) ** 0.5)
    assert saved.student.embed_dim == 32
    assert find_latest_checkpoint(tmp_path / "checkpoints").name == "step_0000003"
    assert "training to iteration 3 of 6" in (tmp_path / "log.txt").read_text()


def test_zero_periods_checkpoint_and_export_only_at_the_end(tmp_path):
    """checkpoint_period_iterations=0 and eval_period_iterations=0 turn the periodic actions off:
    the run still checkpoints where it stops and exports at its last iteration."""
    summary = run(
        tmp_path, "train.checkpoint_period_iterations=0", "evaluation.eval_period_iterations=0",
        "train.checkpoint_keep_last=0", "train.stop_at_iteration=6",
    )  # fmt: skip
    assert summary["iteration"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000006"]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["training_6"]


def test_training_without_local_crops(tmp_path):
    summary = run(tmp_path, "crops.local_crops_number=0", "train.stop_at_iteration=2")
    assert summary["iteration"] == 2
    for record in loss_records(tmp_path).values():
        assert "dino_local_crops_loss" not in record and math.isfinite(record["dino_global_crops_loss"])


def test_a_restart_before_the_first_checkpoint_drops_the_lost_runs_records(tmp_path):
    """A job killed before its first checkpoint left metrics records; its requeue starts from scratch
    and must not log iterations 1, 2, ... a second time after them."""
    tmp_path.mkdir(exist_ok=True)
    lost = [{"iteration": i, "loss": 9.0} for i in (1, 2, 3)]
    (tmp_path / "training_metrics.json").write_text("".join(json.dumps(r) + "\n" for r in lost) + '{"itera')
    run(tmp_path, "train.stop_at_iteration=2")
    assert [r["iteration"] for r in records(tmp_path) if "loss" in r] == [1, 2]
    assert all(r["loss"] != 9.0 for r in records(tmp_path) if "loss" in r)


def test_config_yaml_is_written_resolved(tmp_path):
    run(tmp_path, "train.stop_at_iteration=1", "optim.min_lr=${optim.base_lr}")
    saved = (tmp_path / "config.yaml").read_text()
    assert "${" not in saved
    assert (
        OmegaConf.load(tmp_path / "config.yaml").optim.min_lr == OmegaConf.load(tmp_path / "config.yaml").optim.base_lr
    )


def test_rerunning_a_finished_run_says_there_is_nothing_to_train(tmp_path):
    run(tmp_path, "train.stop_at_iteration=3")
    summary = run(tmp_path, "train.stop_at_iteration=2")  # resumed at 3, already past the stop
    assert summary["iteration"] == 3
    assert "nothing to train: this run is at iteration 3, and it stops at 2" in (tmp_path / "log.txt").read_text()


def test_resume_continues_the_identical_trajectory(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight)
    run(resumed, "train.stop_at_iteration=4")  # checkpoints at 3 and 4
    assert find_latest_checkpoint(resumed / "checkpoints").name == "step_0000004"
    run(resumed)
    a, b = loss_records(straight), loss_records(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for it in range(1, 7):
        for term in ("loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "lr"):
            assert a[it][term] == b[it][term], (it, term)
    final_a = load_training_checkpoint(find_latest_checkpoint(straight / "checkpoints"))["model"]
    final_b = load_training_checkpoint(find_latest_checkpoint(resumed / "checkpoints"))["model"]
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key


def test_resume_with_data_workers(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    opts = ("train.num_workers=1", "train.stop_at_iteration=4")
    run(straight, *opts)
    run(resumed, "train.num_workers=1", "train.stop_at_iteration=2", "train.checkpoint_period_iterations=2")
    run(resumed, *opts)
    a, b = loss_records(straight), loss_records(resumed)
    assert [a[i]["loss"] for i in (3, 4)] == [b[i]["loss"] for i in (3, 4)]


ONLINE_KNN = (
    "evaluation.knn.train_dataset=Synthetic:split=TRAIN:num_images=16:image_size=32",
    "evaluation.knn.val_dataset=Synthetic:split=VAL:num_images=8:image_size=32",
    "evaluation.knn.resize_size=32",
    "evaluation.knn.crop_size=32",
    "evaluation.knn.batch_size=8",
    "evaluation.knn.at_start=false",
    "evaluation.knn.nb_knn=[2]",
)


def test_resume_is_exact_when_an_online_knn_falls_on_the_checkpoint(tmp_path):
    # An evaluation at the checkpoint's iteration, then the checkpoint: with stochastic depth on, the
    # resumed run goes on from the checkpoint's random streams, and must match the run that went on.
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    opts = (*ONLINE_KNN, "evaluation.eval_period_iterations=3", "student.drop_path_rate=0.3")
    run(straight, *opts)
    run(resumed, *opts, "train.stop_at_iteration=3")
    run(resumed, *opts)
    a, b = loss_records(straight), loss_records(resumed)
    assert [a[it]["loss"] for it in (4, 5, 6)] == [b[it]["loss"] for it in (4, 5, 6)]
    knn = [r for r in records(straight) if r.get("eval")]
    assert [r["iteration"] for r in knn] == [3, 6]  # the evaluation did run where the checkpoint is


def test_no_resume_starts_over_and_moves_the_earlier_run_aside(tmp_path):
    run(tmp_path, "train.stop_at_iteration=5")  # checkpoints 3 and 5
    first = loss_records(tmp_path)
    run(tmp_path, "train.stop_at_iteration=2", extra_args=("--no-resume",))
    assert sorted(loss_records(tmp_path)) == [1, 2] and loss_records(tmp_path)[1]["loss"] == first[1]["loss"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000002"]
    (aside,) = tmp_path.glob("replaced_*")  # nothing of the earlier run is lost
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_0000003", "step_0000005"]
    assert sorted(loss_records(aside)) == [1, 2, 3, 4, 5]
    # a plain restart (or a requeued job) continues the new run, not the earlier one
    run(tmp_path, "train.stop_at_iteration=3")
    assert "resumed from" in (log := (tmp_path / "log.txt").read_text()) and "step_0000002 at iteration 2" in log
    assert sorted(loss_records(tmp_path)) == [1, 2, 3]


def tiny_trainer(tmp_path, *overrides: str):
    from dinov2.utils.config import load_config

    cfg = load_config(None, [*TINY, f"train.output_dir={tmp_path}", *overrides])
    seed_everything(0)
    return loop_module.Trainer(cfg, build_model(cfg, torch.device("cpu")), torch.device("cpu"), tmp_path)


def test_each_student_module_is_clipped_on_its_own(tmp_path):
    # As the original: clip_grad_norm_ per student module (backbone, DINO head, iBOT head), not jointly.
    trainer = tiny_trainer(tmp_path, "optim.clip_grad=3.0", "ibot.separate_head=true")
    scales = {"backbone": 10.0, "dino_head": 0.01, "ibot_head": 1.0}
    before = {}
    for name, module in trainer.model.student.items():
        for param in module.parameters():
            param.grad = torch.randn_like(param) * scales[name]
        before[name] = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.parameters()]))
    total = trainer.clip_gradients()
    assert float(total) == pytest.approx(float(torch.stack(list(before.values())).square().sum().sqrt()), rel=1e-5)
    for name, module in trainer.model.student.items():
        after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.parameters()]))
        assert float(after) == pytest.approx(min(float(before[name]), 3.0), rel=1e-4), name
    assert float(before["dino_head"]) < 3.0 < float(before["backbone"])  # one module clipped, one left alone


def test_a_non_finite_gradient_stops_before_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    # Finite losses, infinite gradients (fp32, no scaler to skip the step): neither the weights, nor
    # the teacher, nor a checkpoint may take them.
    def infinite_gradients(out):
        out["loss"].register_hook(lambda grad: grad * float("inf"))

    path, digest = poison_after_a_checkpoint(tmp_path, monkeypatch, infinite_gradients)
    with pytest.raises(NonFiniteLossError, match=r"gradient norm at iteration 4: backbone=(inf|nan)"):
        run(tmp_path, "train.checkpoint_period_iterations=1")
    assert find_latest_checkpoint(tmp_path / "checkpoints") == path
    assert tree_digest(path) == digest


def test_grad_accumulation_equals_the_larger_batch(tmp_path):
    # Terms that are batch-local by definition (KoLeo, the iBOT mask draw, stochastic depth) are off.
    common = (
        "train.stop_at_iteration=2",
        "dino.koleo_loss_weight=0",
        "ibot.loss_weight=0",
        "ibot.mask_sample_probability=0",
        "student.drop_path_rate=0",
        "optim.scaling_rule=linear_wrt_256",
    )
    run(tmp_path / "big", *common, "train.batch_size_per_gpu=8")
    run(tmp_path / "accum", *common, "train.batch_size_per_gpu=4", "train.grad_accum_steps=2")
    big = load_training_checkpoint(find_latest_checkpoint(tmp_path / "big" / "checkpoints"))
    accum = load_training_checkpoint(find_latest_checkpoint(tmp_path / "accum" / "checkpoints"))
    assert big["samples_consumed"] == 16 and accum["samples_consumed"] == 16
    for key, value in big["model"].items():
        torch.testing.assert_close(accum["model"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    # the comparison is not vacuous: the two steps moved the student's weights
    key = "student.backbone.blocks.0.attn.qkv.weight"
    assert not torch.allclose(big["model"][key], initial_state(tmp_path / "big")[key])
    lossa, lossb = loss_records(tmp_path / "big"), loss_records(tmp_path / "accum")
    for it in (1, 2):
        assert lossb[it]["loss"] == pytest.approx(lossa[it]["loss"], rel=1e-5)
        # the accumulated gradient is the big batch's, not a multiple (AdamW alone would not tell)
        assert lossb[it]["grad_norm"] == pytest.approx(lossa[it]["grad_norm"], rel=1e-4)


def test_misspelt_key_names_it_and_the_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.lrr.*did you mean 'optim\.lr'"):
        run(tmp_path, "optim.lrr=0.1")
    with pytest.raises(ConfigError, match=r"studnet\.arch.*'student\.arch'"):
        run(tmp_path, "studnet.arch=vit_small")
    with pytest.raises(ConfigError, match=r"'optim\.clip_grad\.max'"):  # a key under a value that is no section
        run(tmp_path, "optim.clip_grad.max=1")
    with pytest.raises(FileNotFoundError, match="quickstart"):
        main(["--config", "no_such_recipe", "--output-dir", str(tmp_path)])


def poison_after_a_checkpoint(tmp_path, monkeypatch, poison) -> tuple[Path, str]:
    """Train to a checkpoint at iteration 3, then make ``poison(losses)`` run on every later forward's
    output; returns the checkpoint and its digest."""
    run(tmp_path, "train.stop_at_iteration=3")
    path = find_latest_checkpoint(tmp_path / "checkpoints")
    original = SSLMetaArch.forward

    def poisoned(self, batch, teacher_temp, accumulate=False):
        out = original(self, batch, teacher_temp, accumulate)
        poison(out)
        return out

    monkeypatch.setattr(SSLMetaArch, "forward", poisoned)
    return path, tree_digest(path)


def test_nan_stops_with_term_and_iteration_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    def nan_koleo(out):
        out["koleo_loss"] = out["koleo_loss"] * float("nan")
        out["loss"] = out["loss"] + out["koleo_loss"]

    path, digest = poison_after_a_checkpoint(tmp_path, monkeypatch, nan_koleo)
    with pytest.raises(NonFiniteLossError, match=r"iteration 4.*koleo_loss=nan"):
        run(tmp_path)
    assert find_latest_checkpoint(tmp_path / "checkpoints") == path
    assert tree_digest(path) == digest


def test_teacher_export_loads_into_a_hub_backbone(tmp_path):
    from dinov2.hub.backbones import dinov2_vits14

    opts = (
        "student.arch=vit_small",
        "student.patch_size=14",
        "student.embed_dim=null",
        "student.num_heads=null",
        "crops.global_crops_size=28",
        "crops.local_crops_size=14",
        "train.stop_at_iteration=2",
        "evaluation.eval_period_iterations=2",
    )
    run(tmp_path, *opts)
    export = tmp_path / "eval" / "training_2"
    trained = load_training_checkpoint(find_latest_checkpoint(tmp_path / "checkpoints"))["model"]
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in trained.items() if k.startswith("teacher.backbone.")}
    x = torch.randn(2, 3, 28, 28)
    for name in ("teacher_checkpoint.pth", "teacher_backbone.safetensors"):
        model = dinov2_vits14(weights=str(export / name), img_size=28, depth=2).eval()
        reference = dinov2_vits14(pretrained=False, img_size=28, depth=2).eval()
        load_backbone_state_dict(reference, teacher)
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


def test_unreadable_images_are_skipped_and_counted_in_the_log(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (30 * i, 255 - 20 * i, 7 * i)).save(images / f"img_{i}.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg at all")
    out = tmp_path / "run"
    # 3 iterations x 4 samples > 9 images: the first pass over the folder meets the broken file
    summary = run(out, f"train.dataset_path=ImageFolder:root={images}", "train.stop_at_iteration=3")
    assert summary["skipped_images"] >= 1
    assert loss_records(out)[3]["skipped_images"] == summary["skipped_images"]
    log = (out / "log.txt").read_text()
    assert "broken.jpg" in log and "skipped images" in log
    # the count is the run's, across a resume (of the run above, stopped at 3): the same as an uninterrupted run's
    opts = (f"train.dataset_path=ImageFolder:root={images}", "train.stop_at_iteration=6")
    straight_count = run(tmp_path / "straight", *opts)["skipped_images"]
    assert straight_count > summary["skipped_images"]  # later passes met the broken file again
    assert run(out, *opts)["skipped_images"] == straight_count


def test_eval_only_exports_the_latest_checkpoint(tmp_path):
    run(tmp_path, "train.stop_at_iteration=2")
    # --eval-only trains nothing: it must neither drop the records logged after the newest checkpoint
    # (a run still training, or killed, has them) nor replace the config the checkpoints were made with.
    later = json.dumps({"iteration": 3, "loss": 1.5})  # as if logged by the run after its checkpoint at 2
    with open(tmp_path / "training_metrics.json", "a") as handle:
        handle.write(later + "\n")
    metrics, config = (tmp_path / "training_metrics.json").read_text(), (tmp_path / "config.yaml").read_bytes()
    result = run(tmp_path, "train.log_period=7", extra_args=("--eval-only",))
    assert result["iteration"] == 2
    assert (tmp_path / "training_metrics.json").read_text().startswith(metrics)
    assert (tmp_path / "config.yaml").read_bytes() == config
    exported = torch.load(tmp_path / "eval" / "training_2" / "teacher_checkpoint.pth", weights_only=True)
    saved = load_training_checkpoint(find_latest_checkpoint(tmp_path / "checkpoints"))["model"]
    for key, value in exported["teacher"].items():
        assert torch.equal(value, saved[f"teacher.{key}"]), key


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_steps_are_finite_and_scaled(tmp_path, dtype):
    # The CUDA paths are the same code under torch.autocast(device_type=...); CPU autocast exercises them here.
    summary = run(tmp_path, "train.stop_at_iteration=2", f"compute_precision.autocast_dtype={dtype}")
    assert summary["iteration"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in loss_records(tmp_path).values())
    state = load_training_checkpoint(find_latest_checkpoint(tmp_path / "checkpoints"))
    if dtype == "fp16":  # fp16 trains with a gradient scaler, saved for resume
        assert state["grad_scaler"] is not None and state["grad_scaler"]["scale"] > 0
    else:
        assert state["grad_scaler"] is None
    # parameters stay fp32 (autocast computes in low precision, the master weights do not change dtype)
    assert all(
        v.dtype == torch.float32
        for k, v in state["model"].items()
        if k.startswith("student.") and v.is_floating_point()
    )


def test_resuming_under_other_param_group_settings_warns_that_the_checkpoints_are_kept(tmp_path):
    # The checkpoint's param groups (multipliers included) replace the config's on resume, so a changed
    # optim.decay_tokens (or a run saved before its default became true) silently kept the old rule.
    run(tmp_path, "train.stop_at_iteration=1", "optim.decay_tokens=false")
    log_file = tmp_path / "log.txt"
    start = len(log_file.read_text())
    run(tmp_path, "train.stop_at_iteration=1")  # resumes at its stop: trains nothing
    log = log_file.read_text()[start:]
    warned = [line for line in log.splitlines() if "keeps the lr / weight-decay multipliers" in line]
    assert len(warned) == 1 and "3 parameter(s) differ" in warned[0] and "optim.decay_tokens" in warned[0], log
    assert "backbone.cls_token {'lr_multiplier'" in warned[0] and "'wd_multiplier': 0.0" in warned[0]


def test_a_job_stopped_during_the_final_export_redoes_it_on_resume(tmp_path, monkeypatch):
    # The last iteration's export (and online k-NN) is what a run is for. A job stopped while writing it
    # (a time limit, a kill) must leave no checkpoint saying that iteration is done: the requeued job
    # would find nothing left to train and never write the export.
    short = ("train.OFFICIAL_EPOCH_LENGTH=2", "train.checkpoint_period_iterations=1")
    real_export = loop_module.export_teacher

    def stopped(directory, iteration, teacher, write=True):
        raise KeyboardInterrupt("job stopped during the export")

    monkeypatch.setattr(loop_module, "export_teacher", stopped)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, *short)
    assert find_latest_checkpoint(tmp_path / "checkpoints").name == "step_0000001"
    monkeypatch.setattr(loop_module, "export_teacher", real_export)
    assert run(tmp_path, *short)["iteration"] == 2
    assert (tmp_path / "eval" / "training_2" / "teacher_backbone.safetensors").is_file()
    assert find_latest_checkpoint(tmp_path / "checkpoints").name == "step_0000002"


def test_a_bad_online_knn_dataset_stops_the_run_before_it_trains(tmp_path):
    # With at_start=false the k-NN's datasets were first built at the first eval period, hours into a run.
    bad = "evaluation.knn.val_dataset=Synthetic:split=VAL:num_images=8:image_sise=32"
    with pytest.raises(ValueError, match="image_sise"):
        run(tmp_path, *ONLINE_KNN, bad, "evaluation.eval_period_iterations=3")
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / "training_metrics.json").exists() or records(tmp_path) == []


def test_a_failing_evaluation_keeps_the_checkpoint_due_there(tmp_path, monkeypatch):
    # An evaluation that errors (not a job stopped from outside) must not throw away the training since
    # the last checkpoint: otherwise every rerun would retrain that period and fail at the same place.
    short = (
        "train.OFFICIAL_EPOCH_LENGTH=4",
        "train.checkpoint_period_iterations=2",
        "evaluation.eval_period_iterations=2",
    )
    real_export = loop_module.export_teacher

    def failing(directory, iteration, teacher, write=True):
        if iteration == 4:
            raise OSError("disk full while writing the export")
        return real_export(directory, iteration, teacher, write)

    monkeypatch.setattr(loop_module, "export_teacher", failing)
    with pytest.raises(OSError, match="disk full"):
        run(tmp_path, *short)
    assert find_latest_checkpoint(tmp_path / "checkpoints").name == "step_0000004"
    assert (tmp_path / "eval" / "training_2").is_dir() and not (tmp_path / "eval" / "training_4").exists()
    monkeypatch.setattr(loop_module, "export_teacher", real_export)
    run(tmp_path, *short, extra_args=("--eval-only",))
    assert (tmp_path / "eval" / "training_4" / "teacher_backbone.safetensors").is_file()


def test_resuming_under_another_schedule_length_or_batch_says_what_changes(tmp_path):
    # optim.epochs (the schedules' length) and the effective batch can change on resume, and the run goes
    # on under the new ones: the lr and the other schedules jump at the resumed iteration. That used to
    # happen without a word; now a warning names both values.
    import logging

    saved = tiny_trainer(tmp_path)  # 6 iterations, 4 images per step
    saved.iteration, saved.samples_consumed = 3, 12
    saved.save_checkpoint()
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("dinov2")
    logger.addHandler(handler)
    try:
        assert tiny_trainer(tmp_path).resume()
        unchanged = list(messages)
        resumed = tiny_trainer(tmp_path, "optim.epochs=2", "train.grad_accum_steps=2")
        assert resumed.resume() and resumed.iteration == 3
    finally:
        logger.removeHandler(handler)
    assert not [m for m in unchanged if "was trained" in m], unchanged
    (length,) = [m for m in messages if "trained under schedules" in m]
    assert "of 6 iterations; this config's span 12" in length and "from iteration 3 on" in length
    (batch,) = [m for m in messages if "effective batch" in m]
    assert "batch of 4 images per step; this run's is 8" in batch


def _poison_gradients(monkeypatch, iterations):
    """Make the backward of the iterations in ``iterations`` (1-based; one forward per iteration) give NaN
    gradients, with finite losses."""
    original, calls = SSLMetaArch.forward, []

    def poisoned(self, batch, teacher_temp, accumulate=False):
        out = original(self, batch, teacher_temp, accumulate)
        calls.append(None)
        if len(calls) in iterations:
            out["loss"].register_hook(lambda grad: grad * float("nan"))
        return out

    monkeypatch.setattr(SSLMetaArch, "forward", poisoned)
    return calls


def test_fp16_scaler_skips_a_step_with_nan_gradients_without_stopping(tmp_path, monkeypatch):
    # With fp16's gradient scaler, non-finite gradients are the scaler's to skip (an overflow of the
    # scaled gradients), not a fatal error: the run goes on, and the weights do not take that step.
    calls = _poison_gradients(monkeypatch, {2})
    summary = run(tmp_path, "compute_precision.autocast_dtype=fp16", "train.stop_at_iteration=3")
    assert summary["iteration"] == 3 and len(calls) == 3
    state = load_training_checkpoint(find_latest_checkpoint(tmp_path / "checkpoints"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_fp16_steps_read_the_loss_scale_only_when_they_were_skipped(tmp_path, monkeypatch):
    # Reading the scaler's scale waits for the device. The scale only falls on a step the scaler
    # skipped (non-finite gradients), so a step with finite gradients must not read it; the skipped
    # step (the 2nd here) must, or a collapsed scale would never stop the run. (A scale of 1, so that
    # no other step overflows the tiny model's fp16 gradients.)
    reads = []

    class CountingScaler(torch.amp.GradScaler):
        def get_scale(self):
            caller = sys._getframe(1).f_code.co_name
            if caller == "step":  # the training step's own reads, not the checkpoint's state_dict
                reads.append(caller)
            return super().get_scale()

    monkeypatch.setattr(loop_module, "grad_scaler", lambda device, sharded: CountingScaler(device.type, init_scale=1.0))
    _poison_gradients(monkeypatch, {2})
    summary = run(tmp_path, "compute_precision.autocast_dtype=fp16", "train.stop_at_iteration=4")
    assert summary["iteration"] == 4
    assert len(reads) == 1


def test_fp16_gradients_that_are_non_finite_at_every_loss_scale_stop_the_run(tmp_path, monkeypatch):
    # A NaN in the gradients alone (finite losses) makes the fp16 scaler skip every step and halve its
    # scale each time: the run would go on to its end without training, saying nothing. Once the scale
    # is below 2^-24 no overflow explains it, and the run stops. (Started at 2^-20 here, not 2^16, to
    # get there in 5 steps instead of 41.)
    monkeypatch.setattr(
        loop_module, "grad_scaler", lambda device, sharded: torch.amp.GradScaler(device.type, init_scale=2.0**-20)
    )
    _poison_gradients(monkeypatch, set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match=r"iteration 5: .*gradient scaler.*step_0000004"):
        run(tmp_path, "compute_precision.autocast_dtype=fp16", "train.checkpoint_period_iterations=2")
    assert find_latest_checkpoint(tmp_path / "checkpoints").name == "step_0000004"
