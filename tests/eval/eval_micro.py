"""The micro ViT of the evaluation tests (dim 32, depth 2, patch 8, 32 px), importable from spawned ranks.

It is selected with config overrides, so entry points build it from ``opts`` like any architecture.
LayerScale starts at 1 so that a random backbone gives well-spread features (at the training
default of 1e-5 the random blocks barely move the tokens and features nearly coincide).
"""

from __future__ import annotations

from dinov2.models import build_model
from dinov2.utils.config import load_config

MICRO_OPTS = [
    "student.arch=vit_small", "student.embed_dim=32", "student.depth=2", "student.num_heads=2",
    "student.patch_size=8", "student.layerscale=1.0", "crops.global_crops_size=32",
]  # fmt: skip


def micro_vit(extra_opts=()):
    """A random micro ViT built from the overrides (plus ``extra_opts``), in training mode."""
    cfg = load_config(None, [*MICRO_OPTS, *extra_opts])
    model, _ = build_model(cfg.student, only_teacher=True, img_size=cfg.crops.global_crops_size)
    return model
