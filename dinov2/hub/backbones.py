"""Released DINOv2 backbones: ``dinov2_vit{s,b,l,g}14`` and their ``_reg`` (4 registers) variants.

``weights`` is ``Weights.LVD142M`` or ``"LVD142M"`` (the official download), a local path
(``.pth`` or ``.safetensors``) or a URL; another name (``"IMAGENET1K"``, the classifiers' heads,
or a typo) is a ``ValueError`` listing these. Files are read with ``weights_only=True`` and loaded strictly
through :func:`dinov2.checkpoint.load_backbone_state_dict`, which also accepts training
checkpoints (``teacher.backbone.`` keys, chunked blocks, ``module.`` prefixes).
"""

from __future__ import annotations

import logging
import os
from enum import Enum
from pathlib import Path

from dinov2.checkpoint import load_backbone_state_dict, load_weights_file
from dinov2.checkpoint.io import expand_user, is_url
from dinov2.models.vision_transformer import ARCHS, DinoVisionTransformer

logger = logging.getLogger("dinov2")

DINOV2_BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"


class Weights(Enum):
    LVD142M = "LVD142M"


def model_names(arch_name: str, patch_size: int, num_register_tokens: int = 0) -> tuple[str, str]:
    """``("dinov2_vitl14", "dinov2_vitl14_reg4")``-style base and full names of a released model."""
    compact = arch_name.replace("_", "")[:4]  # vit_small -> vits, vit_giant2 -> vitg
    base = f"dinov2_{compact}{patch_size}"
    return base, base + (f"_reg{num_register_tokens}" if num_register_tokens else "")


# The released LVD-142M models: these architectures, patch 14, without registers or with 4.
RELEASED_ARCHS = ("vit_small", "vit_base", "vit_large", "vit_giant2")
RELEASED_PATCH_SIZE = 14
RELEASED_REGISTERS = (0, 4)


def check_released(arch_name: str, patch_size, num_register_tokens: int, what: str = "LVD-142M weights") -> None:
    """Raise ``ValueError`` naming the model unless official files exist for it (their URL is derived
    from these three settings; any other model's URL names no file)."""
    if arch_name in RELEASED_ARCHS and patch_size == RELEASED_PATCH_SIZE and num_register_tokens in RELEASED_REGISTERS:
        return
    _, full = model_names(arch_name, patch_size, num_register_tokens)
    raise ValueError(
        f"no released {what} for {full} (arch_name={arch_name!r}, patch_size={patch_size!r}, "
        f"num_register_tokens={num_register_tokens!r}): the official models are {', '.join(RELEASED_ARCHS)} with "
        f"patch_size {RELEASED_PATCH_SIZE} and {' or '.join(map(str, RELEASED_REGISTERS))} registers; pass "
        "pretrained=False for random weights, or weights=<a file or URL>"
    )


def _names_a_file(location: str) -> bool:
    """A URL or a path (with a suffix or a directory part, or one that exists), not a bare word."""
    path = Path(location)
    return is_url(location) or bool(path.suffix) or path.name != location or expand_user(location).exists()


def is_weight_set(weights, accepted: type[Enum]) -> bool:
    """True when ``weights`` names one of the ``accepted`` released weight sets (a member or its
    string, as the original's hub takes them), False for a path or URL. An enum member of another
    class counts by its value (the original package's ``Weights``, or this one's before an
    ``importlib.reload``). Another weight set's name (``"IMAGENET1K"`` for a backbone, as a string
    or an enum) or a bare word that names no file raises ``ValueError`` listing the accepted values."""
    names = [member.value for member in accepted]
    if (isinstance(weights, Enum) and weights.value in names) or (isinstance(weights, str) and weights in names):
        return True
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and _names_a_file(weights)):
        return False
    choices = ", ".join(f"{accepted.__module__}.{accepted.__name__}.{name} (or {name!r})" for name in names)
    raise ValueError(
        f"unsupported weights {weights!r}; accepted: {choices}, a local .pth / .safetensors path or an http(s) URL"
    )


def resolve_weights_location(weights, accepted: type[Enum], default_url: str) -> str:
    """``default_url`` for a released weight set of ``accepted``, else ``weights`` as a path or URL
    (:func:`is_weight_set` refuses anything else)."""
    return default_url if is_weight_set(weights, accepted) else os.fspath(weights)


