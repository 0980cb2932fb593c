"""Block masking generator and the SSL collate function."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator

# ---------------------------------------------------------------------------------------------- masking


def _bounding_box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def test_shape_and_zero_request():
    gen = MaskingGenerator((6, 9), max_num_patches=20)
    assert gen.get_shape() == (6, 9)
    assert MaskingGenerator(5).get_shape() == (5, 5)
    mask = gen()
    assert mask.shape == (6, 9) and mask.dtype == np.bool_ and not mask.any()
    assert not gen(0).any()


@pytest.mark.parametrize("min_num_patches, min_exact_rate", [(1, 0.99), (4, 0.85)])
def test_counts_never_exceed_and_usually_equal_request(min_num_patches, min_exact_rate):
    gen = MaskingGenerator(16, min_num_patches=min_num_patches, max_num_patches=128, rng=random.Random(0))
    requests = list(range(1, 129)) * 3
    counts = [int(gen(n).sum()) for n in requests]
    assert all(c <= n for c, n in zip(counts, requests))
    assert all(c > 0 for c, n in zip(counts, requests) if n >= min_num_patches)
    assert np.mean([c == n for c, n in zip(counts, requests)]) >= min_exact_rate


@pytest.mark.parametrize("aspect, shape", [(1.0, (4, 4)), (4.0, (8, 2)), (0.25, (2, 8))])
def test_single_rectangle(aspect, shape):
    # area fixed to 16 and aspect (height / width) fixed: one call places exactly one h x w rectangle
    gen = MaskingGenerator(14, min_num_patches=16, max_num_patches=16, min_aspect=aspect, max_aspect=aspect)
    for seed in range(5):
        gen.rng = random.Random(seed)
        mask = gen(16)
        assert mask.sum() == 16
        box = _bounding_box(mask)
        assert box.shape == shape and box.all()


@pytest.mark.parametrize("grid", [(4, 4), (4, 6), (6, 4)])
def test_a_rectangle_never_spans_the_grid(grid):
    # one placement on an empty mask with a budget of the whole grid: BEiT/iBOT reject a rectangle whose
    # height reaches the grid's height or whose width reaches its width, so none covers a full column/row
    height, width = grid
    gen = MaskingGenerator(grid, min_num_patches=1, max_num_patches=height * width)
    rng = random.Random(0)
    sides = []
    for _ in range(1000):
        mask = np.zeros(grid, dtype=bool)
        added = gen._add_rectangle(mask, height * width, rng)
        if added == 0:
            continue
        box = _bounding_box(mask)
        assert box.all() and box.size == added == mask.sum()
        sides.append(box.shape)
    assert len(sides) > 500
    tallest, widest = max(h for h, _ in sides), max(w for _, w in sides)
    assert tallest < height and widest < width, f"a {tallest}-high or {widest}-wide rectangle on {grid}"
    assert (tallest, widest) == (height - 1, width - 1)  # the bound is reached, so the check is not vacuous


def _has_full_3x3(mask: np.ndarray) -> bool:
    return bool(np.lib.stride_tricks.sliding_window_view(mask, (3, 3)).all(axis=(-1, -2)).any())


def test_max_num_patches_caps_each_rectangle():
    # square rectangles of area in [1, cap]: a cap of 4 allows sides 1 or 2 only, no cap allows 3x3 blocks
    def masks(max_num_patches):
        gen = MaskingGenerator(30, min_num_patches=1, max_num_patches=max_num_patches, min_aspect=1.0)
        gen.rng = random.Random(0)
        return [gen(12) for _ in range(20)]

    capped = masks(4)
    assert all(m.sum() == 12 for m in capped)
    assert not any(_has_full_3x3(m) for m in capped)
    assert any(_has_full_3x3(m) for m in masks(None))


def test_reproducible_with_rng():
    def draw(seed):
        gen = MaskingGenerator((10, 12), max_num_patches=60, rng=random.Random(seed))
        return [gen(n) for n in (10, 30, 60)]

    first, again, other = draw(3), draw(3), draw(4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_module_random_is_the_default():
    gen = MaskingGenerator(10, max_num_patches=50)
    random.seed(7)
    first = gen(40)
    random.seed(7)
    assert np.array_equal(first, gen(40))


# ---------------------------------------------------------------------------------------------- collate

B, N_LOCAL, GRID = 3, 4, (8, 8)
N_TOKENS = GRID[0] * GRID[1]


def _samples(batch_size=B, n_local=N_LOCAL):
    """Crops are constant tensors encoding their sample and crop: 100 * sample + crop id."""
    samples = []
    for s in range(batch_size):
        crops = {
            "global_crops": [torch.full((3, 8, 8), 100.0 * s + c) for c in range(2)],
            "local_crops": [torch.full((3, 4, 4), 100.0 * s + 10 + j) for j in range(n_local)],
            "offsets": (),
        }
        crops["global_crops_teacher"] = crops["global_crops"]
        samples.append((crops, s))
    return samples


def _collate(seed=0, mask_probability=0.5, ratio=(0.1, 0.5), dtype=torch.float32, **kwargs):
    gen = MaskingGenerator(GRID, max_num_patches=int(0.5 * N_TOKENS), rng=random.Random(seed + 1000))
    return collate_data_and_cast(
        _samples(**kwargs), ratio, mask_probability, dtype, N_TOKENS, gen, random_generator=random.Random(seed)
    )


def test_shapes_and_dtypes():
    out = _collate(dtype=torch.bfloat16)
    assert out["collated_global_crops"].shape == (2 * B, 3, 8, 8)
    assert out["collated_local_crops"].shape == (N_LOCAL * B, 3, 4, 4)
    assert out["collated_global_crops"].dtype == out["collated_local_crops"].dtype == torch.bfloat16
    assert out["collated_masks"].shape == (2 * B, N_TOKENS) and out["collated_masks"].dtype == torch.bool
    assert out["mask_indices_list"].dtype == torch.int64 and out["mask_indices_list"].dim() == 1
    assert out["masks_weight"].dtype == torch.float32
    assert out["n_masked_patches"].dtype == torch.int64 and out["n_masked_patches"].shape == (1,)
    assert isinstance(out["upperbound"], int)


def test_crop_major_ordering():
    out = _collate()
    for c in range(2):
        for s in range(B):
            assert (out["collated_global_crops"][c * B + s] == 100 * s + c).all()
    for j in range(N_LOCAL):
        for s in range(B):
            assert (out["collated_local_crops"][j * B + s] == 100 * s + 10 + j).all()


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mask_probability", [0.5, 0.34, 1.0])
def test_mask_bookkeeping(seed, mask_probability):
    ratio = (0.1, 0.5)
    out = _collate(seed=seed, mask_probability=mask_probability, ratio=ratio)
    masks = out["collated_masks"]
    n_masked_crops = int(2 * B * mask_probability)
    per_crop = masks.sum(dim=1).tolist()
    assert sum(n > 0 for n in per_crop) == n_masked_crops

    flat = masks.flatten().tolist()
    expected_indices = [i for i, v in enumerate(flat) if v]
    assert out["mask_indices_list"].tolist() == expected_indices
    expected_weights = [1.0 / per_crop[i // N_TOKENS] for i in expected_indices]
    torch.testing.assert_close(out["masks_weight"], torch.tensor(expected_weights))
    assert out["n_masked_patches"].tolist() == [len(expected_indices)]

    # bin k of the ratio range is [lo + (hi - lo) * k / m, lo + (hi - lo) * (k + 1) / m]
    lo, hi = ratio
    bounds = [int(N_TOKENS * (lo + (hi - lo) * (k + 1) / n_masked_crops)) for k in range(n_masked_crops)]
    assert out["upperbound"] == sum(bounds)
    assert out["upperbound"] >= len(expected_indices)
    masked_counts = sorted(n for n in per_crop if n > 0)
    assert all(n <= b for n, b in zip(masked_counts, sorted(bounds)))


def test_weights_give_per_image_mean():
    out = _collate()
    masks = out["collated_masks"]
    crop_of_token = out["mask_indices_list"] // N_TOKENS
    totals = torch.zeros(2 * B).index_add_(0, crop_of_token, out["masks_weight"])
    torch.testing.assert_close(totals, (masks.sum(1) > 0).float())


def test_no_masking():
    out = _collate(mask_probability=0.0)
    assert not out["collated_masks"].any()
    assert out["mask_indices_list"].numel() == 0 and out["masks_weight"].numel() == 0
    assert out["upperbound"] == 0 and out["n_masked_patches"].tolist() == [0]


def test_masks_are_shuffled_across_crops():
    positions = set()
    for seed in range(10):
        masks = _collate(seed=seed)["collated_masks"]
        positions.add(tuple(masks.any(dim=1).tolist()))
    assert len(positions) > 1


def test_reproducible_with_random_generator():
    first, again, other = _collate(seed=5), _collate(seed=5), _collate(seed=6)
    for key in ("collated_masks", "mask_indices_list", "masks_weight", "n_masked_patches"):
        assert torch.equal(first[key], again[key])
    assert first["upperbound"] == again["upperbound"]
    assert not torch.equal(first["collated_masks"], other["collated_masks"])


def test_mismatched_n_tokens_and_missing_generator():
    gen = MaskingGenerator(GRID, max_num_patches=32)
    with pytest.raises(ValueError):
        collate_data_and_cast(_samples(), (0.1, 0.5), 0.5, torch.float32, N_TOKENS + 1, gen)
    with pytest.raises(ValueError):
        collate_data_and_cast(_samples(), (0.1, 0.5), 0.5, torch.float32, N_TOKENS, None)
    # n_tokens defaults to the generator's grid size
    out = collate_data_and_cast(_samples(), (0.1, 0.5), 0.5, torch.float32, mask_generator=gen)
    assert out["collated_masks"].shape == (2 * B, N_TOKENS)


def test_with_dino_augmentation():
    aug = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, global_crops_size=32, local_crops_size=16)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    samples = [(aug(image), 0) for _ in range(2)]
    gen = MaskingGenerator(4, max_num_patches=8)  # 32 px crops, patch size 8
    out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, torch.float16, 16, gen, random.Random(0))
    assert out["collated_global_crops"].shape == (4, 3, 32, 32)
    assert out["collated_local_crops"].shape == (4, 3, 16, 16)
    assert torch.equal(out["collated_global_crops"][1], samples[1][0]["global_crops"][0].half())
    assert torch.equal(out["collated_local_crops"][2], samples[0][0]["local_crops"][1].half())


def test_training_collate_pickles_for_spawned_workers():
    # DataLoader workers started by spawn/forkserver (macOS; Linux from Python 3.14) receive the collate
    # pickled: the default generator (the ``random`` module) must not be stored in it.
    import pickle

    from dinov2.train.data import build_collate
    from dinov2.utils.config import default_config_with

    cfg = default_config_with({"crops": {"global_crops_size": 32}, "student": {"patch_size": 8}})
    collate = build_collate(cfg)
    copy = pickle.loads(pickle.dumps(collate))
    samples = [(crops, target, 0, position) for position, (crops, target) in enumerate(_samples())]
    for key in ("collated_masks", "mask_indices_list", "masks_weight"):
        assert torch.equal(copy(samples)[key], collate(samples)[key])
    unseeded = pickle.loads(pickle.dumps(MaskingGenerator(GRID, max_num_patches=32)))
    random.seed(5)
    first = unseeded(20)
    random.seed(5)
    assert first.sum() > 0 and np.array_equal(first, unseeded(20))  # still the module's generator


class _FirstTokensGenerator:
    """Stands in for MaskingGenerator: a request for ``n`` tokens masks exactly the first ``n``, so a
    collated mask's size is the count the collate asked for."""

    def __init__(self, shape):
        self.shape = shape

    def get_shape(self):
        return self.shape

    def __call__(self, num_masking_patches=0, rng=None):
        mask = np.zeros(self.shape[0] * self.shape[1], dtype=bool)
        mask[:num_masking_patches] = True
        return mask.reshape(self.shape)


