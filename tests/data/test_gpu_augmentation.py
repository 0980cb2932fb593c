"""GPU-side multi-crop augmentation (train.gpu_augmentation): the parameters are the CPU path's draws,
the device ops match independent references, and the outputs follow the CPU path's distributions."""

from __future__ import annotations

import colorsys
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.gpu_augmentation import (
    PARAM_NAMES,
    GPUMultiCrop,
    MultiCropParams,
    P,
    adjust_hue,
    blend_step,
    color_jitter,
    gaussian_blur,
    pad_images,
)
from dinov2.data.seeding import SeededSamples
from dinov2.train.data import build_collate, build_gpu_augmentation, build_gpu_collate
from dinov2.utils.config import default_config_with

KW = dict(global_crops_scale=(0.32, 1.0), local_crops_scale=(0.05, 0.32), local_crops_number=4,
          global_crops_size=32, local_crops_size=16)  # fmt: skip
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def make_image(seed: int, size=(80, 64)) -> Image.Image:
    """Coloured ellipses on a coloured background, with luminance noise as texture."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        x1, y1 = x0 + int(rng.integers(10, 40)), y0 + int(rng.integers(10, 40))
        draw.ellipse([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 8, (size[1], size[0], 1))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def ks_statistic(a, b) -> float:
    a, b = np.sort(np.asarray(a, dtype=np.float64)), np.sort(np.asarray(b, dtype=np.float64))
    grid = np.concatenate([a, b])
    cdf_a, cdf_b = np.searchsorted(a, grid, side="right") / len(a), np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def ks_critical(n: int, m: int, alpha: float = 1e-3) -> float:
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def assert_rate(bits, p: float) -> None:
    bits = np.asarray(bits, dtype=np.float64)
    if p in (0.0, 1.0):
        assert np.all(bits == p)
    else:
        assert abs(bits.mean() - p) <= 4.5 * math.sqrt(p * (1 - p) / len(bits)), (bits.mean(), p)


def draw_params(n_images: int, seed: int = 0, size=(80, 64)) -> torch.Tensor:
    """(n_images, 2 + local, P) parameters for one image size."""
    transform, image = MultiCropParams(**KW), make_image(0, size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(image)["params"] for _ in range(n_images)])


def cpu_crop_stacks(images, seeds, settings=KW) -> list[torch.Tensor]:
    """The CPU path's crops in [0, 1], torch's generator seeded by ``seeds`` per image: one (n_images, 3, S, S)
    tensor per crop slot (global 1, global 2, then the local crops)."""
    cpu, per_image = DataAugmentationDINO(**settings), []
    for image, seed in zip(images, seeds):
        torch.manual_seed(seed)
        out = cpu(image)
        per_image.append([c * STD[0] + MEAN[0] for c in out["global_crops"] + out["local_crops"]])
    return [torch.stack(slot) for slot in zip(*per_image)]


def gpu_crop_stacks(images, seeds, settings=KW) -> list[torch.Tensor]:
    """As :func:`cpu_crop_stacks` for the device path, which renders the whole batch at once."""
    params, gpu = MultiCropParams(**settings), GPUMultiCrop(settings["global_crops_size"], settings["local_crops_size"])
    drawn = []
    for image, seed in zip(images, seeds):
        torch.manual_seed(seed)
        drawn.append(params(image))
    pixels = pad_images([d["image"] for d in drawn])[0].float()
    rows = torch.stack([d["params"] for d in drawn]).transpose(0, 1)  # (crops, B, P): rendered crop-major
    n, n_local = len(drawn), rows.shape[0] - 2
    global_crops = gpu.render(pixels, rows[:2].flatten(0, 1), settings["global_crops_size"], normalize=False)
    local_crops = gpu.render(pixels, rows[2:].flatten(0, 1), settings["local_crops_size"], normalize=False)
    return [*global_crops.unflatten(0, (2, n)), *local_crops.unflatten(0, (n_local, n))]


def cpu_and_gpu_crops(images, seeds) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every crop of both paths (per image: global 1, global 2, locals), each (1, 3, S, S) in [0, 1],
    torch's generator seeded alike per image."""

    def per_image(stacks):
        return [slot[i][None] for i in range(len(images)) for slot in stacks]

    return per_image(cpu_crop_stacks(images, seeds)), per_image(gpu_crop_stacks(images, seeds))


