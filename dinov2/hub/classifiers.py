"""Backbones with linear ImageNet-1k classifiers: ``dinov2_vit{s,b,l,g}14[_reg]_lc``.

A head file holds ``{"weight": (C, (1 + layers) * D), "bias": (C,)}``: a linear layer on
the concatenated CLS tokens of the last ``layers`` blocks and the average of the last block's
patch tokens. The released ImageNet-1k heads (C = 1000) exist for ``layers`` 1 and 4; the
linear-probing evaluation saves its best classifier in this format for any ``--n-last-blocks``.
"""

from __future__ import annotations

import logging
import os
from enum import Enum

import torch
from torch import nn

from dinov2.checkpoint import check_state_dict, load_weights_file
from dinov2.hub import backbones
from dinov2.hub.backbones import DINOV2_BASE_URL, is_weight_set, model_names
from dinov2.hub.backbones import Weights as BackboneWeights

logger = logging.getLogger("dinov2")


class ClassifierWeights(Enum):
    IMAGENET1K = "IMAGENET1K"


# The original's name for the heads' weight sets: ``dinov2.hub.classifiers.Weights.IMAGENET1K``.
Weights = ClassifierWeights


def linear_head_url(arch_name: str, patch_size: int, num_register_tokens: int, layers: int) -> str:
    base, full = model_names(arch_name, patch_size, num_register_tokens)
    return f"{DINOV2_BASE_URL}/{base}/{full}_linear{layers if layers == 4 else ''}_head.pth"


# The released linear heads were trained on the CLS tokens of the last 1 or 4 blocks.
RELEASED_HEAD_LAYERS = (1, 4)


def _check_layers(layers) -> int:
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise ValueError(f"layers must be a positive int (the number of last blocks' CLS tokens), got {layers!r}")
    return layers