def test_mask_ratios_are_uniform_within_each_bin():
    # The m masked crops of a batch get ratios uniform in the m equal bins splitting mask_ratio_min_max,
    # one bin each: the k-th smallest request lies in bin k, with the mean and spread of a uniform draw.
    n_tokens, ratio, draws = 400, (0.1, 0.5), 300
    m = int(2 * B * 0.5)
    edges = np.linspace(*ratio, m + 1) * n_tokens
    counts = []
    for seed in range(draws):
        out = collate_data_and_cast(
            _samples(), ratio, 0.5, torch.float32, n_tokens, _FirstTokensGenerator((20, 20)), random.Random(seed)
        )
        sizes = sorted(n for n in out["collated_masks"].sum(dim=1).tolist() if n > 0)
        assert len(sizes) == m
        counts.append(sizes)
    counts = np.array(counts, dtype=np.float64)  # (draws, m): column k is bin k
    for k in range(m):
        low, high = edges[k], edges[k + 1]
        assert counts[:, k].min() >= int(low) and counts[:, k].max() <= int(high), k
        width = high - low  # a uniform draw: mean at the middle, std width / sqrt(12)
        assert abs(counts[:, k].mean() - (low + high) / 2) < 4 * width / np.sqrt(12 * draws), k
        assert 0.8 < counts[:, k].std() / (width / np.sqrt(12)) < 1.2, k


