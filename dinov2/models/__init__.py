"""Backbone construction from the ``student`` section of a training config."""

from __future__ import annotations

from typing import Any

from dinov2.models.vision_transformer import (
    ARCHS,
    BlockChunk,
    DinoVisionTransformer,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

# Keys of the config's `student` section that shape the backbone, with their defaults.
_BACKBONE_KEYS = {
    "patch_size": 16,
    "layerscale": 1.0e-5,
    "ffn_layer": "mlp",
    "block_chunks": 0,
    "qkv_bias": True,
    "proj_bias": True,
    "ffn_bias": True,
    "num_register_tokens": 0,
    "interpolate_offset": 0.1,
    "interpolate_antialias": False,
    "attn_backend": "auto",
}

# Optional keys that override the architecture's width, depth and heads (small experiments).
_SHAPE_KEYS = ("embed_dim", "depth", "num_heads")


def build_model(args: Any, only_teacher: bool = False, img_size: int = 224):
    """Build backbones from a ``student``-style config section.

    Returns ``(student, teacher, embed_dim)``, or ``(teacher, embed_dim)`` with
    ``only_teacher``. The teacher is built without stochastic depth. ``arch`` may carry the
    original's ``_memeff`` suffix (the attention kernel is a setting here, not a class).
    """
    from dinov2.utils.config import select  # here, not at import: the hub models need no config stack

    arch = str(select(args, "arch", "")).removesuffix("_memeff")
    if arch not in ARCHS:
        raise ValueError(f"Unknown student.arch {arch!r}; valid architectures: {', '.join(ARCHS)}")
    kwargs = {key: select(args, key, default) for key, default in _BACKBONE_KEYS.items()}
    kwargs["init_values"] = kwargs.pop("layerscale")
    for key in _SHAPE_KEYS:  # optional overrides of the arch's shape (null: the arch's own)
        if select(args, key, None) is not None:
            kwargs[key] = int(select(args, key))
    kwargs["img_size"] = img_size
    teacher = ARCHS[arch](**kwargs)
    if only_teacher:
        return teacher, teacher.embed_dim
    student = ARCHS[arch](
        **kwargs,
        drop_path_rate=select(args, "drop_path_rate", 0.0),
        drop_path_uniform=select(args, "drop_path_uniform", False),
    )
    return student, teacher, student.embed_dim


def build_model_from_cfg(cfg: Any, only_teacher: bool = False):
    """``build_model(cfg.student, img_size=cfg.crops.global_crops_size)``."""
    return build_model(cfg.student, only_teacher=only_teacher, img_size=cfg.crops.global_crops_size)