def make_dinov2_model(
    *,
    arch_name: str = "vit_large",
    img_size: int = 518,
    patch_size: int = 14,
    init_values: float = 1.0,
    ffn_layer: str = "mlp",
    block_chunks: int = 0,
    num_register_tokens: int = 0,
    interpolate_antialias: bool = False,
    interpolate_offset: float = 0.1,
    pretrained: bool = True,
    weights=Weights.LVD142M,
    **kwargs,
) -> DinoVisionTransformer:
    """Build a backbone with the released models' settings and optionally load weights
    (``weights``: ``Weights.LVD142M`` or ``"LVD142M"``, a path or a URL; checked before the build)."""
    if arch_name not in ARCHS:
        raise ValueError(f"Unknown arch_name {arch_name!r}; valid architectures: {', '.join(ARCHS)}")
    base, full = model_names(arch_name, patch_size, num_register_tokens)
    if pretrained:
        if is_weight_set(weights, Weights):
            check_released(arch_name, patch_size, num_register_tokens)
        location = resolve_weights_location(weights, Weights, f"{DINOV2_BASE_URL}/{base}/{full}_pretrain.pth")
    model = ARCHS[arch_name](
        img_size=img_size,
        patch_size=patch_size,
        init_values=init_values,
        ffn_layer=ffn_layer,
        block_chunks=block_chunks,
        num_register_tokens=num_register_tokens,
        interpolate_antialias=interpolate_antialias,
        interpolate_offset=interpolate_offset,
        **kwargs,
    )
    if pretrained:
        report = load_backbone_state_dict(model, load_weights_file(location), source=location)
        logger.info("loaded %s backbone weights from %s (%s)", full, location, report)
    return model


# The released "_reg" models were trained with 4 registers, antialiased interpolation, no offset.
REGISTERS_KWARGS = {"num_register_tokens": 4, "interpolate_antialias": True, "interpolate_offset": 0.0}


def released_kwargs(arch_name: str, registers: bool, **overrides) -> dict:
    """Constructor settings of a released model (registers variant, SwiGLU for ViT-g), with the
    caller's ``overrides`` on top."""
    settings = dict(REGISTERS_KWARGS) if registers else {}
    if arch_name == "vit_giant2":
        settings["ffn_layer"] = "swiglufused"
    return {**settings, **overrides}


def _backbone(arch_name: str, registers: bool, doc: str):
    def entry(*, pretrained: bool = True, weights=Weights.LVD142M, **kwargs) -> DinoVisionTransformer:
        kwargs = released_kwargs(arch_name, registers, **kwargs)
        return make_dinov2_model(arch_name=arch_name, pretrained=pretrained, weights=weights, **kwargs)

    base, _ = model_names(arch_name, 14)
    entry.__name__ = entry.__qualname__ = base + ("_reg" if registers else "")
    entry.__doc__ = (
        f"{doc}. ``pretrained=False`` gives random weights; ``weights`` is ``Weights.LVD142M`` or "
        "``'LVD142M'`` (official download), a path (.pth / .safetensors) or a URL; other kwargs go to the model."
    )
    return entry


dinov2_vits14 = _backbone("vit_small", False, "ViT-S/14 (21M parameters), distilled from ViT-g/14 on LVD-142M")
dinov2_vitb14 = _backbone("vit_base", False, "ViT-B/14 (86M parameters), distilled from ViT-g/14 on LVD-142M")
dinov2_vitl14 = _backbone("vit_large", False, "ViT-L/14 (300M parameters), distilled from ViT-g/14 on LVD-142M")
dinov2_vitg14 = _backbone("vit_giant2", False, "ViT-g/14 (1.1B parameters, SwiGLU), pretrained on LVD-142M")
dinov2_vits14_reg = _backbone("vit_small", True, "ViT-S/14 with 4 registers")
dinov2_vitb14_reg = _backbone("vit_base", True, "ViT-B/14 with 4 registers")
dinov2_vitl14_reg = _backbone("vit_large", True, "ViT-L/14 with 4 registers")
dinov2_vitg14_reg = _backbone("vit_giant2", True, "ViT-g/14 with 4 registers (SwiGLU)")

BACKBONES = {
    fn.__name__: fn
    for fn in (
        dinov2_vits14, dinov2_vitb14, dinov2_vitl14, dinov2_vitg14,
        dinov2_vits14_reg, dinov2_vitb14_reg, dinov2_vitl14_reg, dinov2_vitg14_reg,
    )
}  # fmt: skip