def test_training_mask_generator_follows_the_recipe():
    # Block-wise masking as in iBOT / DINOv2: rectangles of at least 4 patches, aspect ratio in
    # (0.3, 1 / 0.3), each at most half the grid; half the global crops masked, ratios in (0.1, 0.5).
    import math

    from dinov2.train.data import build_collate
    from dinov2.utils.config import default_config_with

    collate = build_collate(default_config_with({"crops": {"global_crops_size": 224}, "student": {"patch_size": 14}}))
    settings = collate.keywords
    generator = settings["mask_generator"]
    assert generator.get_shape() == (16, 16) and settings["n_tokens"] == 256
    assert generator.min_num_patches == 4 and generator.max_num_patches == 128
    assert generator.log_aspect_ratio == pytest.approx((math.log(0.3), -math.log(0.3)))
    assert settings["mask_probability"] == 0.5 and tuple(settings["mask_ratio_tuple"]) == (0.1, 0.5)


# ----------------------------------------------------------------------------- found by a mutation audit
class _FixedArea:
    """A ``random.Random`` stand-in: every rectangle has area ``area`` and aspect 1, at the top-left."""

    def __init__(self, area):
        self.area = area

    def uniform(self, low, high):
        return 0.0 if low < 0 else self.area  # the log-aspect range is (log a, -log a): centred on 0

    def randint(self, low, high):
        return low


