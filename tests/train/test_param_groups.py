"""Tests for dinov2.train.param_groups: layer-wise lr decay, weight-decay masks, group fusion."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.train.param_groups import (
    build_optimizer_param_groups,
    fuse_params_groups,
    get_params_groups_with_decay,
    get_vit_lr_decay_rate,
)

DEPTH = 3
RATE = 0.5
TOKENS = {"cls_token", "pos_embed", "mask_token", "register_tokens"}


class StandInHead(nn.Module):
    """A small head with an MLP and a weight-normed prototype layer named ``last_layer`` (its
    magnitude ``original0`` trained, as DINOHead's and the original's ``weight_g``)."""

    def __init__(self, dim=32, out=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 8))
        self.last_layer = weight_norm(nn.Linear(8, out, bias=False))

    def forward(self, x):
        return self.last_layer(self.mlp(x))


def make_student(block_chunks):
    backbone = DinoVisionTransformer(
        img_size=16,
        patch_size=8,
        embed_dim=32,
        depth=DEPTH,
        num_heads=2,
        init_values=1.0,
        block_chunks=block_chunks,
        num_register_tokens=2,
    )
    return nn.ModuleDict({"backbone": backbone, "dino_head": StandInHead(), "ibot_head": StandInHead()})


def expected_layer(name, chunked):
    """Layer id from the name, written independently of the code under test."""
    parts = name.split(".")
    if parts[0] != "backbone":
        return DEPTH + 1
    if parts[1] in TOKENS or parts[1] == "patch_embed":
        return 0
    if parts[1] == "blocks":
        return int(parts[3] if chunked else parts[2]) + 1
    return DEPTH + 1


def expected_no_wd(name, decay_tokens=True):
    """The original's rule (names ending in .bias or holding norm or gamma), plus the tokens when they are exempt."""
    leaf = name.split(".")[-1]
    is_norm = ".norm1." in name or ".norm2." in name or name.startswith("backbone.norm.")
    return leaf in ("bias", "gamma") or (leaf in TOKENS and not decay_tokens) or is_norm


@pytest.mark.parametrize("decay_tokens", [True, False])
@pytest.mark.parametrize("block_chunks", [0, 3])
def test_per_parameter_groups(block_chunks, decay_tokens):
    student = make_student(block_chunks)
    groups = get_params_groups_with_decay(
        student, lr_decay_rate=RATE, patch_embed_lr_mult=0.2, decay_tokens=decay_tokens
    )
    by_name = {g["name"]: g for g in groups}
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert set(by_name) == set(trainable)
    assert len(groups) == len(trainable)
    for name, group in by_name.items():
        assert group["params"] is trainable[name]
        expected = RATE ** (DEPTH + 1 - expected_layer(name, block_chunks > 0))
        if ".patch_embed." in name:
            expected *= 0.2
        assert group["lr_multiplier"] == pytest.approx(expected), name
        assert group["wd_multiplier"] == (0.0 if expected_no_wd(name, decay_tokens) else 1.0), name
        assert group["is_last_layer"] == (".last_layer." in name), name


