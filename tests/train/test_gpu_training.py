"""Training on CUDA: xFormers against native attention on nested crops, one full training step per
attention backend, and fp16 (gradient scaler) / bf16 runs that lower the loss on a fixed batch.

The CUDA tests are marked ``gpu`` (and ``xformers``) and skipped by tests/conftest.py where those are
missing; the per-backend step also runs here on CPU in fp32.
"""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch

from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.train.data import build_train_dataset, build_train_loader
from dinov2.train.loop import Trainer
from dinov2.train.train import build_model, setup_config
from dinov2.utils.config import load_config
from dinov2.utils.device import seed_everything

SMALL = [
    "train.dataset_path=Synthetic:split=TRAIN:num_images=64:image_size=64",
    "train.batch_size_per_gpu=8",
    "train.num_workers=0",
]
# A fixed objective on a fixed batch: frozen teacher (momentum 1), Sinkhorn-Knopp targets (no running
# center), constant teacher temperature, no lr warm-up. Then the student's loss must fall.
FIXED_OBJECTIVE = [
    "teacher.momentum_teacher=1.0",
    "train.centering=sinkhorn_knopp",
    "teacher.warmup_teacher_temp_epochs=0",
    "optim.warmup_epochs=0",
]
CROSS_ENTROPIES = ("dino_local_crops_loss", "dino_global_crops_loss", "ibot_loss")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def make_trainer(tmp_path, device: str, *overrides: str) -> Trainer:
    """Quickstart's tiny ViT and heads with ``overrides``, built as ``train.py`` builds it."""
    cfg = load_config("quickstart", [*SMALL, f"train.device={device}", *overrides])
    cfg.evaluation.knn.train_dataset = ""  # no online k-NN
    cfg = setup_config(argparse.Namespace(config=None, opts=[], output_dir=str(tmp_path)), cfg)
    seed_everything(int(cfg.train.seed))
    model = build_model(cfg, torch.device(device))
    model.train()
    return Trainer(cfg, model, torch.device(device), tmp_path)


def fixed_batches(cfg):
    """The first batch of the training stream, forever (a copy each time: ``Trainer.step`` pops keys)."""
    batch = next(iter(build_train_loader(cfg, build_train_dataset(cfg))))
    while True:
        yield dict(batch)


def train(trainer: Trainer, steps: int) -> tuple[list[dict[str, float]], int]:
    """Loss terms of each step, and how many steps the gradient scaler skipped (its scale backed off)."""
    batches, history, skipped = fixed_batches(trainer.cfg), [], 0
    for _ in range(steps):
        scale = trainer.scaler.get_scale() if trainer.scaler is not None else None
        losses, _ = trainer.step(batches, trainer.apply_schedules(trainer.iteration))
        trainer.iteration += 1
        history.append({name: float(value) for name, value in losses.items()})
        skipped += int(scale is not None and trainer.scaler.get_scale() < scale)
    return history, skipped


def assert_finite(history: list[dict[str, float]], model: torch.nn.Module) -> None:
    for record in history:
        assert all(math.isfinite(v) for v in record.values()), record
    for name, param in model.student.named_parameters():
        assert torch.isfinite(param).all(), name


def attn_backends(model) -> set[str]:
    return {
        block.attn.backend for role in ("student", "teacher") for block in getattr(model, role).backbone.iter_blocks()
    }


