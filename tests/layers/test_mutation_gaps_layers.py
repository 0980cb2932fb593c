"""Behaviour of the layers that a mutation audit found unpinned: the plain (non-nested) attention
forward, per-sample stochastic depth inside a block, the bias switches, dropout, LayerScale's
in-place mode and reset, the DINO head's half-precision normalisation and initialisation, and the
patch embedding's rectangular grids and norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinov2.layers import Attention, Block, DINOHead, LayerScale, Mlp, PatchEmbed, SwiGLUFFN
from dinov2.layers.block import SUBSET_DROP_PATH_THRESHOLD


def _naive_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Multi-head self-attention written out: qkv laid out as (3, heads, head_dim) along the channels."""
    batch, tokens, dim = x.shape
    heads, head_dim = attn.num_heads, dim // attn.num_heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = (qkv[..., i * dim : (i + 1) * dim].reshape(batch, tokens, heads, head_dim) for i in range(3))
    out = torch.zeros(batch, tokens, heads, head_dim, dtype=x.dtype)
    for h in range(heads):
        scores = q[:, :, h] @ k[:, :, h].transpose(1, 2) / head_dim**0.5
        out[:, :, h] = scores.softmax(dim=-1) @ v[:, :, h]
    return out.reshape(batch, tokens, dim) @ attn.proj.weight.T + attn.proj.bias


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_plain_attention_forward_is_multi_head_attention(backend):
    torch.manual_seed(0)
    attn = Attention(16, num_heads=4, qkv_bias=True, backend=backend).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = _naive_attention(attn, x)
    torch.testing.assert_close(attn(x), expected)
    nested = attn.forward_nested(x.reshape(-1, 16), [(2, 5)])  # the path the blocks use
    torch.testing.assert_close(nested.reshape(2, 5, 16), expected)


@pytest.mark.parametrize("branch", ["attn", "ffn"])
def test_small_drop_rate_drops_whole_samples_of_each_branch(branch):
    """Below the subset threshold each branch has its own per-sample mask: with the other branch
    silenced (its LayerScale at zero) a training pass gives each sample either x (dropped) or
    x + f(x) / (1 - p) (kept), with about p of the samples dropped."""
    rate = 0.1
    assert rate <= SUBSET_DROP_PATH_THRESHOLD
    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2, qkv_bias=True, init_values=0.5, drop_path=rate)
    with torch.no_grad():
        (block.ls2 if branch == "attn" else block.ls1).gamma.zero_()
    x = torch.randn(400, 3, 16)
    with torch.no_grad():
        full = block.eval()(x) - x  # f(x), every sample kept, unscaled
        got = block.train()(x) - x
    dropped = got.flatten(1).abs().amax(1) == 0
    torch.testing.assert_close(got[~dropped], full[~dropped] / (1 - rate))
    assert 15 < int(dropped.sum()) < 70  # binomial(400, 0.1): mean 40, sd 6


def test_bias_switches_remove_the_biases():
    block = Block(dim=16, num_heads=2, qkv_bias=False, proj_bias=False, ffn_bias=False)
    assert block.attn.qkv.bias is None and block.attn.proj.bias is None
    assert block.mlp.fc1.bias is None and block.mlp.fc2.bias is None
    swiglu = SwiGLUFFN(16, 64, bias=False)
    assert swiglu.w12.bias is None and swiglu.w3.bias is None
    for nlayers in (1, 3):
        head = DINOHead(16, 8, nlayers=nlayers, hidden_dim=12, bottleneck_dim=4, mlp_bias=False)
        assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Linear))


def test_mlp_dropout_acts_in_training_only():
    torch.manual_seed(0)
    mlp = Mlp(8, 32, drop=0.5)
    x = torch.randn(64, 8)
    with torch.no_grad():
        plain = mlp.fc2(mlp.act(mlp.fc1(x)))
        torch.testing.assert_close(mlp.eval()(x), plain)
        assert not torch.allclose(mlp.train()(x), plain)


def test_layer_scale_in_place_and_reset():
    scale = LayerScale(4, init_values=0.5, inplace=True)
    x = torch.ones(2, 4)
    out = scale(x)
    assert out.data_ptr() == x.data_ptr() and torch.equal(x, torch.full((2, 4), 0.5))
    with torch.no_grad():
        scale.gamma.fill_(3.0)
    scale.reset_parameters()
    assert torch.equal(scale.gamma.detach(), torch.full((4,), 0.5))


def test_dino_head_in_half_precision_maps_a_zero_vector_to_zero_scores():
    """1e-12 underflows to 0 in float16, so a zero bottleneck vector would become 0/0 = NaN."""
    head = DINOHead(8, 4, nlayers=1, bottleneck_dim=4).half()
    with torch.no_grad():
        head.mlp.weight.zero_()
        scores = head(torch.randn(3, 8).half())
    assert torch.isfinite(scores).all() and torch.equal(scores, torch.zeros_like(scores))


def test_dino_head_mlp_starts_truncated_normal_with_zero_biases():
    torch.manual_seed(0)
    head = DINOHead(64, 8, nlayers=3, hidden_dim=128, bottleneck_dim=32)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.detach().flatten() for m in linears])
    assert 0.019 < weights.std().item() < 0.021 and weights.abs().max().item() <= 2.0
    assert all(torch.equal(m.bias.detach(), torch.zeros_like(m.bias)) for m in linears)


def test_rectangular_patch_grid_keeps_rows_and_columns_apart():
    torch.manual_seed(0)
    embed = PatchEmbed(img_size=(16, 48), patch_size=(8, 4), in_chans=1, embed_dim=5)
    assert embed.patches_resolution == (2, 12) and embed.num_patches == 24
    x = torch.randn(2, 1, 16, 48)
    tokens = embed(x)
    # Token r * columns + c is the patch at row r, column c: the convolution over that window.
    for r, c in [(0, 0), (0, 11), (1, 3), (1, 11)]:
        patch = x[:, :, 8 * r : 8 * r + 8, 4 * c : 4 * c + 4]
        expected = (patch.flatten(1) @ embed.proj.weight.flatten(1).T) + embed.proj.bias
        torch.testing.assert_close(tokens[:, r * 12 + c], expected)
    grid = PatchEmbed(img_size=(16, 48), patch_size=(8, 4), in_chans=1, embed_dim=5, flatten_embedding=False)
    grid.load_state_dict(embed.state_dict())
    spatial = grid(x)
    assert spatial.shape == (2, 2, 12, 5)
    torch.testing.assert_close(spatial.reshape(2, 24, 5), tokens)


def test_patch_embed_norm_layer_normalises_each_token():
    embed = PatchEmbed(img_size=16, patch_size=8, in_chans=3, embed_dim=6, norm_layer=nn.LayerNorm)
    tokens = embed(torch.randn(2, 3, 16, 16))
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(tokens.var(-1, unbiased=False), torch.ones(2, 4), atol=1e-3, rtol=0)