@pytest.mark.parametrize("block_chunks", [0, 3])
def test_specific_multipliers(block_chunks):
    groups = get_params_groups_with_decay(make_student(block_chunks), lr_decay_rate=RATE)
    by_name = {g["name"]: g for g in groups}
    prefix = "backbone.blocks." + ("{i}.{i}." if block_chunks else "{i}.")
    for i in range(DEPTH):
        qkv = by_name[prefix.format(i=i) + "attn.qkv.weight"]
        assert qkv["lr_multiplier"] == pytest.approx(RATE ** (DEPTH - i))
        assert qkv["wd_multiplier"] == 1.0
        assert by_name[prefix.format(i=i) + "ls1.gamma"]["wd_multiplier"] == 0.0
        assert by_name[prefix.format(i=i) + "norm2.weight"]["wd_multiplier"] == 0.0
    for token in TOKENS:  # decayed by default, as in the original
        assert by_name[f"backbone.{token}"]["lr_multiplier"] == pytest.approx(RATE ** (DEPTH + 1))
        assert by_name[f"backbone.{token}"]["wd_multiplier"] == 1.0
    assert by_name["backbone.patch_embed.proj.weight"]["wd_multiplier"] == 1.0
    assert by_name["backbone.patch_embed.proj.bias"]["wd_multiplier"] == 0.0
    assert by_name["backbone.norm.weight"]["lr_multiplier"] == 1.0
    assert by_name["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    for leaf in ("original0", "original1"):  # magnitude and direction: last layer, decayed (the original's rules)
        last = by_name[f"dino_head.last_layer.parametrizations.weight.{leaf}"]
        assert last["is_last_layer"] and last["wd_multiplier"] == 1.0


def test_bare_backbone_and_head_alone():
    student = make_student(0)
    backbone_groups = get_params_groups_with_decay(student["backbone"], lr_decay_rate=RATE, patch_embed_lr_mult=0.2)
    by_name = {g["name"]: g for g in backbone_groups}
    assert by_name["blocks.0.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(RATE**3)
    assert by_name["patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.2 * RATE**4)
    head_groups = get_params_groups_with_decay(student["dino_head"], lr_decay_rate=RATE)
    assert all(g["lr_multiplier"] == 1.0 for g in head_groups)
    assert [g["is_last_layer"] for g in head_groups].count(True) == 2  # the prototypes: magnitude and direction


@pytest.mark.parametrize(
    ("name", "chunked", "layer"),
    [
        ("backbone.pos_embed", False, 0),
        ("backbone.patch_embed.proj.weight", False, 0),
        ("backbone._fsdp_wrapped_module.register_tokens", False, 0),
        ("blocks.3.attn.qkv.weight", False, 4),
        ("backbone._orig_mod.blocks.11.mlp.fc1.weight", False, 12),
        ("backbone.blocks.2.7.attn.qkv.weight", True, 8),
        ("backbone._fsdp_wrapped_module.blocks.1._checkpoint_wrapped_module.5.ls1.gamma", True, 6),
        ("backbone.norm.weight", False, 13),
        ("dino_head.mlp.0.weight", False, 13),
    ],
)
def test_lr_decay_rate_by_name(name, chunked, layer):
    assert get_vit_lr_decay_rate(name, 0.9, 12, chunked) == pytest.approx(0.9 ** (13 - layer))


def test_fusion_merges_equal_settings_and_keeps_every_param_once():
    student = make_student(3)
    groups = get_params_groups_with_decay(student, lr_decay_rate=RATE, patch_embed_lr_mult=0.2)
    fused = fuse_params_groups(groups)
    signatures = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in fused]
    assert len(set(signatures)) == len(fused)
    assert set(signatures) == {(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups}
    fused_ids = [id(p) for g in fused for p in g["params"]]
    trainable_ids = [id(p) for p in student.parameters() if p.requires_grad]
    assert sorted(fused_ids) == sorted(trainable_ids)
    assert sum(len(g["names"]) for g in fused) == len(groups)
    qkv_group = next(g for g in fused if "backbone.blocks.1.1.attn.qkv.weight" in g["names"])
    assert "backbone.blocks.1.1.mlp.fc2.weight" in qkv_group["names"]
    assert "backbone.blocks.1.1.attn.qkv.bias" not in qkv_group["names"]


def test_build_optimizer_param_groups_for_adamw():
    student = make_student(0)
    student["backbone"].mask_token.requires_grad_(False)  # frozen, as distillation freezes it
    modules = {key: student[key] for key in ("backbone", "dino_head", "ibot_head")}
    groups = build_optimizer_param_groups(modules, layerwise_decay=RATE, patch_embed_lr_mult=0.2)
    fused_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(fused_ids) == sorted(id(p) for p in student.parameters() if p.requires_grad)
    last = [g for g in groups if g["is_last_layer"]]
    assert len(last) == 1 and len(last[0]["params"]) == 4  # g and v of both heads
    assert "dino_head.last_layer.parametrizations.weight.original1" in last[0]["names"]
    assert not any("mask_token" in name for g in groups for name in g["names"])
    blocks0 = next(g for g in groups if "backbone.blocks.0.attn.qkv.weight" in g["names"])
    assert blocks0["lr_multiplier"] == pytest.approx(RATE**3)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    assert len(optimizer.param_groups) == len(groups)
    assert all("lr_multiplier" in g and "wd_multiplier" in g for g in optimizer.param_groups)
    frozen = student["backbone"].mask_token.detach().clone()
    g = student["dino_head"].last_layer.parametrizations.weight.original0.detach().clone()
    features = student["backbone"](torch.randn(2, 3, 16, 16))
    (student["dino_head"](features).sum() + student["ibot_head"](features).sum()).backward()
    optimizer.step()
    assert torch.equal(student["backbone"].mask_token, frozen)
    assert not torch.equal(student["dino_head"].last_layer.parametrizations.weight.original0, g)


@pytest.mark.parametrize("decay_tokens", [True, False])
def test_training_optimizer_follows_optim_decay_tokens(decay_tokens):
    """The training loop's optimizer reads ``optim.decay_tokens``: with it the tokens are decayed (the
    original's rule), without it they share the biases' zero weight-decay multiplier."""
    from types import SimpleNamespace

    from dinov2.train.loop import build_optimizer

    student = make_student(0)
    optim = SimpleNamespace(layerwise_decay=RATE, patch_embed_lr_mult=0.2, decay_tokens=decay_tokens,
                            adamw_beta1=0.9, adamw_beta2=0.999)  # fmt: skip
    optimizer = build_optimizer(SimpleNamespace(optim=optim), SimpleNamespace(student=student))
    wd_of = {name: g["wd_multiplier"] for g in optimizer.param_groups for name in g["names"]}
    for token in TOKENS:
        assert wd_of[f"backbone.{token}"] == (1.0 if decay_tokens else 0.0)
    assert wd_of["backbone.blocks.0.attn.qkv.bias"] == 0.0 and wd_of["backbone.blocks.0.attn.qkv.weight"] == 1.0


def test_changed_param_settings_names_the_parameters_a_checkpoint_overrides():
    """Loading an optimizer's state replaces its groups' multipliers with the saved ones: the helper the
    resume warns with lists exactly the parameters whose settings then differ from the config's."""
    from dinov2.train.param_groups import changed_param_settings, param_settings

    student = make_student(0)
    options = {"layerwise_decay": RATE, "patch_embed_lr_mult": 0.2}  # the tokens in a group of their own
    saved = torch.optim.AdamW(build_optimizer_param_groups(student, **options, decay_tokens=False))
    resumed = torch.optim.AdamW(build_optimizer_param_groups(student, **options))
    configured = param_settings(resumed)
    assert changed_param_settings(configured, resumed) == []
    resumed.load_state_dict(saved.state_dict())  # the tokens' group now carries the saved wd_multiplier 0
    changed = changed_param_settings(configured, resumed)
    tokens = ("cls_token", "pos_embed", "register_tokens", "mask_token")
    assert sorted(line.split(" ")[0] for line in changed) == sorted(f"backbone.{t}" for t in tokens)
    assert "'wd_multiplier': 0.0" in changed[0] and "(config: {'lr_multiplier'" in changed[0]
