import re

import pytest
import torch
from omegaconf import OmegaConf

from dinov2.checkpoint import adapt_backbone_state_dict
from dinov2.models import DinoVisionTransformer, build_model_from_cfg


def _vit(**overrides):
    kwargs = dict(img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=4, init_values=0.5, block_chunks=0)
    kwargs.update(overrides)
    return DinoVisionTransformer(**kwargs).eval()


def _manual_forward(model, x, masks=None):
    """Blocks applied one by one, outside the model's own loop."""
    tokens = model.prepare_tokens_with_masks(x, masks)
    states = []
    for block in model.iter_blocks():
        tokens = block(tokens)
        states.append(tokens)
    return states


@pytest.mark.parametrize("registers", [0, 2])
def test_output_dict_shapes_and_split(registers):
    model = _vit(num_register_tokens=registers)
    out = model.forward_features(torch.randn(2, 3, 32, 48))
    assert out["x_norm_clstoken"].shape == (2, 64)
    assert out["x_norm_regtokens"].shape == (2, registers, 64)
    assert out["x_norm_patchtokens"].shape == (2, 4 * 6, 64)
    assert out["x_prenorm"].shape == (2, 1 + registers + 24, 64)
    expected = model.norm(out["x_prenorm"])
    torch.testing.assert_close(out["x_norm_clstoken"], expected[:, 0])
    torch.testing.assert_close(out["x_norm_patchtokens"], expected[:, 1 + registers :])
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64)  # identity head on the CLS token


def test_mask_token_replaces_exactly_the_masked_patches():
    model = _vit()
    with torch.no_grad():
        model.mask_token.normal_()
    x = torch.randn(1, 3, 32, 32)
    masks = torch.zeros(1, 16, dtype=torch.bool)
    masks[0, [0, 5, 15]] = True
    tokens = model.prepare_tokens_with_masks(x, masks)
    pos = model.pos_embed
    patches = model.patch_embed(x)
    for i in range(16):
        source = model.mask_token[0] if masks[0, i] else patches[0, i]
        torch.testing.assert_close(tokens[0, 1 + i], source + pos[0, 1 + i])

    # Image content under a masked patch cannot change the output; under an unmasked one it does.
    edited = x.clone()
    edited[..., :8, :8] += 5.0  # patch 0 (masked)
    same = model.forward_features(edited, masks=masks)["x_norm_clstoken"]
    torch.testing.assert_close(same, model.forward_features(x, masks=masks)["x_norm_clstoken"])
    edited[..., :8, 8:16] += 5.0  # patch 1 (not masked)
    assert not torch.allclose(model.forward_features(edited, masks=masks)["x_norm_clstoken"], same)


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match="masks must have shape"):
        _vit().forward_features(torch.randn(2, 3, 32, 32), masks=torch.zeros(2, 15, dtype=torch.bool))


