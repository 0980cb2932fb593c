"""Optimizer parameter groups as the training loop builds them: gaps found by a mutation audit.

The expected weight-decay rule is written from module types (a parameter of a LayerNorm or a
LayerScale, or a bias, is not decayed), independently of the name-based code under test.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch import nn

from dinov2.layers import DINOHead
from dinov2.layers.layer_scale import LayerScale
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.train.loop import build_optimizer
from dinov2.train.param_groups import get_params_groups_with_decay


def make_student() -> nn.ModuleDict:
    backbone = DinoVisionTransformer(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, init_values=1.0, num_register_tokens=1
    )
    head = DINOHead(in_dim=32, out_dim=16, hidden_dim=24, bottleneck_dim=8)
    return nn.ModuleDict({"backbone": backbone, "dino_head": head})


def expected_wd(module: nn.Module) -> dict[str, float]:
    """``{parameter name: wd multiplier}`` from the module types (tokens decayed, the original's rule)."""
    wanted = {}
    for module_name, sub in module.named_modules():
        for leaf, _ in sub.named_parameters(recurse=False):
            name = f"{module_name}.{leaf}" if module_name else leaf
            exempt = isinstance(sub, (nn.LayerNorm, LayerScale)) or leaf == "bias"
            wanted[name] = 0.0 if exempt else 1.0
    return wanted


def test_the_training_optimizer_exempts_every_norm_from_weight_decay():
    """The loop builds the groups module by module (``backbone``, heads), so the backbone's own
    parameter names start at ``norm.``/``blocks.``: the final norm must be exempt as the block norms are."""
    student = make_student()
    optim = SimpleNamespace(layerwise_decay=0.9, patch_embed_lr_mult=0.2, decay_tokens=True,
                            adamw_beta1=0.9, adamw_beta2=0.999)  # fmt: skip
    optimizer = build_optimizer(SimpleNamespace(optim=optim), SimpleNamespace(student=student))
    got = {name: g["wd_multiplier"] for g in optimizer.param_groups for name in g["names"]}
    wanted = expected_wd(student)
    assert got == wanted
    # the comparison covers the final norm, the block norms, LayerScale and decayed weights
    assert got["backbone.norm.weight"] == got["backbone.norm.bias"] == 0.0
    assert got["backbone.blocks.0.1.norm2.weight"] == got["backbone.blocks.0.0.ls1.gamma"] == 0.0
    assert got["backbone.blocks.0.0.attn.qkv.weight"] == got["backbone.cls_token"] == 1.0


@pytest.mark.parametrize("part", ["backbone", "dino_head"])
def test_groups_of_a_bare_module_follow_the_same_rule(part):
    module = make_student()[part]
    got = {g["name"]: g["wd_multiplier"] for g in get_params_groups_with_decay(module, lr_decay_rate=0.9)}
    assert got == expected_wd(module)
    assert 0.0 in got.values() and 1.0 in got.values()