# ------------------------------------------------------------------ (a) xFormers against native attention
def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _nested_pass(model, crops, masks, weights=None):
    """bf16 autocast forward of [global, local] crops in one nested pass, backward of a random
    projection of every output; returns (outputs, weights, gradients by parameter name)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(crops[0].device.type, dtype=torch.bfloat16):
        groups = model.forward_features(crops, masks)
    outputs = [g[key].float() for g in groups for key in ("x_norm_clstoken", "x_norm_patchtokens")]
    weights = weights or [torch.randn_like(t) for t in outputs]
    sum((t * w).sum() for t, w in zip(outputs, weights)).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return [t.detach() for t in outputs], weights, grads


@pytest.mark.gpu
@pytest.mark.xformers
def test_xformers_matches_sdpa_on_nested_crops_bf16():
    device = torch.device("cuda")
    native = DinoVisionTransformer(
        img_size=64, patch_size=8, embed_dim=192, depth=3, num_heads=3, init_values=1.0, block_chunks=0
    ).to(device)
    native.set_attn_backend("sdpa")
    memeff = copy.deepcopy(native)
    memeff.set_attn_backend("xformers")
    crops = [torch.randn(4, 3, 64, 64, device=device), torch.randn(16, 3, 32, 32, device=device)]
    masks = [torch.rand(4, 64, device=device) < 0.3, None]  # iBOT-style masks on the global crops only

    ref_out, weights, ref_grads = _nested_pass(native.train(), crops, masks)
    out, _, grads = _nested_pass(memeff.train(), crops, masks, weights)

    for a, b in zip(out, ref_out, strict=True):
        assert a.shape == b.shape and _relative_error(a, b) < 2e-2
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        if grad.dim() == 2 and name.startswith("blocks."):  # every Linear weight of every block
            assert _relative_error(grad, ref_grads[name]) < 5e-2, name
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref_flat = torch.cat([ref_grads[n].flatten() for n in grads])
    assert torch.nn.functional.cosine_similarity(flat, ref_flat, dim=0) > 0.999


# ------------------------------------------------------------------ (b) one full step per backend
CUDA_BACKENDS = ["math", "sdpa", "varlen", pytest.param("xformers", marks=pytest.mark.xformers)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_training_step_per_backend_cuda_bf16(tmp_path, backend):
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16")
    overrides = [f"student.attn_backend={backend}", "compute_precision.autocast_dtype=bf16"]
    trainer = make_trainer(tmp_path, "cuda", *overrides, "student.drop_path_rate=0.2")  # subset stochastic depth
    assert trainer.autocast_dtype == torch.bfloat16 and trainer.scaler is None
    assert attn_backends(trainer.model) == {backend}
    history, _ = train(trainer, 2)
    assert_finite(history, trainer.model)
    assert next(trainer.model.student.parameters()).device.type == "cuda"


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_training_step_per_backend_cpu_fp32(tmp_path, backend):
    overrides = [f"student.attn_backend={backend}", "compute_precision.autocast_dtype=auto", "student.depth=2"]
    trainer = make_trainer(tmp_path, "cpu", *overrides, "student.drop_path_rate=0.2", "train.batch_size_per_gpu=4")
    assert trainer.autocast_dtype is None and trainer.scaler is None  # auto is fp32 on CPU
    assert attn_backends(trainer.model) == {backend}
    history, _ = train(trainer, 2)
    assert_finite(history, trainer.model)


# ------------------------------------------------------------------ (c) fp16 with the scaler, bf16
@pytest.mark.gpu
@pytest.mark.parametrize("dtype, steps", [("fp16", 30), ("bf16", 20)])
def test_mixed_precision_lowers_the_loss_on_a_fixed_batch(tmp_path, dtype, steps):
    if dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no bf16")
    trainer = make_trainer(tmp_path, "cuda", f"compute_precision.autocast_dtype={dtype}", *FIXED_OBJECTIVE)
    assert trainer.autocast_dtype == DTYPES[dtype]
    assert (trainer.scaler is not None) == (dtype == "fp16")  # compute_precision.grad_scaler: fp16 only
    history, skipped = train(trainer, steps)
    assert_finite(history, trainer.model)
    # fp16: the scaler starts at 2^16 and backs off while the scaled gradients overflow (about 14
    # steps in a CPU emulation of this run); the remaining steps must train.
    assert steps - skipped >= 10, f"{skipped} of {steps} steps skipped"
    first, last = history[0], history[-1]
    assert last["loss"] < 0.9 * first["loss"], (first, last)  # CPU emulation: 0.82 (bf16), 0.88 (fp16, 6 steps)
    assert sum(last[t] for t in CROSS_ENTROPIES) < sum(first[t] for t in CROSS_ENTROPIES)