@pytest.mark.parametrize("size", [(32, 32), (48, 48), (16, 40), (64, 24)])
@pytest.mark.parametrize("offset", [0.1, 0.0])
def test_position_interpolation_shapes(size, offset):
    model = _vit(interpolate_offset=offset)
    x = torch.randn(1, 3, *size)
    tokens = model.prepare_tokens_with_masks(x)
    assert tokens.shape == (1, 1 + (size[0] // 8) * (size[1] // 8), 64)
    out = model.get_intermediate_layers(x, n=1, reshape=True)[0]
    assert out.shape == (1, 64, size[0] // 8, size[1] // 8)


def test_position_interpolation_native_identity_and_constant_field():
    model = _vit()
    x = torch.zeros(1, 17, 64)
    assert torch.equal(model.interpolate_pos_encoding(x, 32, 32), model.pos_embed)
    with torch.no_grad():
        model.pos_embed[:, 1:] = 0.7  # a constant grid stays constant under bicubic resampling
    resized = model.interpolate_pos_encoding(x, 56, 40)
    assert resized.shape == (1, 1 + 7 * 5, 64)
    torch.testing.assert_close(resized[:, 1:], torch.full_like(resized[:, 1:], 0.7))
    torch.testing.assert_close(resized[:, 0], model.pos_embed[:, 0])


@pytest.mark.parametrize("size", [(30, 32), (32, 33)])
def test_size_not_multiple_of_patch_is_a_clear_error(size):
    with pytest.raises(ValueError, match=f"{size[0]}x{size[1]} is not a multiple of the patch size 8x8"):
        _vit()(torch.randn(1, 3, *size))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("backend", ["math", "sdpa", "varlen"])
def test_nested_forward_equals_per_group_forward(backend):
    # float64: the two passes sum in different orders (varlen's CPU path runs one sequence at a time),
    # so float32 rounding could differ by ~1e-4 in a gradient; in float64 any real difference shows.
    model = _vit(num_register_tokens=1, attn_backend=backend).double()
    globals_, locals_ = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.randn(8, 3, 16, 16, dtype=torch.float64)
    masks = torch.rand(4, 16) < 0.4
    nested = model.forward_features_list([globals_, locals_], [masks, None])
    separate = [model.forward_features(globals_, masks=masks), model.forward_features(locals_)]
    for got, want in zip(nested, separate):
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            torch.testing.assert_close(got[key], want[key], atol=1e-10, rtol=1e-10)
    assert nested[0]["masks"] is masks and nested[1]["masks"] is None
    loss_nested = sum(o["x_norm_clstoken"].square().sum() for o in nested)
    loss_separate = sum(o["x_norm_clstoken"].square().sum() for o in separate)
    grads_nested = torch.autograd.grad(loss_nested, list(model.parameters()), allow_unused=True)
    grads_separate = torch.autograd.grad(loss_separate, list(model.parameters()), allow_unused=True)
    for a, b in zip(grads_nested, grads_separate):
        if a is None:
            assert b is None
        else:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_intermediate_layers_match_manual_block_loop():
    model = _vit(num_register_tokens=2)
    x = torch.randn(2, 3, 32, 32)
    states = _manual_forward(model, x)
    last_two = model.get_intermediate_layers(x, n=2, norm=False)
    for got, want in zip(last_two, states[1:]):
        torch.testing.assert_close(got, want[:, 3:])
    picked = model.get_intermediate_layers(x, n=[0, -1], return_class_token=True)
    for (patches, cls), want in zip(picked, [states[0], states[2]]):
        torch.testing.assert_close(patches, model.norm(want)[:, 3:])
        torch.testing.assert_close(cls, model.norm(want)[:, 0])
    reshaped = model.get_intermediate_layers(x, n=1, reshape=True)[0]
    torch.testing.assert_close(reshaped.flatten(2).transpose(1, 2), model.norm(states[-1])[:, 3:])
    with pytest.raises(ValueError, match="out of range"):
        model.get_intermediate_layers(x, n=[3])
    with pytest.raises(ValueError, match="between 1 and the depth"):
        model.get_intermediate_layers(x, n=4)


def test_block_chunks_keys_and_outputs():
    flat = _vit(depth=4)
    chunked = _vit(depth=4, block_chunks=2)
    keys = chunked.state_dict().keys()
    assert "blocks.0.1.attn.qkv.weight" in keys and "blocks.1.3.mlp.fc2.bias" in keys
    assert not any(k.startswith("blocks.1.1.") for k in keys)  # padding identities hold nothing
    state, report = adapt_backbone_state_dict(flat.state_dict(), chunked)
    chunked.load_state_dict(state, strict=True)
    assert report.rechunked
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(chunked(x), flat(x))
    with pytest.raises(ValueError, match="not divisible by block_chunks"):
        _vit(depth=3, block_chunks=2)


def test_block_chunk_is_a_shardable_module_not_a_container():
    """torch 2.11's fully_shard refuses every nn.ModuleList / nn.ModuleDict (later releases accept
    those that define forward); a chunk is the unit FSDP2 shards, so it must be neither, and still
    behave as the sequence of its (padded) blocks."""
    chunked = _vit(depth=4, block_chunks=2)
    second = chunked.blocks[1]
    assert not isinstance(second, (torch.nn.ModuleList, torch.nn.ModuleDict))
    assert len(second) == 4 and [type(b).__name__ for b in second][:2] == ["Identity", "Identity"]
    assert second[2] is list(second.children())[-2] and second[-1] is list(chunked.iter_blocks())[-1]
    x = torch.randn(2, 5, 64)
    expected = second[3](second[2](x))
    torch.testing.assert_close(second(x), expected)


def test_attention_backend_switch_keeps_outputs():
    model = _vit(attn_backend="math")
    x = torch.randn(2, 3, 32, 32)
    reference = model(x)
    model.set_attn_backend("sdpa")
    assert all(b.attn.backend == "sdpa" for b in model.iter_blocks())
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="Unknown attention backend 'flash'; valid backends: math, sdpa"):
        model.set_attn_backend("flash")  # refused when set, not at the next forward
    assert all(b.attn.backend == "sdpa" for b in model.iter_blocks())


def test_build_model_from_cfg():
    cfg = OmegaConf.create(
        {
            "student": {
                "arch": "vit_small_memeff", "patch_size": 8, "drop_path_rate": 0.3, "layerscale": 1e-5,
                "drop_path_uniform": True, "ffn_layer": "swiglufused", "block_chunks": 4, "num_register_tokens": 0,
            },
            "crops": {"global_crops_size": 32},
        }
    )  # fmt: skip
    with torch.device("meta"):  # shapes and structure only: no need to initialise 2 x 22M parameters
        student, teacher, embed_dim = build_model_from_cfg(cfg)
    assert embed_dim == 384 and student.pos_embed.shape == (1, 17, 384)
    assert all(b.sample_drop_ratio == 0.3 for b in student.iter_blocks())
    assert all(b.sample_drop_ratio == 0.0 for b in teacher.iter_blocks())
    assert student.state_dict().keys() == teacher.state_dict().keys()
    assert "blocks.3.9.mlp.w12.weight" in teacher.state_dict()
    with torch.device("meta"):
        only_teacher, dim = build_model_from_cfg(cfg, only_teacher=True)
    assert dim == 384 and isinstance(only_teacher, DinoVisionTransformer)
    cfg.student.arch = "vit_huge"
    with pytest.raises(ValueError, match="vit_huge.*vit_tiny, vit_small, vit_base, vit_large, vit_giant2"):
        build_model_from_cfg(cfg)


def test_drop_path_rates_increase_linearly():
    model = _vit(depth=5, drop_path_rate=0.4)
    rates = [b.sample_drop_ratio for b in model.iter_blocks()]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


def _saved_storage_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.4])
def test_nested_pass_keeps_no_more_for_backward_than_separate_passes(drop_path_rate):
    model = _vit(drop_path_rate=drop_path_rate, drop_path_uniform=True, attn_backend="sdpa").train()
    globals_, locals_ = torch.randn(4, 3, 32, 32), torch.randn(16, 3, 16, 16)
    torch.manual_seed(0)
    nested = _saved_storage_bytes(lambda: model.forward_features_list([globals_, locals_], [None, None]))
    torch.manual_seed(0)
    separate = _saved_storage_bytes(lambda: (model.forward_features(globals_), model.forward_features(locals_)))
    assert 0 < nested <= separate


