"""Data-pipeline behaviour that a mutation audit found unpinned: each test fails on one plausible bug."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.data.collate import collate_data_and_cast
from dinov2.data.datasets import FileList, ImageFolder, to_rgb
from dinov2.data.loaders import make_data_loader
from dinov2.data.masking import MaskingGenerator
from dinov2.data.seeding import SeededSamples
from dinov2.data.transforms import GaussianBlur, make_classification_train_transform

# ---------------------------------------------------------------------------------------------- collate


def _global_only_samples(batch_size: int) -> list:
    return [({"global_crops": [torch.zeros(3, 4, 4)] * 2, "local_crops": []}, None) for _ in range(batch_size)]


@pytest.mark.parametrize("batch_size, mask_probability", [(3, 0.25), (3, 0.45), (5, 0.35), (4, 0.3)])
def test_the_number_of_masked_crops_is_rounded_down(batch_size, mask_probability):
    # 2B crops, floor(2B * p) of them masked (the recipe's int()); these cases have a fraction >= 0.5
    # or not, so rounding to nearest would mask one crop more in some of them
    n_crops = 2 * batch_size
    expected = math.floor(n_crops * mask_probability)
    for seed in range(5):
        out = collate_data_and_cast(
            _global_only_samples(batch_size), (0.2, 0.4), mask_probability, torch.float32,
            mask_generator=MaskingGenerator(8, max_num_patches=32), random_generator=random.Random(seed),
        )  # fmt: skip
        assert int((out["collated_masks"].sum(dim=1) > 0).sum()) == expected


# ---------------------------------------------------------------------------------------------- seeding


class _DrawsFromAllGenerators:
    num_skipped = 0

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        return (torch.rand(2), random.random(), float(np.random.rand())), index


def test_seeded_samples_leave_the_main_processs_generators_where_they_were():
    # in the main process (num_workers=0) the model's own randomness must keep its stream: every
    # generator the sample seeded is put back afterwards
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()
    samples = SeededSamples(_DrawsFromAllGenerators(), seed=7)
    first = samples[(5, 2)]
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1]
    after_np = np.random.get_state()
    assert after_np[0] == before[2][0] and np.array_equal(after_np[1], before[2][1]) and after_np[2:] == before[2][2:]
    # and the sample itself depends on (seed, position) only
    torch.rand(5), random.random(), np.random.rand()
    again = samples[(5, 2)]
    assert torch.equal(first[0][0], again[0][0]) and first[0][1:] == again[0][1:]


# ---------------------------------------------------------------------------------------------- transforms


def test_tensor_blur_kernel_covers_three_sigma():
    sigma = 1.0
    blur = GaussianBlur(p=1.0, radius_min=sigma, radius_max=sigma)
    impulse = torch.zeros(1, 21, 21)
    impulse[0, 10, 10] = 1.0
    out = blur(impulse)
    # a separable Gaussian over +-ceil(3 sigma) taps, normalised: the impulse response is its outer product
    half = math.ceil(3 * sigma)
    taps = torch.tensor([math.exp(-0.5 * (k / sigma) ** 2) for k in range(-half, half + 1)], dtype=torch.float64)
    taps /= taps.sum()
    expected = torch.zeros(21, 21, dtype=torch.float64)
    expected[10 - half : 10 + half + 1, 10 - half : 10 + half + 1] = torch.outer(taps, taps)
    torch.testing.assert_close(out[0].double(), expected, atol=1e-6, rtol=0)
    assert out[0, 10, 10 + half] > 0 and out[0, 10, 10 + half + 1] == 0


def test_train_transform_flips_with_the_given_probability():
    # an image that is not mirror-symmetric; the flip is drawn after the crop, so with the same seed
    # hflip_prob=1 gives the mirror image of what hflip_prob=0 (no flip step) gives
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    image = Image.fromarray(np.stack([ramp, ramp[:, ::-1], ramp], axis=-1))
    always = make_classification_train_transform(crop_size=16, hflip_prob=1.0)
    never = make_classification_train_transform(crop_size=16, hflip_prob=0.0)
    for seed in range(12):
        torch.manual_seed(seed)
        flipped = always(image)
        torch.manual_seed(seed)
        plain = never(image)
        torch.testing.assert_close(flipped, plain.flip(-1))


# ---------------------------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("persistent", [False, True])
def test_make_data_loader_passes_persistent_workers_and_prefetch_factor(persistent):
    loader = make_data_loader(
        list(range(8)), batch_size=2, num_workers=1, persistent_workers=persistent, prefetch_factor=3, pin_memory=False
    )
    assert loader.persistent_workers is persistent
    assert loader.prefetch_factor == 3


# ---------------------------------------------------------------------------------------------- decoding


def test_float_images_in_unit_range_are_scaled_to_eight_bits():
    values = [0.0, 0.2, 0.25, 0.5, 0.8, 1.0]
    image = Image.fromarray(np.array([values], dtype=np.float32), mode="F")
    rgb = np.asarray(to_rgb(image))
    expected = [int(np.rint(v * 255.0)) for v in values]  # 0.5 -> 127.5 -> 128 (half to even)
    assert rgb[0, :, 0].tolist() == expected == [0, 51, 64, 128, 204, 255]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_hidden_folders_are_not_classes_and_their_images_are_not_listed(tmp_path):
    for folder in ("a", ".cache", "b/.thumbs"):
        (tmp_path / folder).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / folder / "x.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "b" / "y.png")
    ds = ImageFolder(str(tmp_path))
    assert ds.classes == ["a", "b"]
    assert [ds.get_image_path(i) for i in range(len(ds))] == [str(tmp_path / "a/x.png"), str(tmp_path / "b/y.png")]


def test_sixteen_bit_grey_rounds_to_the_nearest_eight_bit_level():
    values = [0, 1, 128, 129, 200, 385, 386, 32767, 32768, 65406, 65407, 65535]
    image = Image.fromarray(np.array([values], dtype=np.uint16))
    assert image.mode == "I;16"
    rgb = np.asarray(to_rgb(image))
    # v * 255 / 65535 = v / 257 is never exactly half-way for an integer v: plain rounding, done exactly
    expected = [int(Fraction(v, 257) + Fraction(1, 2)) for v in values]
    assert rgb[0, :, 0].tolist() == expected
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()


def test_a_substituted_sample_carries_the_label_of_the_image_it_returns(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "a" / "0.png")
    (tmp_path / "a" / "1.png").write_bytes(b"")  # unreadable: index 1 falls through to index 2 (class b)
    Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / "b" / "0.png")
    ds = ImageFolder(str(tmp_path))
    assert ds.classes == ["a", "b"]
    image, target = ds[1]
    assert image.getpixel((0, 0)) == (0, 0, 255)
    assert target == 1
    assert ds.num_skipped == 1


def _four_bad_then_good(root):
    for i in range(4):
        (root / f"{i}.png").write_bytes(b"")
    Image.new("RGB", (4, 4), (9, 9, 9)).save(root / "4.png")


def test_the_failure_fraction_stop_applies_from_exactly_min_attempts(tmp_path):
    # the fifth attempt is the good image; the fourth failure is attempt 4
    _four_bad_then_good(tmp_path)
    stops = ImageFolder(str(tmp_path))
    stops.min_attempts_for_fraction = 4
    with pytest.raises(RuntimeError, match="4 of 4 decode attempts failed"):
        stops[0]
    goes_on = ImageFolder(str(tmp_path))
    goes_on.min_attempts_for_fraction = 5
    image, _ = goes_on[0]
    assert image.getpixel((0, 0)) == (9, 9, 9)
    assert (goes_on.num_attempts, goes_on.num_skipped) == (5, 4)


# ---------------------------------------------------------------------------------------------- file lists


def test_a_tab_introduces_the_label_even_after_a_path_with_a_comma(tmp_path):
    for name in ("photo, 2020.png", "other.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "list.txt").write_text("photo, 2020.png\t1\nother.png\t0\n")
    ds = FileList(str(tmp_path / "list.txt"))
    assert ds.get_image_path(0) == str(tmp_path / "photo, 2020.png")
    assert ds.get_targets().tolist() == [1, 0]
    (tmp_path / "bad.txt").write_text("other.png\tcat\n")
    with pytest.raises(ValueError, match="not an integer"):
        FileList(str(tmp_path / "bad.txt"))


def test_file_list_num_classes_is_the_largest_label_plus_one(tmp_path):
    for name in ("x.png", "y.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "list.txt").write_text("x.png 0\ny.png 2\n")  # class 1 has no image here
    assert FileList(str(tmp_path / "list.txt")).num_classes == 3