# ------------------------------------------------------------------------------------------ parameters
def test_params_are_the_cpu_paths_draws():
    """Seeded alike, both paths consume the same draws and produce nearly the same crops; a crop
    compared with another crop of the same image differs by far more (the comparison can fail)."""
    cpu, params = DataAugmentationDINO(**KW), MultiCropParams(**KW)
    for seed in range(5):
        torch.manual_seed(seed)
        cpu(make_image(seed))
        after_cpu = torch.get_rng_state()
        torch.manual_seed(seed)
        params(make_image(seed))
        assert torch.equal(after_cpu, torch.get_rng_state())
    cpu_crops, gpu_crops = cpu_and_gpu_crops([make_image(s) for s in range(20)], range(20))
    paired = np.array([(a - b).abs().mean().item() for a, b in zip(cpu_crops, gpu_crops)])
    shifted = np.array([(a - b).abs().mean().item() for a, b in zip(cpu_crops[0::6], gpu_crops[1::6])])
    assert paired.mean() < 0.012 and paired.max() < 0.03, (paired.mean(), paired.max())
    assert np.median(shifted) > 10 * np.median(paired) and shifted.mean() > 10 * paired.mean()


def test_param_rates_and_ranges():
    params = draw_params(800)
    kinds = {"global 1": params[:, 0], "global 2": params[:, 1], "local": params[:, 2:].reshape(-1, len(PARAM_NAMES))}
    blur = {"global 1": 0.0, "global 2": 0.9, "local": 0.5}
    for kind, rows in kinds.items():
        column = {name: rows[:, P[name]].numpy() for name in PARAM_NAMES}
        scale = KW["local_crops_scale"] if kind == "local" else KW["global_crops_scale"]
        area = column["height"] * column["width"] / (80 * 64)
        slack = (column["height"] + column["width"] + 1) / (80 * 64)  # get_params rounds h and w
        assert np.all(area >= scale[0] - slack) and np.all(area <= scale[1] + slack)
        log_ratio = np.log(column["width"] / column["height"])
        assert np.all(np.abs(log_ratio) <= math.log(4 / 3) + 1.0 / column["height"] + 1.0 / column["width"])
        assert np.all(column["top"] + column["height"] <= 64) and np.all(column["left"] + column["width"] <= 80)
        for name, p in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", blur[kind])):
            assert_rate(column[name], p)
        assert_rate(column["solarize"], 0.2 if kind == "global 2" else 0.0)
        jittered = column["jitter"] > 0
        ranges = {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
        for name, (low, high) in ranges.items():
            values = column[name][jittered]
            assert values.min() >= low and values.max() <= high
            assert abs(values.mean() - (low + high) / 2) < 0.1 * (high - low)
            assert np.all(column[name][~jittered] == (0.0 if name == "hue" else 1.0))
        orders = rows[:, P["order0"] : P["order3"] + 1]
        assert torch.equal(orders.sort(dim=1).values, torch.arange(4.0).expand_as(orders))
        sigma = column["sigma"][column["blur"] > 0]
        assert np.all(column["sigma"][column["blur"] == 0] == 0)
        if len(sigma):
            assert sigma.min() >= 0.1 and sigma.max() <= 2.0
            uniform = np.random.default_rng(1).uniform(0.1, 2.0, 4000)
            assert ks_statistic(sigma, uniform) < ks_critical(len(sigma), len(uniform))


def test_crop_boxes_follow_torchvisions_sampling():
    ours = draw_params(600, seed=3)[:, 2]  # a local crop of each image
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        image = make_image(0)
        boxes = [T.RandomResizedCrop.get_params(image, [0.05, 0.32], [3 / 4, 4 / 3]) for _ in range(600)]
    reference = torch.tensor(boxes)
    top, left, height, width = (ours[:, P[k]] for k in ("top", "left", "height", "width"))
    statistics = {
        "area": (height * width, reference[:, 2] * reference[:, 3]),
        "log ratio": ((width / height).log(), (reference[:, 3] / reference[:, 2]).double().log()),
        "centre x": (left + width / 2, reference[:, 1] + reference[:, 3] / 2),
        "centre y": (top + height / 2, reference[:, 0] + reference[:, 2] / 2),
    }
    for name, (a, b) in statistics.items():
        assert ks_statistic(a.numpy(), b.numpy()) < ks_critical(600, 600), name
    global_area = draw_params(600, seed=3)[:, 0]  # the other scale range is clearly told apart
    assert ks_statistic((global_area[:, 2] * global_area[:, 3]).numpy(), statistics["area"][1].numpy()) > 0.5


def test_same_position_gives_the_same_params():
    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return MultiCropParams(**KW)(make_image(index)), -1

    samples = SeededSamples(Images(), seed=7)
    first = samples[(12, 1)][0]["params"]
    torch.rand(5)  # the global generator moved on
    assert torch.equal(samples[(12, 1)][0]["params"], first)
    assert not torch.equal(samples[(13, 1)][0]["params"], first)


def test_large_images_are_downscaled_with_their_boxes():
    image = make_image(2, size=(300, 200))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        full = MultiCropParams(**KW, max_image_side=1000)(image)
        torch.manual_seed(4)
        small = MultiCropParams(**KW)(image)  # default limit 4 * 32 = 128
    assert tuple(full["image"].shape) == (3, 200, 300) and tuple(small["image"].shape) == (3, 85, 128)
    torch.testing.assert_close(small["params"][:, P["top"]], full["params"][:, P["top"]] * 85 / 200)
    torch.testing.assert_close(small["params"][:, P["width"]], full["params"][:, P["width"]] * 128 / 300)
    torch.testing.assert_close(small["params"][:, P["flip"] :], full["params"][:, P["flip"] :])


# ------------------------------------------------------------------------------------------ device ops
def _float_crops(n=6, size=20, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.rand(n, 3, size + 3, size + 3, generator=generator), 4, stride=1)  # smooth, in [0, 1]


def test_blend_ops_and_hue_match_torchvision():
    x = _float_crops()
    factors = torch.tensor([[0.6, 1.4, 0.8, 0.0], [1.4, 0.6, 1.2, 0.0]]).repeat(3, 1)
    for op, reference in enumerate((TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)):
        ours = blend_step(x, torch.full((6,), op), factors)
        expected = torch.stack([reference(x[i], factors[i, op].item()) for i in range(6)])
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    shifts = torch.tensor([-0.5, -0.1, -0.03, 0.0, 0.05, 0.1])
    expected = torch.stack([TF.adjust_hue(x[i], shifts[i].item()) for i in range(6)])
    torch.testing.assert_close(adjust_hue(x, shifts), expected, atol=2e-5, rtol=0)
    assert torch.equal(adjust_hue(x, shifts)[3], x[3])
    assert (adjust_hue(x, shifts)[1] - x[1]).abs().max() > 0.05


def test_color_jitter_applies_each_samples_order():
    n = 24
    x = _float_crops(n, seed=1)
    generator = torch.Generator().manual_seed(2)
    params = torch.zeros(n, len(PARAM_NAMES))
    params[:, P["brightness"] : P["saturation"] + 1] = 0.6 + 0.8 * torch.rand(n, 3, generator=generator)
    params[:, P["hue"]] = 0.2 * torch.rand(n, generator=generator) - 0.1
    orders = torch.stack([torch.randperm(4, generator=generator) for _ in range(n)])
    params[:, P["order0"] : P["order3"] + 1] = orders.float()
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    expected = []
    for i in range(n):
        crop = x[i]
        for op in orders[i].tolist():
            crop = ops[op](crop, params[i, P["brightness"] + op].item())
        expected.append(crop)
    torch.testing.assert_close(color_jitter(x, params), torch.stack(expected), atol=3e-5, rtol=0)


def test_gaussian_blur_matches_torchvision():
    x = _float_crops(5, size=24)
    sigma = torch.tensor([0.0, 0.1, 0.7, 1.3, 2.0])
    ours = gaussian_blur(x, sigma)
    assert torch.equal(ours[0], x[0])
    for i in range(1, 5):
        kernel = 2 * math.ceil(3 * sigma[i].item()) + 1
        expected = TF.gaussian_blur(x[i], [kernel, kernel], [sigma[i].item()] * 2)
        torch.testing.assert_close(ours[i], expected, atol=1e-5, rtol=0)


def _row(top, left, height, width, **bits) -> torch.Tensor:
    row = torch.zeros(len(PARAM_NAMES))
    row[[P["top"], P["left"], P["height"], P["width"]]] = torch.tensor([top, left, height, width], dtype=torch.float32)
    identity = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "order1": 1.0, "order2": 2.0, "order3": 3.0}
    for name, value in {**identity, **bits}.items():
        row[P[name]] = value
    return row