def test_non_square_stored_grid_is_refused_at_construction():
    """A non-square img_size would only fail at the first forward (the stored grid is read as square)."""
    for size in ((32, 64), (16, 64)):  # 4 x 8 patches, and 2 x 8 (a square count, 16, in a non-square grid)
        message = re.escape(f"img_size {size}: the position embeddings are stored for a square")
        with pytest.raises(ValueError, match=message):
            _vit(img_size=size)
    assert _vit(img_size=(32, 32)).pos_embed.shape == (1, 17, 64)


def test_unbatched_image_is_a_clear_error():
    model = _vit()
    for shape in ((3, 32, 32), (1, 1, 3, 32, 32)):
        message = re.escape(f"expected a batch of images (B, C, H, W), got a tensor of shape {shape}")
        with pytest.raises(ValueError, match=message):
            model(torch.randn(shape))
        with pytest.raises(ValueError, match="expected a batch of images"):
            model.patch_embed(torch.randn(shape))


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("backend", ["sdpa", "varlen"])
def test_nested_training_pass_with_masks_and_stochastic_depth_equals_separate_passes(monkeypatch, backend):
    """With the same kept samples per (block, group), the nested training pass (subset stochastic
    depth, iBOT masks, a register) gives the separate passes' outputs and gradients."""
    import dinov2.layers.block as block_module

    def fixed_subset(batch, rate, device):  # deterministic per batch size: both passes keep the same rows
        keep = max(int(batch * (1 - rate)), 1)
        return torch.randperm(batch, generator=torch.Generator().manual_seed(batch))[:keep].to(device), batch / keep

    monkeypatch.setattr(block_module, "sample_keep_subset", fixed_subset)
    model = _vit(embed_dim=32, num_heads=2, depth=2, num_register_tokens=1, drop_path_rate=0.5,
                 drop_path_uniform=True, attn_backend=backend).double().train()  # fmt: skip
    globals_, locals_ = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(4, 3, 16, 16, dtype=torch.float64)
    masks = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.4
    nested = model.forward_features_list([globals_, locals_], [masks, None])
    separate = [model.forward_features(globals_, masks=masks), model.forward_features(locals_)]
    losses = []
    for outs in (nested, separate):
        losses.append(sum(o["x_norm_patchtokens"].square().sum() + o["x_norm_clstoken"].sum() for o in outs))
    for got, want in zip(nested, separate):
        torch.testing.assert_close(got["x_prenorm"], want["x_prenorm"], atol=1e-12, rtol=1e-12)
    params = list(model.parameters())
    for a, b in zip(*(torch.autograd.grad(loss, params, allow_unused=True) for loss in losses)):
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
