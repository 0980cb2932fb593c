"""DINO multi-crop augmentation, random blur and classification transforms."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    GaussianBlur,
    make_classification_eval_transform,
    make_classification_train_transform,
)

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
SCALES = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32))


def _uniform_image(value: int, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


def _random_image(size=(64, 64), seed=0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _checkerboard(size=32) -> Image.Image:
    board = (np.indices((size, size)).sum(0) % 2 * 255).astype(np.uint8)
    return Image.fromarray(np.stack([board] * 3, axis=-1))


def _expected(value: int, shape) -> torch.Tensor:
    return ((torch.full((3, 1, 1), value / 255.0) - MEAN) / STD).expand(3, *shape)


def _small(**kwargs) -> DataAugmentationDINO:
    defaults = dict(SCALES, local_crops_number=3, global_crops_size=32, local_crops_size=16)
    return DataAugmentationDINO(**{**defaults, **kwargs})


def _disable_jitter(aug: DataAugmentationDINO) -> None:
    aug.color_jittering.transforms[0].p = 0.0  # the RandomApply around ColorJitter


def test_constants():
    assert IMAGENET_DEFAULT_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_DEFAULT_STD == (0.229, 0.224, 0.225)


def test_default_crop_counts_sizes_and_normalisation():
    aug = DataAugmentationDINO(**SCALES, local_crops_number=2, solarization_prob=0.0)
    _disable_jitter(aug)
    out = aug(_uniform_image(128, size=(300, 200)))
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 2 and out["offsets"] == ()
    for crop in out["global_crops"]:
        assert crop.shape == (3, 224, 224) and crop.dtype == torch.float32
        torch.testing.assert_close(crop, _expected(128, (224, 224)), atol=1e-5, rtol=0)
    for crop in out["local_crops"]:
        assert crop.shape == (3, 96, 96) and crop.dtype == torch.float32
        # blur (defaults) leaves a uniform image unchanged
        torch.testing.assert_close(crop, _expected(128, (96, 96)), atol=1e-5, rtol=0)


def test_custom_sizes_and_teacher_crops_are_the_global_crops():
    out = _small(local_crops_number=5)(_random_image())
    assert [c.shape for c in out["global_crops"]] == [(3, 32, 32)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, 16, 16)] * 5
    assert all(t is g for t, g in zip(out["global_crops_teacher"], out["global_crops"], strict=True))
    assert len(out["global_crops_teacher"]) == 2


def test_reproducible_with_seeds_and_varies_otherwise():
    aug, image = _small(), _random_image()

    def run(seed):
        torch.manual_seed(seed)
        random.seed(seed)
        out = aug(image)
        return out["global_crops"] + out["local_crops"]

    first, again, other = run(1), run(1), run(2)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    assert not torch.equal(first[0], first[1])  # the two global crops are different views


def test_solarisation_only_on_second_global_crop():
    aug = _small(solarization_prob=1.0, global_crops_1_blur_prob=0.0, global_crops_2_blur_prob=0.0)
    _disable_jitter(aug)
    for _ in range(5):
        out = aug(_uniform_image(255))
        torch.testing.assert_close(out["global_crops"][0], _expected(255, (32, 32)), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["global_crops"][1], _expected(0, (32, 32)), atol=1e-5, rtol=0)
        for crop in out["local_crops"]:
            torch.testing.assert_close(crop, _expected(255, (16, 16)), atol=1e-5, rtol=0)


def _blur_rate(pipeline, normalize, n=400) -> float:
    board = _checkerboard()
    sharp = normalize(board)
    return sum(not torch.allclose(pipeline(board), sharp) for _ in range(n)) / n


def test_blur_probabilities_default_to_trained_with_values():
    aug = _small(solarization_prob=0.0)
    _disable_jitter(aug)  # grayscale leaves a black/white board unchanged; only the blur can alter it
    assert _blur_rate(aug.global_transfo1, aug.normalize) == 0.0
    assert _blur_rate(aug.global_transfo2, aug.normalize) == pytest.approx(0.9, abs=0.06)
    assert _blur_rate(aug.local_transfo, aug.normalize) == pytest.approx(0.5, abs=0.1)


def test_blur_probability_is_the_probability_of_blurring():
    aug = _small(global_crops_1_blur_prob=1.0, global_crops_2_blur_prob=0.1, solarization_prob=0.0)
    _disable_jitter(aug)
    assert _blur_rate(aug.global_transfo1, aug.normalize, n=100) == 1.0
    assert _blur_rate(aug.global_transfo2, aug.normalize) == pytest.approx(0.1, abs=0.06)


def test_colour_jitter_and_grayscale_rates():
    aug, n = _small(), 400
    image = _uniform_image(0, size=(16, 16))
    image.paste((200, 100, 50), (0, 0, 16, 16))
    untouched = aug.normalize(image)
    outs = [aug.local_transfo(image) for _ in range(n)]  # blur leaves a uniform image unchanged
    grey = sum(torch.allclose(o[0] * STD[0] + MEAN[0], o[1] * STD[1] + MEAN[1], atol=1e-5) for o in outs) / n
    unchanged = sum(torch.allclose(o, untouched) for o in outs) / n
    assert grey == pytest.approx(0.2, abs=0.07)
    assert unchanged == pytest.approx((1 - 0.8) * (1 - 0.2), abs=0.06)  # neither jittered nor greyed


def test_gaussian_blur_alone():
    board, n = _checkerboard(), 400
    sharp = np.asarray(board)
    blurred = [np.asarray(GaussianBlur(p=0.3)(board)) for _ in range(n)]
    assert sum(not np.array_equal(b, sharp) for b in blurred) / n == pytest.approx(0.3, abs=0.08)
    assert np.array_equal(np.asarray(GaussianBlur(p=0.0)(board)), sharp)
    strong = np.asarray(GaussianBlur(p=1.0, radius_min=2.0, radius_max=2.0)(board)).astype(int)
    assert np.abs(strong - 127.5).max() < 20  # a 1-pixel checkerboard averages out to mid-grey
    tensor_out = GaussianBlur(p=1.0, radius_min=2.0, radius_max=2.0)(torch.from_numpy(sharp.copy()).permute(2, 0, 1))
    assert (tensor_out.float() - 127.5).abs().max() < 20
    with pytest.raises(ValueError):
        GaussianBlur(p=1.5)


@pytest.mark.parametrize(
    ("setting", "name"),
    [
        (dict(global_crops_scale=(1.0, 0.32)), "global_crops_scale"),  # reversed
        (dict(global_crops_scale=(0.32, 1.5)), "global_crops_scale"),  # a crop larger than the image
        (dict(local_crops_scale=(0.0, 0.32)), "local_crops_scale"),
        (dict(local_crops_scale=0.3), "local_crops_scale"),
        (dict(local_crops_number=-1), "local_crops_number"),  # would silently train without local crops
        (dict(local_crops_number=2.5), "local_crops_number"),
        (dict(global_crops_size=0), "global_crops_size"),
        (dict(local_crops_size=[16, 16]), "local_crops_size"),
        (dict(solarization_prob=1.5), "solarization_prob"),
        (dict(local_crops_blur_prob=-0.1), "local_crops_blur_prob"),
        (dict(local_crops_blur_prob=None), "local_crops_blur_prob"),  # an unset key: named, not a TypeError
        (dict(global_crops_2_blur_prob="high"), "global_crops_2_blur_prob"),
    ],
)
def test_bad_crop_settings_are_named_at_construction(setting, name):
    from dinov2.data.gpu_augmentation import MultiCropParams

    defaults = dict(SCALES, local_crops_number=3, global_crops_size=32, local_crops_size=16)
    for cls in (DataAugmentationDINO, MultiCropParams):  # both training modes check alike
        with pytest.raises(ValueError, match=name):
            cls(**{**defaults, **setting})
    assert len(_small(local_crops_number=0)(_random_image())["local_crops"]) == 0


def test_construction_logs_settings(caplog):
    with caplog.at_level(logging.INFO, logger="dinov2"):
        _small(local_crops_number=7)
    assert "local_crops_number=7" in caplog.text


def test_eval_transform_resizes_then_center_crops():
    # 600x300 image: white for x < 200, black to the right, and black bands in the top/bottom 15 rows.
    pixels = np.zeros((300, 600, 3), dtype=np.uint8)
    pixels[15:285, :200] = 255
    out = make_classification_eval_transform()(Image.fromarray(pixels))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    # Shorter side -> 256 (scale 256/300), width 512, crop from x=144: the edge lands at 200*256/300-144 ~ 26.7.
    # (Squashing to 224x224 would put it at ~74.7, cropping without resizing at 12, and the bands would show.)
    white, black = _expected(255, (224, 224)), _expected(0, (224, 224))
    torch.testing.assert_close(out[:, :, :24], white[:, :, :24], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[:, :, 30:], black[:, :, 30:], atol=1e-5, rtol=0)


def test_eval_transform_custom_sizes():
    out = make_classification_eval_transform(resize_size=40, crop_size=32)(_random_image((50, 80)))
    assert out.shape == (3, 32, 32)


def test_train_transform():
    transform = make_classification_train_transform(crop_size=24, hflip_prob=0.0)
    out = transform(_uniform_image(128, size=(50, 30)))
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, _expected(128, (24, 24)), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    first = make_classification_train_transform(crop_size=24)(_random_image())
    torch.manual_seed(0)
    assert torch.equal(first, make_classification_train_transform(crop_size=24)(_random_image()))


def test_recipe_is_the_published_dinov2_one():
    """Both training modes carry the released recipe's constants: crops (bicubic, ratio 3/4-4/3), flip 0.5,
    ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale 0.2, blur radius 0.1-2 with the trained-with
    probabilities 0 / 0.9 / 0.5, solarisation (threshold 128, p 0.2) on global crop 2 only. The rate tests
    sample with a tolerance of several percent; these catch any drift exactly."""
    from dinov2.data.gpu_augmentation import MultiCropParams

    aug = DataAugmentationDINO(**SCALES, local_crops_number=8)
    kinds = {
        (0.32, 1.0): (aug.geometric_augmentation_global, 224),
        (0.05, 0.32): (aug.geometric_augmentation_local, 96),
    }
    for scale, (geometric, size) in kinds.items():
        crop, flip = geometric.transforms
        assert tuple(crop.size) == (size, size) and tuple(crop.scale) == scale and flip.p == 0.5
        assert tuple(crop.ratio) == pytest.approx((3 / 4, 4 / 3)) and crop.interpolation == T.InterpolationMode.BICUBIC
    jitter_apply, grayscale = aug.color_jittering.transforms
    (jitter,) = jitter_apply.transforms
    assert jitter_apply.p == 0.8 and grayscale.p == 0.2
    factors = [tuple(getattr(jitter, k)) for k in ("brightness", "contrast", "saturation", "hue")]
    assert factors == [pytest.approx(f) for f in ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))]
    pipelines = (aug.global_transfo1, aug.global_transfo2, aug.local_transfo)
    blurs = [[t for t in p.transforms if isinstance(t, GaussianBlur)] for p in pipelines]
    assert [[b.p for b in found] for found in blurs] == [[0.0], [0.9], [0.5]]
    assert all((found[0].radius_min, found[0].radius_max) == (0.1, 2.0) for found in blurs)
    solarize = [[t for t in p.transforms if isinstance(t, T.RandomSolarize)] for p in pipelines]
    assert [len(found) for found in solarize] == [0, 1, 0]
    assert solarize[1][0].threshold == 128 and solarize[1][0].p == 0.2

    params = MultiCropParams(**SCALES, local_crops_number=8)
    rates = (params.flip_prob, params.jitter_prob, params.grayscale_prob, params.solarization_prob)
    assert rates == (0.5, 0.8, 0.2, 0.2)
    assert [b.p for b in params.blurs] == [0.0, 0.9, 0.5] and params.ratio == pytest.approx((3 / 4, 4 / 3))
    assert all((b.radius_min, b.radius_max) == (0.1, 2.0) for b in params.blurs)
    gpu_factors = [tuple(getattr(params.jitter, k)) for k in ("brightness", "contrast", "saturation", "hue")]
    assert gpu_factors == factors
    assert (params.global_crops_size, params.local_crops_size, params.global_crops_scale) == (224, 96, (0.32, 1.0))


def _non_rgb_twins() -> list[tuple[Image.Image, Image.Image]]:
    """(image in another mode, the RGB image it stands for), the RGB side built by hand: a fully
    transparent image shows the white it is composited on, 16-bit grey 65535 is white, 0 black."""
    clear_red = Image.new("RGBA", (20, 14), (255, 0, 0, 0))
    clear_grey = Image.new("LA", (20, 14), (30, 0))
    sixteen = Image.fromarray(np.tile(np.array([0, 65535], dtype=np.uint16), (14, 10)))
    halves = np.tile(np.array([0, 255], dtype=np.uint8), (14, 10))
    return [
        (Image.new("L", (20, 14), 100), Image.new("RGB", (20, 14), (100, 100, 100))),
        (clear_red, Image.new("RGB", (20, 14), (255, 255, 255))),
        (clear_grey, Image.new("RGB", (20, 14), (255, 255, 255))),
        (sixteen, Image.fromarray(np.stack([halves] * 3, axis=-1))),
    ]


def test_non_rgb_images_are_converted_as_the_datasets_convert_them():
    # A PIL image a user opened (RGBA, LA, L, 16-bit) used to crash both CPU pipelines at the
    # normalisation with a channel-count error; it is now converted like load_image converts it.
    aug = _small()
    eval_transform = make_classification_eval_transform(resize_size=16, crop_size=16)
    for image, rgb in _non_rgb_twins():
        torch.manual_seed(3)
        crops = aug(image)
        torch.manual_seed(3)
        expected = aug(rgb)
        for got, want in zip(
            crops["global_crops"] + crops["local_crops"], expected["global_crops"] + expected["local_crops"]
        ):
            assert got.shape == want.shape and torch.equal(got, want), image.mode
        assert torch.equal(eval_transform(image), eval_transform(rgb)), image.mode
        torch.manual_seed(4)
        train_crop = make_classification_train_transform(crop_size=8)(image)
        torch.manual_seed(4)
        assert torch.equal(train_crop, make_classification_train_transform(crop_size=8)(rgb)), image.mode
