"""``get_intermediate_layers`` takes ``n`` as any integer type or a sequence of integer indices."""

import numpy as np
import pytest
import torch

from dinov2.models.vision_transformer import DinoVisionTransformer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DinoVisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=3, num_heads=2).eval()


def _block_outputs(model, x):
    tokens, outs = model.prepare_tokens_with_masks(x), []
    for block in model.iter_blocks():
        tokens = block(tokens)
        outs.append(model.norm(tokens)[:, 1:])
    return outs


@pytest.mark.parametrize(
    "n, expected",
    [(np.int64(2), [1, 2]), (torch.tensor(2), [1, 2]), ([np.int64(0), -1], [0, 2]), (torch.tensor([0, 1]), [0, 1])],
)
def test_integer_like_n(model, n, expected):
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        got = model.get_intermediate_layers(x, n=n)
        reference = _block_outputs(model, x)
    assert len(got) == len(expected)
    for out, index in zip(got, expected):
        torch.testing.assert_close(out, reference[index])


@pytest.mark.parametrize("n", [1.5, "2", [1.0]])
def test_non_integer_n_is_a_clear_error(model, n):
    with pytest.raises(TypeError, match="n must be an int or a sequence of block indices"):
        model.get_intermediate_layers(torch.randn(1, 3, 28, 28), n=n)


@pytest.mark.parametrize("n", [[1, 1], [-1, 2], (0, -3)])
def test_a_block_named_twice_is_a_clear_error(model, n):
    """One output per named block, in block order: asking for a block twice would silently return
    fewer outputs than indices given."""
    with pytest.raises(ValueError, match="name a block more than once"):
        model.get_intermediate_layers(torch.randn(1, 3, 28, 28), n=n)
