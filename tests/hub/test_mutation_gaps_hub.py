"""Gaps found by mutating dinov2/hub: caller overrides win over the released settings, ViT-g's fused
SwiGLU, random-init LayerScale of 1, entry-point names, the classifiers' default 4 layers, and no
warning for the official head on the official backbone."""

from __future__ import annotations

import logging

import torch

import hubconf
from dinov2.hub import backbones, classifiers
from dinov2.layers import SwiGLUFFNFused

TINY = {"depth": 1, "img_size": 28}


def test_caller_kwargs_override_the_released_settings():
    with torch.device("meta"):
        reg = hubconf.dinov2_vits14_reg(pretrained=False, num_register_tokens=2, interpolate_offset=0.1, **TINY)
        giant = hubconf.dinov2_vitg14(pretrained=False, ffn_layer="mlp", **TINY)
    assert reg.num_register_tokens == 2 and reg.interpolate_offset == 0.1 and reg.interpolate_antialias is True
    assert hasattr(giant.blocks[0].mlp, "fc1")


def test_vitg_uses_the_fused_swiglu_module():
    with torch.device("meta"):
        for entry in (hubconf.dinov2_vitg14, hubconf.dinov2_vitg14_reg):
            assert isinstance(entry(pretrained=False, **TINY).blocks[0].mlp, SwiGLUFFNFused)


def test_random_weights_start_with_layerscale_one():
    model = hubconf.dinov2_vits14(pretrained=False, **TINY)
    for gamma in (model.blocks[0].ls1.gamma, model.blocks[0].ls2.gamma):
        assert torch.equal(gamma.detach(), torch.ones(384))


def test_entry_point_tables_are_keyed_by_their_hubconf_names():
    assert sorted(backbones.BACKBONES) == sorted(f"dinov2_vit{s}14{r}" for s in "sblg" for r in ("", "_reg"))
    assert sorted(classifiers.CLASSIFIERS) == sorted(f"dinov2_vit{s}14{r}_lc" for s in "sblg" for r in ("", "_reg"))
    for table in (backbones.BACKBONES, classifiers.CLASSIFIERS):
        for name, fn in table.items():
            assert getattr(hubconf, name) is fn


def test_classifier_entry_points_default_to_four_layers():
    with torch.device("meta"):
        model = hubconf.dinov2_vits14_lc(pretrained=False, depth=4, img_size=28)
    assert model.layers == 4 and model.linear_head.in_features == 5 * 384


def test_official_head_on_official_backbone_does_not_warn(monkeypatch, caplog):
    state = backbones.dinov2_vits14(pretrained=False, **TINY).state_dict()

    def fake_load(location):
        return state if "pretrain" in str(location) else {"weight": torch.zeros(1000, 768), "bias": torch.zeros(1000)}

    monkeypatch.setattr(backbones, "load_weights_file", fake_load)
    monkeypatch.setattr(classifiers, "load_weights_file", fake_load)
    with caplog.at_level(logging.WARNING, logger="dinov2"):
        hubconf.dinov2_vits14_lc(layers=1, **TINY)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
