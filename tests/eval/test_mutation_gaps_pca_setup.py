"""PCA visualisation and evaluation setup: behaviour a mutation audit found untested (the input
normalisation, the orientation and rank of the principal directions, the figure's rounding, and the
configured autocast dtype of an evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.eval import pca
from dinov2.eval.setup import get_args_parser, setup_and_build_model


def test_model_input_is_normalised_with_the_imagenet_mean_and_std():
    image = Image.new("RGB", (4, 4), (200, 100, 30))
    batch = pca.to_model_input([image, image])
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the published ImageNet statistics
    expected = [(value / 255.0 - m) / s for value, m, s in zip((200, 100, 30), mean, std)]
    assert batch.shape == (2, 3, 4, 4)
    for channel in range(3):
        torch.testing.assert_close(batch[:, channel], torch.full((2, 4, 4), expected[channel]), atol=1e-5, rtol=0)


def test_each_principal_direction_has_its_largest_entry_positive():
    gen = torch.Generator().manual_seed(0)
    for _ in range(12):  # SVD signs are arbitrary: over a dozen draws some come out negative
        x = torch.randn(30, 6, generator=gen) * torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5, 0.2])
        _, components = pca.principal_components(x, 3)
        largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        assert (largest > 0).all()


def test_directions_beyond_the_data_rank_are_zero():
    gen = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(5, 2, generator=gen, dtype=torch.float64)).Q.T  # 2 orthonormal rows
    x = torch.randn(10, 2, generator=gen, dtype=torch.float64) @ basis + 3.0  # rank 2 after centring
    _, components = pca.principal_components(x, 4)
    assert torch.count_nonzero(components[2:]) == 0
    top = components[:2]
    torch.testing.assert_close(top @ top.T, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(top @ basis.T @ basis, top)  # the two found span the data's plane


def test_the_figure_rounds_colours_to_the_nearest_byte():
    values = torch.tensor([0.0, 0.2, 0.5, 0.999])
    rgb = values.view(1, 2, 2, 1).expand(1, 2, 2, 3)
    figure = pca.render_figure([Image.new("RGB", (2, 2))], rgb)
    right = np.asarray(figure)[:, 2:, 0]  # the PCA map, beside the image
    expected = np.round(values.numpy() * 255.0).reshape(2, 2)  # 0, 51, 128 (127.5 up), 255 (254.7 up)
    np.testing.assert_array_equal(right, expected)


@pytest.mark.parametrize(("setting", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", None)])
def test_an_evaluation_autocasts_as_its_config_says(micro_arch, tmp_path, setting, dtype):
    argv = [
        "--output-dir",
        str(tmp_path),
        "--device",
        "cpu",
        *micro_arch,
        f"compute_precision.autocast_dtype={setting}",
    ]
    _, autocast_dtype, _ = setup_and_build_model(get_args_parser().parse_args(argv))
    assert autocast_dtype == dtype