class LinearClassifierWrapper(nn.Module):
    """``backbone`` + linear head on ``[cls_1, ..., cls_layers, mean(patch tokens)]``."""

    def __init__(self, *, backbone: nn.Module, linear_head: nn.Linear, layers: int = 4) -> None:
        super().__init__()
        self.layers = _check_layers(layers)
        self.backbone = backbone
        self.linear_head = linear_head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.layers == 1:
            out = self.backbone.forward_features(x)
            return torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1)], dim=1)
        outputs = self.backbone.get_intermediate_layers(x, n=self.layers, return_class_token=True)
        class_tokens = [cls for _, cls in outputs]
        return torch.cat([*class_tokens, outputs[-1][0].mean(dim=1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_head(self.features(x))


def make_dinov2_linear_classifier(
    *,
    arch_name: str,
    registers: bool = False,
    layers: int = 4,
    pretrained: bool = True,
    weights=ClassifierWeights.IMAGENET1K,
    backbone_weights=BackboneWeights.LVD142M,
    num_classes: int = 1000,
    **kwargs,
) -> LinearClassifierWrapper:
    """Backbone plus a linear head on its last ``layers`` CLS tokens and mean patch token.

    ``layers`` is 1 or 4 for the official heads; a head file of one's own (the linear probe's
    ``linear_head_best.pth`` for ``--n-last-blocks n``) takes ``layers=n``, any n up to the depth.

    The backbone is built with the released settings of ``arch_name`` (``registers``: the 4-register
    variant; SwiGLU for ``vit_giant2``; :func:`~dinov2.hub.backbones.released_kwargs`), the same as
    the ``dinov2_*_lc`` entry points; ``kwargs`` override them and go to its constructor. With
    ``pretrained``, ``backbone_weights`` and ``weights`` (the head) are each an official weight-set
    name (``BackboneWeights.LVD142M`` / ``"LVD142M"`` and ``Weights.IMAGENET1K`` / ``"IMAGENET1K"``
    respectively; downloaded), a local path or a URL, checked before anything is built or
    downloaded; the defaults are the official LVD-142M backbone and its ImageNet-1k head. A head
    trained on another backbone (such as ``linear_head_best.pth`` of the linear probe) needs that
    backbone as ``backbone_weights``.
    """
    _check_layers(layers)  # before any download
    official_head = pretrained and is_weight_set(weights, ClassifierWeights)
    official_backbone = pretrained and is_weight_set(backbone_weights, BackboneWeights)
    if official_head and layers not in RELEASED_HEAD_LAYERS:
        raise ValueError(
            f"the released linear heads use layers 1 or 4, got layers={layers}; pass weights=<your head file> "
            "for a head trained on another number of blocks"
        )
    if official_backbone and not official_head:
        logger.warning(
            "linear head %s goes on the official %s backbone (backbone_weights=%s); a head from the linear "
            "probe of another backbone needs backbone_weights=<that backbone's weights>", weights, arch_name,
            backbone_weights,
        )  # fmt: skip
    settings = backbones.released_kwargs(arch_name, registers, **kwargs)
    if official_head:
        released = (settings.get("patch_size", 14), settings.get("num_register_tokens", 0))  # the builder defaults
        backbones.check_released(arch_name, *released, what="ImageNet-1k linear head")
    backbone = backbones.make_dinov2_model(
        arch_name=arch_name, pretrained=pretrained, weights=backbone_weights, **settings
    )
    depth = getattr(backbone, "n_blocks", layers)
    if layers > depth:
        raise ValueError(f"layers={layers} exceeds the backbone's depth ({depth} blocks)")
    head = nn.Linear((1 + layers) * backbone.embed_dim, num_classes)
    if pretrained:
        default = linear_head_url(arch_name, backbone.patch_size, backbone.num_register_tokens, layers)
        location = default if official_head else os.fspath(weights)
        state = load_weights_file(location)
        check_state_dict(head, state, source=location)
        head.load_state_dict(state, strict=True)
    return LinearClassifierWrapper(backbone=backbone, linear_head=head, layers=layers)


def _lc(arch_name: str, registers: bool, doc: str):
    def entry(*, layers: int = 4, pretrained: bool = True, weights=ClassifierWeights.IMAGENET1K, **kwargs):
        return make_dinov2_linear_classifier(
            arch_name=arch_name, registers=registers, layers=layers, pretrained=pretrained, weights=weights, **kwargs
        )

    base, _ = model_names(arch_name, 14)
    entry.__name__ = entry.__qualname__ = f"{base}{'_reg' if registers else ''}_lc"
    entry.__doc__ = (
        f"{doc} with a linear ImageNet-1k head. ``layers``: 1 or 4 (official heads; any n for a head "
        "file of one's own); ``weights``: the head, ``Weights.IMAGENET1K`` / ``'IMAGENET1K'`` (official), "
        "a path or a URL; ``backbone_weights``: the backbone file; ``pretrained=False``: random weights."
    )
    return entry


dinov2_vits14_lc = _lc("vit_small", False, "ViT-S/14")
dinov2_vitb14_lc = _lc("vit_base", False, "ViT-B/14")
dinov2_vitl14_lc = _lc("vit_large", False, "ViT-L/14")
dinov2_vitg14_lc = _lc("vit_giant2", False, "ViT-g/14")
dinov2_vits14_reg_lc = _lc("vit_small", True, "ViT-S/14 with registers")
dinov2_vitb14_reg_lc = _lc("vit_base", True, "ViT-B/14 with registers")
dinov2_vitl14_reg_lc = _lc("vit_large", True, "ViT-L/14 with registers")
dinov2_vitg14_reg_lc = _lc("vit_giant2", True, "ViT-g/14 with registers")

CLASSIFIERS = {
    fn.__name__: fn
    for fn in (
        dinov2_vits14_lc, dinov2_vitb14_lc, dinov2_vitl14_lc, dinov2_vitg14_lc,
        dinov2_vits14_reg_lc, dinov2_vitb14_reg_lc, dinov2_vitl14_reg_lc, dinov2_vitg14_reg_lc,
    )
}  # fmt: skip