def test_crop_flip_grayscale_solarize_against_references():
    small, big = (torch.rand(3, 16, 16) * 255).round(), (torch.rand(3, 40, 36) * 255).round()
    images, sizes = pad_images([small.to(torch.uint8), big.to(torch.uint8)])
    assert images.shape == (2, 3, 40, 36) and sizes.tolist() == [[16, 16], [40, 36]]
    pixels, gpu = images.float(), GPUMultiCrop(16, 8)
    unit = small[None] / 255

    def render(size, *rows):  # rows for image 0 (crop-major with B = 2: even rows)
        stacked = torch.stack([r for row in rows for r in (row, _row(0, 0, 40, 36))])
        return gpu.render(pixels, stacked, size, normalize=False)[0::2]

    torch.testing.assert_close(render(16, _row(0, 0, 16, 16)), unit, atol=1e-5, rtol=0)  # padding never leaks
    torch.testing.assert_close(render(16, _row(0, 0, 16, 16, flip=1)), unit.flip(-1), atol=1e-5, rtol=0)
    gray = TF.rgb_to_grayscale(unit, num_output_channels=3)
    torch.testing.assert_close(render(16, _row(0, 0, 16, 16, grayscale=1)), gray, atol=1e-5, rtol=0)
    torch.testing.assert_close(render(16, _row(0, 0, 16, 16, solarize=1)), TF.solarize(unit, 0.5), atol=1e-5, rtol=0)
    upsampled = F.interpolate(unit, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(render(32, _row(0, 0, 16, 16)), upsampled, atol=1e-5, rtol=0)
    torch.testing.assert_close(render(8, _row(0, 0, 16, 16)), F.avg_pool2d(unit, 2), atol=1e-5, rtol=0)
    corner = GPUMultiCrop(16, 8).render(small[None], _row(6, 4, 10, 12)[None], 8, normalize=False)
    torch.testing.assert_close(render(8, _row(6, 4, 10, 12)), corner, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------- whole pipeline
def make_field_image(seed: int, size=(80, 64)) -> tuple[Image.Image, dict[str, float]]:
    """One colour over the whole image, times a per-pixel luminance texture and a brightness ramp
    rising from left to right, with its colour statistics. Every crop of it has about the image's colour,
    so what changes a crop's brightness, saturation and hue is the colour jitter; the texture shows blur,
    the ramp shows flips."""
    rng = np.random.default_rng(seed)
    base = 255 * np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.4, 0.8), rng.uniform(0.7, 0.9)))
    ramp = np.linspace(0.75, 1.15, size[0])[None, :, None]
    texture = 1 + rng.normal(0, 0.12, (size[1], size[0], 1))
    pixels = (base * ramp * texture).clip(0, 255).astype(np.uint8)
    unit = torch.from_numpy(pixels).permute(2, 0, 1)[None].double() / 255
    return Image.fromarray(pixels), {k: v.item() for k, v in crop_colour(unit).items()}


