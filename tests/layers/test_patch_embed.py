import numpy as np
import pytest
import torch

from dinov2.layers.patch_embed import PatchEmbed


def test_numpy_integer_sizes_build_the_same_grid_as_python_integers():
    # Sizes read from arrays or computed with NumPy arrive as np.int64; they used to crash in _pair.
    layer = PatchEmbed(img_size=np.int64(32), patch_size=np.int64(8), embed_dim=16)
    assert layer.img_size == (32, 32) and layer.patch_size == (8, 8)
    assert layer.patches_resolution == (4, 4) and layer.num_patches == 16
    assert layer(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 16)


def test_rectangular_pair_keeps_height_and_width_apart():
    layer = PatchEmbed(img_size=(16, 32), patch_size=8, embed_dim=8)
    assert layer.patches_resolution == (2, 4)


@pytest.mark.parametrize("bad", [32.5, "32", (16, 16, 16)])
def test_a_size_that_is_not_an_integer_or_pair_is_a_type_error_naming_it(bad):
    with pytest.raises(TypeError, match="integer size"):
        PatchEmbed(img_size=bad, patch_size=8, embed_dim=8)


def test_a_pair_from_a_config_list_is_accepted():
    from omegaconf import OmegaConf

    layer = PatchEmbed(img_size=OmegaConf.create({"s": [16, 32]}).s, patch_size=8, embed_dim=8)
    assert layer.patches_resolution == (2, 4)


@pytest.mark.parametrize("pair", [np.array([16, 32]), torch.tensor([16, 32])])
def test_a_pair_in_an_array_or_tensor_is_accepted(pair):
    # int(value[0]), int(value[1]) took these before the TypeError check refused what is no Sequence.
    layer = PatchEmbed(img_size=pair, patch_size=8, embed_dim=8)
    assert layer.img_size == (16, 32) and layer.patches_resolution == (2, 4)
    assert all(type(size) is int for size in layer.img_size)
    with pytest.raises(TypeError, match="integer size"):
        PatchEmbed(img_size=np.array([16.0, 32.0]), patch_size=8, embed_dim=8)
