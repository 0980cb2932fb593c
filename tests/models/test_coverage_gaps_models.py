"""Backbone refusals that a line-coverage pass of the suite found unexercised, each naming what is
wrong: position embeddings that are no square grid, an unknown FFN layer, image groups and masks of
different counts, and an activation-checkpointing mode a block does not know."""

from __future__ import annotations

import pytest
import torch

from dinov2.layers import Block
from dinov2.models import DinoVisionTransformer
from dinov2.models.vision_transformer import resample_pos_embed


def _vit(**kwargs) -> DinoVisionTransformer:
    return DinoVisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, **kwargs)


def test_position_embeddings_of_no_square_grid_are_refused_by_their_count():
    with pytest.raises(ValueError, match="position embeddings hold 6 patch positions, not a square grid"):
        resample_pos_embed(torch.zeros(1, 1 + 6, 4), num_prefix=1, grid=(3, 3))
    assert resample_pos_embed(torch.zeros(1, 1 + 4, 4), num_prefix=1, grid=(3, 3)).shape == (1, 1 + 9, 4)


def test_an_unknown_ffn_layer_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown ffn_layer 'gelu'; valid: mlp, swiglu"):
        _vit(ffn_layer="gelu")


def test_image_groups_and_masks_of_different_counts_are_refused():
    model = _vit()
    images = [torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8)]
    with pytest.raises(ValueError, match="got 2 image groups but 1 masks"):
        model.forward_features_list(images, [torch.zeros(2, 4, dtype=torch.bool)])


def test_an_unknown_checkpointing_mode_is_refused_naming_the_valid_ones():
    block = Block(dim=16, num_heads=2)
    block.checkpointing = "everything"
    x = torch.zeros(2, 5, 16, requires_grad=True)
    with pytest.raises(ValueError, match="activation checkpointing 'everything'; valid: off, full, selective"):
        block(x)
