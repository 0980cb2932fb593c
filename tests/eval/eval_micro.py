"""The micro ViT of the evaluation tests (dim 32, depth 2, patch 8), importable from spawned ranks too."""

from __future__ import annotations

from dinov2.models.vision_transformer import DinoVisionTransformer

MICRO_ARCH = "vit_micro_test"
MICRO_OPTS = [f"student.arch={MICRO_ARCH}", "student.patch_size=8", "crops.global_crops_size=32"]


def micro_arch_builder(patch_size: int = 8, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """An ``ARCHS``-style builder: the config supplies patch size, registers, image size, ..."""
    kwargs.update(patch_size=patch_size, num_register_tokens=num_register_tokens)
    return DinoVisionTransformer(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, **kwargs)


def micro_vit(**kwargs) -> DinoVisionTransformer:
    """A random micro ViT for 32 px images."""
    return micro_arch_builder(**{"img_size": 32, **kwargs})
