"""Behaviour of the backbone that a mutation audit found unpinned: the initial values (the model's
own ``init_weights`` and the seeded training initialisation), the architecture registry's published
shapes, the builder's defaults against the default config, and the early stop of
``get_intermediate_layers``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from dinov2.layers import DINOHead, LayerScale
from dinov2.models import ARCHS, DinoVisionTransformer, build_model
from dinov2.models.init import seeded_init_

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "ssl_default_config.yaml"


def _vit(**overrides) -> DinoVisionTransformer:
    kwargs = dict(img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4, init_values=0.25, block_chunks=0)
    kwargs.update(overrides)
    return DinoVisionTransformer(**kwargs)


def _check_recipe_values(model: DinoVisionTransformer, init_values: float) -> None:
    """The DINOv2 recipe's starting point, checked statistically against its stated std."""
    pos = model.pos_embed.detach()
    assert pos.numel() == 65 * 64
    assert 0.018 < pos.std().item() < 0.022  # trunc-normal, std 0.02 (4160 draws)
    cls = model.cls_token.detach()
    assert 0 < cls.abs().max().item() < 1e-5  # normal, std 1e-6: tiny but not zero
    registers = model.register_tokens.detach()
    assert 0 < registers.abs().max().item() < 1e-5
    assert torch.equal(model.mask_token.detach(), torch.zeros(1, 64))  # iBOT's mask token starts at zero
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 2 * 4  # qkv, proj, fc1, fc2 per block
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert 0.019 < weights.std().item() < 0.021
    for linear in linears:
        assert torch.equal(linear.bias.detach(), torch.zeros_like(linear.bias))
    scales = [m for m in model.modules() if isinstance(m, LayerScale)]
    assert len(scales) == 4
    for scale in scales:
        assert torch.equal(scale.gamma.detach(), torch.full((64,), init_values))
    for norm in (m for m in model.modules() if isinstance(m, nn.LayerNorm)):
        assert torch.equal(norm.weight.detach(), torch.ones(64)) and torch.equal(norm.bias.detach(), torch.zeros(64))


def test_a_fresh_model_starts_at_the_recipe_values():
    torch.manual_seed(0)
    _check_recipe_values(_vit(num_register_tokens=2), init_values=0.25)


def test_seeded_init_gives_the_recipe_values_and_pytorch_defaults_for_the_rest():
    torch.manual_seed(0)
    model = _vit(num_register_tokens=2)
    with torch.no_grad():  # a model whose values were moved away from the start
        for p in model.parameters():
            p.fill_(0.5)
    seeded_init_(model, seed=11)
    _check_recipe_values(model, init_values=0.25)
    # The patch convolution as PyTorch initialises it: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    # with fan_in = in_chans * patch * patch (kaiming-uniform with a = sqrt(5) reduces to that bound).
    bound = 1 / math.sqrt(3 * 8 * 8)
    for tensor in (model.patch_embed.proj.weight, model.patch_embed.proj.bias):
        values = tensor.detach().abs()
        assert values.max().item() <= bound and values.max().item() > 0.8 * bound


def test_seeded_init_of_a_dino_head_has_unit_prototype_magnitudes_and_zero_biases():
    head = DINOHead(in_dim=16, out_dim=12, nlayers=3, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        for p in head.parameters():
            p.fill_(0.3)
    seeded_init_(head, seed=5)
    weight = head.last_layer.parametrizations.weight
    assert torch.equal(weight.original0.detach(), torch.ones(12, 1))  # g = 1: cosine scores
    v = weight.original1.detach()
    assert v.abs().max().item() <= 1 / math.sqrt(8) and v.std().item() > 0.1  # PyTorch's Linear default
    for linear in (m for m in head.mlp if isinstance(m, nn.Linear)):
        assert torch.equal(linear.bias.detach(), torch.zeros_like(linear.bias))


def test_seeded_init_draws_each_value_from_the_key_the_key_fn_gives():
    """The SSL meta-architecture maps teacher names to student names so both start equal."""
    model = nn.ModuleDict({"student": nn.Linear(6, 5), "teacher": nn.Linear(6, 5), "other": nn.Linear(6, 5)})
    seeded_init_(model, seed=2, key_fn=lambda name: name.replace("teacher.", "student."))
    assert torch.equal(model["teacher"].weight, model["student"].weight)
    assert not torch.equal(model["other"].weight, model["student"].weight)  # other names: other draws
    again = nn.ModuleDict({"student": nn.Linear(6, 5)})
    seeded_init_(again, seed=2)
    assert torch.equal(again["student"].weight, model["student"].weight)  # the value depends on (seed, key) only


# Width, depth, heads of the published DINOv2 backbones (paper, Table 17 / model card); ViT-Ti as DeiT-Tiny.
PUBLISHED = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_architecture_registry_has_the_published_shapes(arch):
    """The head count shapes no parameter, so a wrong one would load an official checkpoint
    strictly and silently compute something else."""
    width, depth, heads = PUBLISHED[arch]
    with torch.device("meta"):
        model = ARCHS[arch](patch_size=14, img_size=28)
    blocks = list(model.iter_blocks())
    assert (model.embed_dim, len(blocks)) == (width, depth)
    assert all(b.attn.num_heads == heads and b.attn.head_dim * heads == width for b in blocks)
    assert blocks[0].mlp.fc1.out_features == 4 * width


def test_registry_overrides_replace_the_architecture_shape():
    with torch.device("meta"):
        model = ARCHS["vit_small"](patch_size=8, img_size=16, depth=3, embed_dim=96, num_heads=2)
    assert model.embed_dim == 96 and len(list(model.iter_blocks())) == 3
    assert next(model.iter_blocks()).attn.num_heads == 2


def test_builder_defaults_match_the_default_config():
    """A ``student`` section that names only the arch builds the backbone the default config describes."""
    student = OmegaConf.load(DEFAULT_CONFIG).student
    shape = {"arch": "vit_tiny", "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
    full = OmegaConf.merge(student, shape)
    minimal = OmegaConf.create(shape)
    with torch.device("meta"):
        from_full, _ = build_model(full, only_teacher=True, img_size=32)
        from_minimal, _ = build_model(minimal, only_teacher=True, img_size=32)
    assert from_minimal.embed_dim == 32 and len(list(from_minimal.iter_blocks())) == 2  # the shape overrides
    assert next(from_minimal.iter_blocks()).attn.num_heads == 2
    shapes = {k: tuple(v.shape) for k, v in from_full.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in from_minimal.state_dict().items()} == shapes
    assert ("blocks.0.attn.qkv.bias" in shapes) == bool(student.qkv_bias)
    assert ("blocks.0.ls1.gamma" in shapes) == bool(student.layerscale)
    for model in (from_full, from_minimal):
        assert model.interpolate_offset == student.interpolate_offset
        assert model.interpolate_antialias == student.interpolate_antialias
        assert model.num_register_tokens == student.num_register_tokens
        gammas = [m.init_values for m in model.modules() if isinstance(m, LayerScale)]
        assert gammas and all(g == student.layerscale for g in gammas)


def test_intermediate_layers_stop_after_the_last_requested_block():
    torch.manual_seed(0)
    model = _vit(img_size=32, depth=4).eval()
    ran = []
    for index, block in enumerate(model.iter_blocks()):
        block.register_forward_hook(lambda module, args, out, index=index: ran.append(index))
    with torch.no_grad():
        model.get_intermediate_layers(torch.randn(1, 3, 32, 32), n=[0, 1])
    assert ran == [0, 1]  # blocks 2 and 3 cannot change the answer, so they are not run
