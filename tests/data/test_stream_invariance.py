"""Invariances of the real training data stream (``dinov2.train.data``, built as the trainer builds it):
batches are bit for bit the same for any worker setup and across a resume, ranks deal the world-1
stream between them, unreadable images are counted exactly once and shift no randomness, and the
GPU-augmentation parameters follow the configured probabilities and scales."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

import dinov2.train.data as train_data
from dinov2 import distributed
from dinov2.data.gpu_augmentation import PARAM_NAMES, P
from dinov2.utils.config import default_config_with

N_IMAGES, BAD = 9, 4  # a single class folder: dataset index i is file f"{i}.png"; file BAD is corrupt


def _write_folder(root, bad_content: bytes | None = b"not an image", replace_bad_with: int | None = None):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    pictures = [rng.integers(0, 256, (18 + i % 3, 22 + i % 4, 3), dtype=np.uint8) for i in range(N_IMAGES)]
    for i, pixels in enumerate(pictures):
        path = root / "a" / f"{i}.png"
        path.parent.mkdir(exist_ok=True)
        if i == BAD and replace_bad_with is not None:
            pixels = pictures[replace_bad_with]
        if i == BAD and bad_content is not None:
            path.write_bytes(bad_content)
        else:
            Image.fromarray(pixels).save(path)
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream")
    return {
        "corrupt": _write_folder(base / "corrupt"),
        "intact": _write_folder(base / "intact", bad_content=None),  # file BAD is a readable picture of its own
        "substitute": _write_folder(base / "substitute", bad_content=None, replace_bad_with=BAD + 1),
    }


def _cfg(root, num_workers=0, batch_size=3, gpu=False, **crops):
    return default_config_with(
        {
            "train": {"dataset_path": f"ImageFolder:root={root}", "batch_size_per_gpu": batch_size, "seed": 3,
                      "num_workers": num_workers, "gpu_augmentation": gpu, "device": "cpu"},
            "crops": {"global_crops_size": 16, "local_crops_size": 8, "local_crops_number": 2, **crops},
            "student": {"patch_size": 4},
        }
    )  # fmt: skip


def _batches(cfg, count, samples_consumed=0):
    loader = train_data.build_train_loader(cfg, train_data.build_train_dataset(cfg), samples_consumed=samples_consumed)
    return list(itertools.islice(iter(loader), count))


def _assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if torch.is_tensor(value):
            assert value.dtype == b[key].dtype and torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for one, other in zip(a, b):
        _assert_same_batch(one, other)


def _per_sample_crops(batches: list[dict]) -> list[torch.Tensor]:
    """Each sample's crops (global 1, global 2, locals) flattened into one tensor, in stream order; for
    batches of the GPU-augmentation mode its crop parameters and its image without the padding."""
    out = []
    for batch in batches:
        if "images" in batch:
            size, n_local = len(batch["images"]), len(batch["local_crop_params"]) // len(batch["images"])
            for j, (h, w) in enumerate(batch["image_sizes"].tolist()):
                rows = [batch["global_crop_params"][k * size + j] for k in range(2)]
                rows += [batch["local_crop_params"][k * size + j] for k in range(n_local)]
                out.append(torch.cat([torch.cat(rows), batch["images"][j, :, :h, :w].flatten().double()]))
            continue
        size = len(batch["collated_global_crops"]) // 2
        n_local = len(batch["collated_local_crops"]) // size
        for j in range(size):
            crops = [batch["collated_global_crops"][k * size + j] for k in range(2)]
            crops += [batch["collated_local_crops"][k * size + j] for k in range(n_local)]
            out.append(torch.cat([c.flatten() for c in crops]))
    return out


@pytest.fixture
def persistent_off_prefetch_one(monkeypatch):
    """The training loader built with non-persistent workers and a prefetch factor of 1."""
    real = train_data.make_data_loader

    def loader(*args, **kwargs):
        return real(*args, **{**kwargs, "persistent_workers": False, "prefetch_factor": 1})

    monkeypatch.setattr(train_data, "make_data_loader", loader)


@pytest.fixture
def world(monkeypatch):
    """Simulate rank ``r`` of ``w`` for everything that asks ``dinov2.distributed`` (sampler, worker seeding)."""

    def set_world(rank: int, size: int) -> None:
        monkeypatch.setattr(distributed, "get_rank", lambda *a, **k: rank)
        monkeypatch.setattr(distributed, "get_world_size", lambda *a, **k: size)

    return set_world


# ------------------------------------------------------------------------------- workers and resume
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-augmentation", "gpu-augmentation"])
def test_batches_are_the_same_for_any_worker_setup_and_any_resume(folders, gpu, request):
    def cfg(workers, **kw):
        return _cfg(folders["intact"], workers, gpu=gpu, **kw)

    reference = _batches(cfg(0), 6)  # the main process
    masks = [batch["collated_masks"] for batch in reference]
    assert masks[0].any() and not torch.equal(masks[0], masks[1])  # the comparisons below can fail
    _assert_same_batches(reference, _batches(cfg(3), 6))  # persistent workers, default prefetch
    _assert_same_batches(reference[1:], _batches(cfg(2), 5, samples_consumed=3))  # resumed after 1 step
    _assert_same_batches(reference[4:], _batches(cfg(0), 2, samples_consumed=12))  # after 4, other workers
    # another batch size after the resume (the same samples, cut into other batches): each sample is unchanged
    resumed = _per_sample_crops(_batches(cfg(1, batch_size=2), 3, samples_consumed=9))
    assert len(resumed) == 6 and all(torch.equal(a, b) for a, b in zip(_per_sample_crops(reference)[9:15], resumed))
    request.getfixturevalue("persistent_off_prefetch_one")
    _assert_same_batches(reference, _batches(cfg(2), 6))


# ------------------------------------------------------------------------------------------- ranks
def test_two_ranks_deal_the_world_one_stream_and_resume_on_one(folders, world):
    root = folders["intact"]
    single = _batches(_cfg(root, batch_size=2), 8)  # slots of 2 positions: batch k holds positions 2k, 2k + 1
    ranks = []
    for rank in (0, 1):
        world(rank, 2)
        ranks.append(_batches(_cfg(root, num_workers=1 if rank else 0, batch_size=2), 4))
    for step in range(4):  # step s of 2 ranks: slots 2s (rank 0) and 2s + 1 (rank 1), masks included
        _assert_same_batch(ranks[0][step], single[2 * step])
        _assert_same_batch(ranks[1][step], single[2 * step + 1])
    # the union over ranks of a step is the world-1 batch of twice the size, sample by sample
    world(0, 1)
    double = _batches(_cfg(root, batch_size=4), 4)
    per_step = [_per_sample_crops([ranks[0][s]]) + _per_sample_crops([ranks[1][s]]) for s in range(4)]
    union, doubled = list(itertools.chain(*per_step)), _per_sample_crops(double)
    assert len(union) == len(doubled) == 16 and all(torch.equal(a, b) for a, b in zip(union, doubled))
    # 2 steps on 2 ranks consumed 8 samples: one rank resuming there takes slots 4, 5, ... (docs/data.md)
    _assert_same_batches(single[4:], _batches(_cfg(root, num_workers=2, batch_size=2), 4, samples_consumed=8))


def test_no_sample_is_repeated_or_lost_across_pass_boundaries_on_two_ranks(world):
    from dinov2.data.seeding import PositionedSampler

    n, b, steps = 7, 3, 9  # slots straddle the passes (n is not a multiple of b or 2b)
    dealt = []
    for rank in (0, 1):
        world(rank, 2)
        dealt.append(list(itertools.islice(iter(PositionedSampler(n, b, seed=2)), steps * b)))
    stream = sorted(itertools.chain(*dealt))  # (position, index) pairs of both ranks
    assert [p for p, _ in stream] == list(range(2 * steps * b))
    for first in range(0, 2 * steps * b - n + 1, n):  # each complete pass holds every index once
        assert sorted(i for _, i in stream[first : first + n]) == list(range(n))
    world(0, 1)  # resuming the 2-rank run on one rank after 5 of its steps (30 samples) continues the stream
    resumed = list(itertools.islice(iter(PositionedSampler(n, b, seed=2, start=5 * 2 * b)), 8 * b))
    assert resumed == stream[30 : 30 + 8 * b]


def test_two_ranks_resuming_continue_their_own_slots(world):
    # A 2-rank run resumed on 2 ranks after 5 steps (start = 5 steps * 2 ranks * b samples): each rank
    # takes up its own next slots, so together they neither repeat nor skip a sample.
    from dinov2.data.seeding import PositionedSampler

    n, b, steps = 7, 3, 9
    for rank in (0, 1):
        world(rank, 2)
        uninterrupted = list(itertools.islice(iter(PositionedSampler(n, b, seed=2)), steps * b))
        resumed = list(itertools.islice(iter(PositionedSampler(n, b, seed=2, start=5 * 2 * b)), (steps - 5) * b))
        assert resumed == uninterrupted[5 * b :], rank


# ---------------------------------------------------------------------------------- corrupt images
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu-augmentation", "gpu-augmentation"])
def test_a_skipped_image_is_counted_once_and_shifts_no_randomness(folders, gpu):
    """9 images, batches of 3: 6 batches are exactly 2 passes, in which the corrupt file's index comes up
    twice. Every other sample is bit for bit what the folder with a readable file there gives; the
    corrupt one's sample is its substitute (the next file) under the same position's randomness."""
    corrupt = _batches(_cfg(folders["corrupt"], gpu=gpu), 6)
    assert [b["skipped_images"] for b in corrupt].count(1) == 2 and sum(b["skipped_images"] for b in corrupt) == 2
    first_pass = sum(b["skipped_images"] for b in corrupt[:3])
    assert first_pass == 1
    intact = _per_sample_crops(_batches(_cfg(folders["intact"], gpu=gpu), 6))
    substitute = _per_sample_crops(_batches(_cfg(folders["substitute"], gpu=gpu), 6))
    samples = _per_sample_crops(corrupt)
    differing = [q for q in range(18) if not torch.equal(samples[q], intact[q])]
    assert len(differing) == 2  # the two positions of the corrupt file, nothing after them
    assert all(torch.equal(samples[q], substitute[q]) for q in range(18))
    assert not torch.equal(substitute[differing[0]], substitute[differing[1]])  # two draws of the substitute
    # across workers and a resume: the same count, neither lost nor counted twice
    for workers, resume_workers in ((3, 0), (0, 2)):
        before = _batches(_cfg(folders["corrupt"], workers, gpu=gpu), 2)
        after = _batches(_cfg(folders["corrupt"], resume_workers, gpu=gpu), 4, samples_consumed=6)
        _assert_same_batches(corrupt, before + after)
        assert sum(b["skipped_images"] for b in before + after) == 2


# ---------------------------------------------------------------------------- GPU augmentation path
def _rate_within(bits, p: float, units: float = 4.5) -> bool:
    bits = np.asarray(bits, dtype=np.float64)
    if p in (0.0, 1.0):
        return bool(np.all(bits == p))
    return abs(bits.mean() - p) <= units * math.sqrt(p * (1 - p) / len(bits))


def test_gpu_augmentation_parameters_follow_the_configured_recipe(folders):
    """Through the training loader in GPU-augmentation mode, with non-default probabilities and scales:
    every rate within 4.5 binomial standard errors of its configured value, areas within the scales."""
    crops = dict(global_crops_scale=[0.5, 0.9], local_crops_scale=[0.1, 0.2], global_crops_1_blur_prob=1.0,
                 global_crops_2_blur_prob=0.1, local_crops_blur_prob=0.3, local_crops_number=3)  # fmt: skip
    cfg = _cfg(folders["intact"], batch_size=60, gpu=True, **crops)
    batches = _batches(cfg, 8)  # 480 samples, each image about 53 times
    half = len(batches[0]["image_sizes"])
    crop_1 = torch.cat([b["global_crop_params"][:half] for b in batches])  # crop-major: row k is image k % B
    crop_2 = torch.cat([b["global_crop_params"][half:] for b in batches])
    local_rows = torch.cat([b["local_crop_params"] for b in batches])
    global_rows = torch.cat([crop_1, crop_2])
    sizes = torch.cat([b["image_sizes"] for b in batches] * 2).double()
    local_sizes = torch.cat([b["image_sizes"].repeat(3, 1) for b in batches]).double()
    for rows, blur, solarize in ((crop_1, 1.0, 0.0), (crop_2, 0.1, 0.2), (local_rows, 0.3, 0.0)):
        column = {name: rows[:, P[name]].numpy() for name in PARAM_NAMES}
        for name, p in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", blur), ("solarize", solarize)):
            assert _rate_within(column[name], p), (name, column[name].mean(), p)
        sigma = column["sigma"][column["blur"] > 0]
        assert np.all((sigma >= 0.1) & (sigma <= 2.0)) and np.all(column["sigma"][column["blur"] == 0] == 0)
    for rows, image_sizes, (low, high) in ((global_rows, sizes, (0.5, 0.9)), (local_rows, local_sizes, (0.1, 0.2))):
        height, width = rows[:, P["height"]].double(), rows[:, P["width"]].double()
        area = height * width / (image_sizes[:, 0] * image_sizes[:, 1])
        slack = (height + width + 1) / (image_sizes[:, 0] * image_sizes[:, 1])  # get_params rounds h and w
        assert bool((area >= low - slack).all()) and bool((area <= high + slack).all())
        assert bool((rows[:, P["top"]] + height <= image_sizes[:, 0]).all())
        assert bool((rows[:, P["left"]] + width <= image_sizes[:, 1]).all())
    # rendered on the CPU device: exactly the crops drawn grayscale come out grey (the random-colour
    # pictures keep colour under any saturation factor >= 0.8), about the configured 0.2 of each kind
    gpu = train_data.build_gpu_augmentation(cfg)
    for kind, size in (("global", 16), ("local", 8)):
        grey, drawn = [], []
        for batch in batches:
            rows = batch[f"{kind}_crop_params"]
            x = gpu.render(batch["images"].float(), rows, size, normalize=False)
            grey.append((x.amax(dim=1) - x.amin(dim=1)).amax(dim=(1, 2)) < 1e-5)
            drawn.append(rows[:, P["grayscale"]] > 0)
        grey, drawn = torch.cat(grey), torch.cat(drawn)
        assert torch.equal(grey, drawn) and _rate_within(grey.numpy(), 0.2), kind