def _recorded_budgets(monkeypatch, limit=None):
    """The budget of every rectangle the generators try from now on; past ``limit`` tries, an
    AssertionError stops a generator that would never return."""
    budgets, real = [], MaskingGenerator._add_rectangle

    def recorded(self, mask, budget, rng):
        budgets.append(budget)
        if limit is not None and len(budgets) > limit:
            raise AssertionError(f"still trying rectangles after {limit} tries")
        return real(self, mask, budget, rng)

    monkeypatch.setattr(MaskingGenerator, "_add_rectangle", recorded)
    return budgets


def test_rectangle_sides_are_rounded_to_the_nearest_patch():
    # area 13 at aspect 1: sides sqrt(13) = 3.6 round to 4 (a 4 x 4 block), not down to 3
    mask = MaskingGenerator(8, min_num_patches=4)(20, rng=_FixedArea(13))
    assert mask.sum() == 16 and mask[:4, :4].all()


def test_each_rectangle_is_capped_by_the_masking_count_when_no_maximum_is_given(monkeypatch):
    gen = MaskingGenerator(16, num_masking_patches=10, min_num_patches=4, rng=random.Random(0))
    budgets = _recorded_budgets(monkeypatch)
    gen(60)
    assert budgets and max(budgets) == 10  # every rectangle drawn with an area of at most 10


def test_an_aspect_range_whose_minimum_exceeds_its_maximum_is_refused():
    with pytest.raises(ValueError, match=r"need 0 < min_aspect <= max_aspect, got 2.0, 1.0"):
        MaskingGenerator(8, min_aspect=2.0, max_aspect=1.0)


def test_rectangles_reach_every_row_and_column_of_the_grid():
    gen = MaskingGenerator(8, min_num_patches=4, max_num_patches=16, rng=random.Random(0))
    covered = np.zeros((8, 8), dtype=int)
    for _ in range(300):
        covered += gen(12)
    assert (covered.sum(axis=1) > 0).all() and (covered.sum(axis=0) > 0).all()


def test_a_request_that_no_rectangle_fits_gives_up_after_one_round_of_tries(monkeypatch):
    gen = MaskingGenerator(4, min_num_patches=20, rng=random.Random(0))  # every rectangle spans the grid
    rounds = _recorded_budgets(monkeypatch, limit=3)
    assert not gen(8).any() and rounds == [8]


def test_an_empty_crop_group_has_the_batch_dtype():
    out = _collate(dtype=torch.bfloat16, n_local=0)
    assert out["collated_local_crops"].shape == (0,) and out["collated_local_crops"].dtype == torch.bfloat16


@pytest.mark.parametrize("ratios", [(0.1, 0.2, 0.5), (0.3,)])
def test_a_mask_ratio_range_that_is_not_a_pair_is_refused(ratios):
    from dinov2.data.collate import check_mask_settings

    with pytest.raises(ValueError, match=r"ibot: mask_ratio_tuple must be a \(min, max\) pair"):
        check_mask_settings(ratios, 0.5, where="ibot")
