import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.checkpoint import StateDictMismatchError
from dinov2.eval import pca
from dinov2.models import build_model
from dinov2.models.vision_transformer import DinoVisionTransformer
from dinov2.utils.config import load_config

TINY_OPTS = ["student.embed_dim=32", "student.depth=4", "student.num_heads=2"]


def _write_images(tmp_path, count=2):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=(40 + 7 * i, 50, 3), dtype=np.uint8)
        path = tmp_path / f"image_{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def _tiny_config_weights(tmp_path):
    cfg = load_config("vitt8_32px", TINY_OPTS)
    model, _ = build_model(cfg.student, only_teacher=True, img_size=cfg.crops.global_crops_size)
    path = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), path)
    return path


def _constructed_features(mask, dim=16, noise=0.01, seed=0):
    """Patch features: background near one vector, foreground near another, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    background, foreground = torch.randn(dim, generator=gen), torch.randn(dim, generator=gen)
    features = torch.where(mask.unsqueeze(-1), foreground, background)
    return features + noise * torch.randn(*mask.shape, dim, generator=gen)


def test_main_writes_png_of_expected_size(tmp_path):
    weights = _tiny_config_weights(tmp_path)
    images = _write_images(tmp_path)
    output = tmp_path / "out" / "pca.png"
    # 30 px is not a multiple of the patch size 8: rounded to 32.
    argv = [*images, "--pretrained-weights", str(weights), "--config-file", "vitt8_32px"]
    argv += ["--output", str(output), "--image-size", "30", "--device", "cpu", "--opts", *TINY_OPTS]
    assert pca.main(argv) == output
    with Image.open(output) as figure:
        assert figure.format == "PNG" and figure.mode == "RGB"
        assert figure.size == (2 * 32, 2 * 32)
        pixels = np.asarray(figure)
    # Left column is each input resized to 32 x 32.
    for row, path in enumerate(images):
        with Image.open(path) as source:
            expected = np.asarray(source.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
        assert np.array_equal(pixels[32 * row : 32 * (row + 1), :32], expected)


def test_mismatched_weights_raise_naming_keys(tmp_path):
    other = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    path = tmp_path / "other.pth"
    torch.save(other.state_dict(), path)
    images = _write_images(tmp_path, 1)
    argv = [*images, "--pretrained-weights", str(path), "--config-file", "vitt8_32px"]
    argv += ["--output", str(tmp_path / "x.png"), "--opts", *TINY_OPTS]
    with pytest.raises(StateDictMismatchError) as info:
        pca.main(argv)
    error = info.value
    assert "blocks.3.attn.qkv.weight" in error.missing and "missing keys: blocks.0.ls1.gamma" in str(error)
    assert any(key.startswith("cls_token (1, 1, 64) vs model (1, 1, 32)") for key in error.mismatched)
    assert not (tmp_path / "x.png").exists()


def test_snap_image_size():
    assert pca.snap_image_size(448, 14) == 448
    assert pca.snap_image_size(450, 14) == 448
    assert pca.snap_image_size(456, 14) == 462
    assert pca.snap_image_size(3, 14) == 14
    with pytest.raises(ValueError):
        pca.snap_image_size(0, 14)


def test_foreground_mask_picks_constructed_foreground():
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[0, 1:3, 2:5] = True  # 6 patches
    mask[1, 3:6, 0:2] = True  # 6 patches
    features = _constructed_features(mask)
    assert torch.equal(pca.foreground_mask(features), mask)
    # Same separation whichever way the features are negated (sign rule: foreground is the minority).
    assert torch.equal(pca.foreground_mask(-features), mask)
    # A threshold above every standardised score leaves no foreground.
    assert not pca.foreground_mask(features, threshold=100.0).any()


def test_foreground_mask_matches_independent_projection():
    """The standardised first-component score against a numpy eigen-decomposition of the covariance."""
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(1, 4, 5, 8, generator=gen) * torch.linspace(3.0, 0.1, 8)
    flat = features.reshape(-1, 8).double().numpy()
    centred = flat - flat.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    direction = vectors[:, -1] * np.sign(vectors[np.abs(vectors[:, -1]).argmax(), -1])  # largest entry positive
    score = centred @ direction
    score /= score.std(ddof=1)
    if (score > 0).sum() > (score < 0).sum():
        score = -score
    for threshold in (0.0, 0.5, -0.3):
        expected = torch.from_numpy(score > threshold).reshape(1, 4, 5)
        assert torch.equal(pca.foreground_mask(features, threshold), expected)


def test_foreground_rgb_background_black_and_scaled():
    mask = torch.zeros(1, 5, 5, dtype=torch.bool)
    mask[0, 1:4, 1:4] = True
    features = _constructed_features(mask, noise=0.5)
    rgb = pca.foreground_rgb(features, mask)
    assert rgb.shape == (1, 5, 5, 3)
    assert torch.all(rgb[~mask] == 0)
    fg = rgb[mask]
    assert torch.allclose(fg.min(dim=0).values, torch.zeros(3)) and torch.allclose(fg.max(dim=0).values, torch.ones(3))
    # First channel is an affine function of the top principal score of the foreground patches.
    x = features[mask].double().numpy()
    x = x - x.mean(axis=0)
    top = np.linalg.svd(x, full_matrices=False)[2][0]
    corr = np.corrcoef(x @ top, fg[:, 0].double().numpy())[0, 1]
    assert abs(abs(corr) - 1.0) < 1e-5


def test_pca_figure_black_where_background(tmp_path, tiny_vit_kwargs):
    model = DinoVisionTransformer(**tiny_vit_kwargs).eval()
    paths = _write_images(tmp_path, 2)
    figure, mask = pca.pca_figure(model, paths, image_size=32)
    assert figure.size == (64, 64) and mask.shape == (2, 4, 4)
    pixels = np.asarray(figure)[:, 32:]
    # Background patches are black; foreground patches are not all black.
    for row in range(2):
        cells = pixels[32 * row : 32 * (row + 1)].reshape(4, 8, 4, 8, 3)
        for i in range(4):
            for j in range(4):
                if not mask[row, i, j]:
                    assert cells[i, :, j].max() == 0
    assert 0 < int(mask.sum()) <= mask.numel() // 2