def _luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def crop_colour(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per crop of (n, 3, H, W) in [0, 1]: mean luma, mean HSV saturation, and the hue angle (turns) of
    the mean opponent-colour vector (r - (g + b) / 2, (g - b) sqrt(3) / 2)."""
    high, low = x.amax(1), x.amin(1)
    opponent_a = (x[:, 0] - (x[:, 1] + x[:, 2]) / 2).mean((1, 2))
    opponent_b = (x[:, 1] - x[:, 2]).mean((1, 2)) * math.sqrt(3) / 2
    return {
        "luma": _luma(x).mean((1, 2)),
        "saturation": ((high - low) / high.clamp(min=1e-6)).mean((1, 2)),
        "hue": torch.atan2(opponent_b, opponent_a) / (2 * math.pi),
    }


def texture_energy(x: torch.Tensor) -> torch.Tensor:
    """log mean |Laplacian| of the luma at half resolution (2 x 2 means): falls with blur. At full
    resolution it would mostly measure the CPU path's 8-bit rounding and the tails of PIL's box-blur
    approximation, which the device path's exact Gaussian does not have."""
    y = F.avg_pool2d(_luma(x)[:, None], 2)[:, 0]
    laplacian = 4 * y[:, 1:-1, 1:-1] - y[:, :-2, 1:-1] - y[:, 2:, 1:-1] - y[:, 1:-1, :-2] - y[:, 1:-1, 2:]
    return laplacian.abs().mean((1, 2)).log()


def per_image_statistics(stacks: list[torch.Tensor], sources: list[dict[str, float]]) -> dict[str, np.ndarray]:
    """One value per image for each step of the recipe, from its crops (global 1, global 2, locals).
    Global crop 1 and the local crops are never solarised; global crop 1 is never blurred."""
    stacks = [c.double() for c in stacks]
    source = {k: torch.tensor([s[k] for s in sources], dtype=torch.float64) for k in sources[0]}
    plain = [stacks[0], *stacks[2:]]  # never solarised
    gray = [(c.amax(1) - c.amin(1)).mean((1, 2)) < 1e-3 for c in stacks]
    coloured = torch.stack([~g for g in gray[:1] + gray[2:]])  # (plain crops, images)
    colour = [crop_colour(c) for c in plain]
    brightness = torch.stack([(c["luma"] / source["luma"]).log().abs() for c in colour])
    saturation = torch.stack([(c["saturation"] / source["saturation"] - 1).abs() for c in colour])
    hue = torch.stack([(c["hue"] - source["hue"] + 0.5).remainder(1.0) - 0.5 for c in colour]).abs()
    half = [c.shape[-1] // 2 for c in plain]
    right_brighter = torch.stack(
        [_luma(c[..., h:]).mean((1, 2)) > _luma(c[..., :h]).mean((1, 2)) for c, h in zip(plain, half)]
    )
    dark = [c.amax((1, 2, 3)) < 0.5 for c in stacks[:2]]  # solarised crops have no value >= 0.5
    energy = [texture_energy(c) for c in stacks]

    def coloured_mean(values):  # over the crops that are not grayscale; NaN where none is
        return ((values * coloured).sum(0) / coloured.sum(0)).numpy()

    return {
        "brightness |log(crop luma / image luma)|": brightness.mean(0).numpy(),
        "saturation |crop / image - 1|": coloured_mean(saturation),
        "hue |crop - image| (turns)": coloured_mean(hue),
        "grayscale share": torch.stack(gray).double().mean(0).numpy(),
        "blur: energy global 2 - global 1": (energy[1] - energy[0]).numpy(),
        "blur: energy locals - global 1": (torch.stack(energy[2:]).mean(0) - energy[0]).numpy(),
        "solarised: dark global 2 - dark global 1": (dark[1].double() - dark[0].double()).numpy(),
        "flip: share of crops brighter on the right": right_brighter.double().mean(0).numpy(),
    }


N_FIELD_IMAGES, NOISE_UNITS = 400, 4.5


def test_output_distributions_match_the_cpu_path():
    """Two CPU draws and one device draw (unpaired seeds) over the same images. Per image, statistics that
    each step of the recipe moves (jitter: brightness, saturation, hue; grayscale; blur; solarisation;
    flip). Two CPU draws differ only by sampling noise: the spread of their per-image differences gives the
    standard error ``se`` of the difference of two draws' means. The device draw's mean must lie within
    ``NOISE_UNITS`` standard errors of the mean of the two CPU draws (the standard error of that gap is
    ``sqrt(3/4) se``), and the two CPU draws within ``NOISE_UNITS * se`` of each other. Removing blur, colour jitter,
    hue, grayscale, solarisation or flip from the device path (or doubling the blur radius) moves a
    statistic by more than 6 of its standard errors. Per-crop marginals are compared with KS tests too."""
    settings = {**KW, "local_crops_number": 2}
    fields = [make_field_image(500 + i) for i in range(N_FIELD_IMAGES)]
    images, sources = [f[0] for f in fields], [f[1] for f in fields]
    n = len(images)
    cpu_a = cpu_crop_stacks(images, range(10_000, 10_000 + n), settings)
    cpu_b = cpu_crop_stacks(images, range(20_000, 20_000 + n), settings)
    gpu = gpu_crop_stacks(images, range(30_000, 30_000 + n), settings)

    stats_a, stats_b, stats_gpu = (per_image_statistics(s, sources) for s in (cpu_a, cpu_b, gpu))
    for name in stats_a:
        a, b, g = stats_a[name], stats_b[name], stats_gpu[name]
        keep = ~(np.isnan(a) | np.isnan(b) | np.isnan(g))
        a, b, g = a[keep], b[keep], g[keep]
        se = np.std(a - b, ddof=1) / math.sqrt(len(a))
        assert se > 0 and keep.mean() > 0.95, name
        assert abs(np.mean(a - b)) < NOISE_UNITS * se, (name, "CPU draws", np.mean(a), np.mean(b), se)
        gap = np.mean(g) - np.mean((a + b) / 2)
        assert abs(gap) < NOISE_UNITS * math.sqrt(0.75) * se, (name, np.mean(g), np.mean((a + b) / 2), se)

    for name in ("luma", "saturation"):  # marginals over all crops of a kind, both paths
        for kind, slots in (("global", slice(0, 2)), ("local", slice(2, None))):
            values = [torch.cat([crop_colour(c.double())[name] for c in draw[slots]]).numpy() for draw in (cpu_a, gpu)]
            assert ks_statistic(*values) < ks_critical(len(values[0]), len(values[1])), (name, kind)


def _config(**crops):
    return default_config_with({"crops": {**KW, **crops}, "student": {"patch_size": 8}, "train": {"seed": 3}})


@pytest.mark.parametrize("local_crops_number", [3, 0])
def test_batches_match_the_cpu_collate(local_crops_number):
    cfg = _config(local_crops_number=local_crops_number)
    images = [make_image(i, size=(80 - 4 * i, 64 + 2 * i)) for i in range(4)]
    settings = {**KW, "local_crops_number": local_crops_number}
    params, cpu = MultiCropParams(**settings), DataAugmentationDINO(**settings)
    gpu_samples = [(params(image), -1, 0, 40 + i) for i, image in enumerate(images)]
    cpu_samples = [(cpu(image), -1, 0, 40 + i) for i, image in enumerate(images)]
    raw = build_gpu_collate(cfg)(gpu_samples)
    assert raw["images"].dtype == torch.uint8 and raw["images"].shape == (4, 3, 70, 80)
    assert raw["global_crop_params"].shape == (8, len(PARAM_NAMES))
    assert raw["local_crop_params"].shape == (4 * local_crops_number, len(PARAM_NAMES))
    torch.testing.assert_close(raw["global_crop_params"][5], gpu_samples[1][0]["params"][1])  # crop-major
    reference = build_collate(cfg)(cpu_samples)
    batch = build_gpu_augmentation(cfg)(raw)
    assert set(batch) == set(reference)
    for key, value in reference.items():
        if key in ("collated_global_crops", "collated_local_crops"):
            assert batch[key].shape == value.shape and batch[key].dtype == value.dtype, key
        elif torch.is_tensor(value):
            assert torch.equal(batch[key], value), key
        else:
            assert batch[key] == value, key
    assert reference["collated_masks"].any()


def test_tiny_training_run_with_gpu_augmentation(tmp_path):
    from dinov2.train.train import main

    overrides = [
        "train.device=cpu", "train.gpu_augmentation=true", "train.dataset_path=Synthetic:split=TRAIN:num_images=32:image_size=40",
        "train.batch_size_per_gpu=4", "train.num_workers=1", "train.OFFICIAL_EPOCH_LENGTH=4", "train.log_period=1",
        "train.stop_at_iteration=2", "student.arch=vit_tiny", "student.embed_dim=32", "student.depth=2",
        "student.num_heads=2", "student.patch_size=8", "dino.head_n_prototypes=64", "dino.head_hidden_dim=32",
        "dino.head_bottleneck_dim=16", "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=32",
        "ibot.head_bottleneck_dim=16", "optim.epochs=1", "optim.warmup_epochs=0.5", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=2", "teacher.warmup_teacher_temp_epochs=0.5",
    ]  # fmt: skip
    assert main(["--output-dir", str(tmp_path), *overrides])["iteration"] == 2
    lines = (tmp_path / "training_metrics.json").read_text().splitlines()
    logged = [json.loads(line) for line in lines if "loss" in line]
    assert len(logged) == 2
    for record in logged:
        assert all(math.isfinite(record[k]) for k in ("loss", "dino_local_crops_loss", "ibot_loss", "koleo_loss"))
        assert record["images_per_s"] > 0 and record["skipped_images"] == 0


def _render_on(device: torch.device, batch: dict, cfg) -> dict:
    """The collated batch moved to ``device`` (pinned and non-blocking on CUDA, as Trainer.step) and rendered."""
    from dinov2.utils.device import batch_to_device

    if device.type == "cuda":
        batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}
    return build_gpu_augmentation(cfg)(batch_to_device(batch, device))


def _rendering_agrees_across_devices(device: torch.device) -> None:
    """Body of the CUDA test below, for any device against the CPU."""
    cfg = _config()
    images = [make_image(i, size=(80 - 4 * i, 64 + 2 * i)) for i in range(6)]  # padded to one size
    torch.manual_seed(5)
    samples = [(MultiCropParams(**KW)(image), -1, 0, 10 + i) for i, image in enumerate(images)]
    raw = build_gpu_collate(cfg)(samples)
    # Solarisation is a threshold: a value at 0.5 within float rounding may flip on one device and not
    # the other, so it is compared off; what it does to a pixel (1 - x) is the same elementwise op.
    for key in ("global_crop_params", "local_crop_params"):
        raw[key][:, P["solarize"]] = 0.0
    assert raw["global_crop_params"][:, P["blur"]].any() and raw["global_crop_params"][:, P["jitter"]].any()
    reference = _render_on(torch.device("cpu"), dict(raw), cfg)
    rendered = _render_on(device, dict(raw), cfg)
    assert set(rendered) == set(reference)
    for key, value in reference.items():
        if not torch.is_tensor(value):
            assert rendered[key] == value, key
            continue
        assert rendered[key].device.type == device.type, key  # nothing left on the host
        if key.startswith("collated_") and key.endswith("_crops"):
            assert rendered[key].dtype == value.dtype and rendered[key].shape == value.shape, key
            torch.testing.assert_close(rendered[key].cpu(), value, atol=2e-4, rtol=1e-4)
        else:
            assert torch.equal(rendered[key].cpu(), value), key


@pytest.mark.gpu
def test_rendering_on_cuda_matches_the_cpu_rendering():
    """The same collated batch rendered on CUDA (roi_align, grouped convolutions, colour ops on the
    device) and on the CPU gives the same crops, masks and keys, every tensor on the device. TF32 is
    off for the comparison (tests/conftest.py restores the flags): cuDNN may run the blur's
    convolutions with it, about 1e-3 off in [0, 1] units, harmless for augmentation but not for 2e-4."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    _rendering_agrees_across_devices(torch.device("cuda"))


def test_the_cross_device_check_runs_here_cpu_against_cpu():
    """The CUDA test's body, CPU against CPU: its batch and comparisons are sound where there is no GPU."""
    _rendering_agrees_across_devices(torch.device("cpu"))


def test_params_transform_converts_modes_as_the_datasets_do():
    # It used to Image.convert("RGB"): alpha dropped (the hidden colour under transparent pixels
    # came back) and 16-bit grey clipped to white; the CPU path converts as load_image does.
    transform = MultiCropParams(**{**KW, "local_crops_number": 1})
    clear_red = Image.new("RGBA", (12, 10), (255, 0, 0, 0))
    assert torch.equal(transform(clear_red)["image"], torch.full((3, 10, 12), 255, dtype=torch.uint8))
    mid_grey = Image.fromarray(np.full((10, 12), 32896, dtype=np.uint16))  # 32896 * 255 / 65535 = 128
    assert torch.equal(transform(mid_grey)["image"], torch.full((3, 10, 12), 128, dtype=torch.uint8))
