"""Residual-stream dtype of the backbone in float32, bfloat16 autocast and bfloat16 parameters.

Under autocast the patch embedding (a convolution) yields bfloat16, while the CLS and register
tokens and the position embeddings are float32 parameters: concatenating and adding them
promotes the stream to float32, which is what the original does, so every block's residual
addition happens in float32. A model converted with ``.to(torch.bfloat16)`` stays bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from dinov2.models import DinoVisionTransformer

NATIVE, RESAMPLED = (32, 32), (48, 32)  # the stored 4 x 4 grid, and one that must be resampled


def _vit(registers: int) -> DinoVisionTransformer:
    torch.manual_seed(0)
    return DinoVisionTransformer(
        img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, init_values=0.5, block_chunks=0,
        num_register_tokens=registers, attn_backend="math",
    ).eval()  # fmt: skip


def _record_block_inputs(model: DinoVisionTransformer) -> tuple[list[torch.dtype], object]:
    """dtypes of every tensor the first block receives (one per image group)."""
    seen: list[torch.dtype] = []

    def hook(module, args):
        x = args[0]
        seen.extend(t.dtype for t in (x if isinstance(x, list) else [x]))

    return seen, model.blocks[0].register_forward_pre_hook(hook)


def _run(model, mode: str, images: list[torch.Tensor], nested: bool) -> list[dict]:
    if mode == "bf16_params":
        images = [x.bfloat16() for x in images]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
        if nested:
            return model.forward_features_list(images, [None] * len(images))
        return [model.forward_features(x) for x in images]


# mode -> (dtype the blocks receive, dtype of the outputs)
EXPECTED = {
    "fp32": (torch.float32, torch.float32),
    "autocast": (torch.float32, torch.float32),  # the final LayerNorm runs in float32 under autocast
    "bf16_params": (torch.bfloat16, torch.bfloat16),
}


@pytest.mark.parametrize("nested", [False, True], ids=["single", "nested"])
@pytest.mark.parametrize("registers", [0, 2])
@pytest.mark.parametrize("mode", list(EXPECTED))
def test_residual_stream_dtype(mode, registers, nested):
    model = _vit(registers)
    if mode == "bf16_params":
        model = model.to(torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(2, 3, *size, generator=gen) for size in (NATIVE, RESAMPLED)]
    seen, handle = _record_block_inputs(model)
    outputs = _run(model, mode, images, nested)
    handle.remove()
    stream, out = EXPECTED[mode]
    assert seen and all(d == stream for d in seen), seen
    for o in outputs:
        assert o["x_prenorm"].dtype == stream
        assert o["x_norm_clstoken"].dtype == out and o["x_norm_patchtokens"].dtype == out


def test_autocast_tokens_are_the_float32_sum():
    """Under autocast the tokens entering block 0 equal the float32 sum of the bfloat16 patch
    embedding and the float32 CLS / register / position parameters, computed here by hand."""
    model = _vit(registers=2)
    with torch.no_grad():
        model.pos_embed.normal_()
        model.cls_token.normal_()
        model.register_tokens.normal_()
    x = torch.randn(2, 3, *NATIVE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = model.prepare_tokens_with_masks(x)
        patches = model.patch_embed(x)
    assert patches.dtype == torch.bfloat16  # the premise: autocast really lowers the patch embedding
    pos = model.pos_embed.detach()
    expected_cls = model.cls_token.detach()[:, 0] + pos[:, 0]
    expected_patches = patches.float() + pos[:, 1:]
    assert tokens.dtype == torch.float32
    torch.testing.assert_close(tokens[:, 0], expected_cls.expand(2, -1), rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, 1:3], model.register_tokens.detach().expand(2, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(tokens[:, 3:], expected_patches, rtol=0, atol=0)
