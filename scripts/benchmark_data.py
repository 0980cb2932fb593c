#!/usr/bin/env python
"""Data-pipeline throughput: decode + DINOv2 multi-crop augmentation + iBOT-mask collation, per worker count.

Two sources: the embedded Synthetic set (rendered at ``--synthetic-size``) and a folder of JPEGs the
script writes into a temporary directory (``--jpeg-count`` images of ``--jpeg-size``, read back with
ImageFolder). The recipe is the default one: DataAugmentationDINO with 2 global crops of 224 px (scale
0.32-1.0) and 8 local crops of 96 px (scale 0.05-0.32), collate_data_and_cast with a MaskingGenerator
on the 16x16 grid of 224/14 (mask ratio 0.1-0.5, probability 0.5).

Loader rows: the first batch of every worker is warm-up (worker start, first-use costs); then a multiple
of ``max(workers, 1)`` batches is timed, so every worker starts its timed batches together. ``img/s per
worker`` divides by ``max(workers, 1)``. The transform table times each augmentation step alone on a fixed
image (median of ``--transform-reps`` calls, ``p=1``) and sums them, weighted by the recipe's
probabilities, into a modelled cost per image. Torch runs single-threaded (``--threads``), as in workers.

Example (the figures quoted in docs/performance.md):

    python scripts/benchmark_data.py --workers 0 1 2 --images 96
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinov2.data.datasets.synthetic import Synthetic
from dinov2.data.loaders import make_data_loader, make_dataset
from dinov2.data.samplers import InfiniteSampler
from dinov2.utils.benchmark import cpu_name
from dinov2.utils.benchmark import environment as run_environment

GLOBAL_SCALE, LOCAL_SCALE, LOCAL_NUMBER = (0.32, 1.0), (0.05, 0.32), 8
GLOBAL_SIZE, LOCAL_SIZE, PATCH = 224, 96, 14


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--images", type=int, default=48, help="timed images per loader row (rounded to batches)")
    p.add_argument("--synthetic-size", type=int, default=256)
    p.add_argument("--jpeg-count", type=int, default=200)
    p.add_argument("--jpeg-size", nargs=2, type=int, default=[500, 375], metavar=("W", "H"))
    p.add_argument("--transform-reps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads in the main process")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="collate cast")
    p.add_argument("--skip-loaders", action="store_true", help="only the per-transform table")
    p.add_argument("--output", type=Path, default=Path("benchmark_data.json"))
    args = p.parse_args(argv)
    positive = {"--batch-size": args.batch_size, "--images": args.images, "--jpeg-count": args.jpeg_count,
                "--transform-reps": args.transform_reps, "--threads": args.threads,
                "--synthetic-size": args.synthetic_size, "--jpeg-size": min(args.jpeg_size)}  # fmt: skip
    for flag, value in positive.items():
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    if min(args.workers) < 0:
        p.error(f"--workers must be >= 0, got {min(args.workers)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def load_recipe():
    """The augmentation, masking and collate modules, or exit with a clear message."""
    try:
        from dinov2.data.augmentations import DataAugmentationDINO
        from dinov2.data.collate import collate_data_and_cast
        from dinov2.data.masking import MaskingGenerator
    except ImportError as error:
        raise SystemExit(
            f"benchmark_data: the augmentation pipeline is not available ({error}); it needs "
            "dinov2.data.augmentations.DataAugmentationDINO, dinov2.data.masking.MaskingGenerator and "
            "dinov2.data.collate.collate_data_and_cast"
        ) from error
    return DataAugmentationDINO, MaskingGenerator, collate_data_and_cast


def write_jpegs(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """``count`` smooth random-colour JPEGs (quality 90) with fine noise: realistic decode cost."""
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, size=(9, 12, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.int16)
        noisy = np.clip(smooth + rng.integers(-12, 13, size=smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"img_{i:05d}.jpg", quality=90)


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def transform_rows(jpeg_path: Path, args: argparse.Namespace) -> list[dict]:
    """Milliseconds per call of each recipe step, alone, with probability 1, on fixed inputs."""
    from torchvision import transforms as T

    from dinov2.data.transforms import GaussianBlur, make_normalize_transform

    torch.manual_seed(0)
    image = Image.open(jpeg_path).convert("RGB")
    crops = {GLOBAL_SIZE: image.resize((GLOBAL_SIZE, GLOBAL_SIZE)), LOCAL_SIZE: image.resize((LOCAL_SIZE,) * 2)}
    bicubic = T.InterpolationMode.BICUBIC
    synthetic = Synthetic(num_images=args.transform_reps, image_size=args.synthetic_size)
    counter = iter(range(10**9))
    steps = [
        ("decode jpeg", f"{image.width}x{image.height} file", lambda: Image.open(jpeg_path).convert("RGB")),
        ("synthetic render", f"{args.synthetic_size}px", lambda: synthetic.get_image(next(counter) % len(synthetic))),
    ]
    for size, scale in ((GLOBAL_SIZE, GLOBAL_SCALE), (LOCAL_SIZE, LOCAL_SCALE)):
        crop = T.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True)
        steps.append((f"random_resized_crop {size}", f"{image.width}x{image.height}", functools.partial(crop, image)))
    per_crop = {
        "hflip": T.RandomHorizontalFlip(p=1.0),
        "color_jitter": T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1),
        "grayscale": T.RandomGrayscale(p=1.0),
        "gaussian_blur": GaussianBlur(p=1.0),
        "solarize": T.RandomSolarize(threshold=128, p=1.0),
        "to_tensor+normalize": T.Compose([T.ToTensor(), make_normalize_transform()]),
    }
    for name, fn in per_crop.items():
        for size, crop in crops.items():
            steps.append((f"{name} {size}", f"{size}px crop", functools.partial(fn, crop)))
    return [{"step": s, "input": i, "ms": median_ms(fn, args.transform_reps)} for s, i, fn in steps]


def modelled_ms(rows: list[dict]) -> float:
    """Expected augmentation cost of one image (no decode), from the step times and the recipe."""
    ms = {row["step"]: row["ms"] for row in rows}

    def crop_cost(size: int, blur_p: float, solarize_p: float = 0.0) -> float:
        return (
            ms[f"random_resized_crop {size}"]
            + 0.5 * ms[f"hflip {size}"]
            + 0.8 * ms[f"color_jitter {size}"]
            + 0.2 * ms[f"grayscale {size}"]
            + blur_p * ms[f"gaussian_blur {size}"]
            + solarize_p * ms[f"solarize {size}"]
            + ms[f"to_tensor+normalize {size}"]
        )

    globals_ = crop_cost(GLOBAL_SIZE, 0.0) + crop_cost(GLOBAL_SIZE, 0.9, 0.2)
    return globals_ + LOCAL_NUMBER * crop_cost(LOCAL_SIZE, 0.5)


def make_collate(args: argparse.Namespace, recipe):
    _, MaskingGenerator, collate_data_and_cast = recipe
    grid = GLOBAL_SIZE // PATCH
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return functools.partial(
        collate_data_and_cast,
        mask_ratio_tuple=(0.1, 0.5),
        mask_probability=0.5,
        dtype=dtype,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator(input_size=(grid, grid), max_num_patches=int(0.5 * grid * grid)),
    )


def loader_row(name: str, dataset, workers: int, collate, args: argparse.Namespace) -> dict:
    """Images/s of the loader once each worker has delivered its first batch."""
    per_round = max(workers, 1)
    rounds = max(1, -(-args.images // (args.batch_size * per_round)))
    sampler = InfiniteSampler(len(dataset), shuffle=True, seed=0, rank=0, world_size=1)
    loader = make_data_loader(
        dataset, args.batch_size, workers, sampler=sampler, collate_fn=collate, persistent_workers=False
    )
    start = time.perf_counter()
    batches = iter(loader)
    for _ in range(per_round):
        next(batches)
    warm = time.perf_counter()
    for _ in range(rounds * per_round):
        next(batches)
    seconds = time.perf_counter() - warm
    del batches
    images = rounds * per_round * args.batch_size
    return {
        "dataset": name,
        "workers": workers,
        "batch_size": args.batch_size,
        "timed_images": images,
        "warmup_s": round(warm - start, 3),
        "timed_s": round(seconds, 3),
        "img_s": images / seconds,
        "img_s_per_worker": images / seconds / per_round,
    }


def datasets(jpeg_dir: Path, augmentation, args: argparse.Namespace) -> dict:
    synthetic = Synthetic(num_images=1000, image_size=args.synthetic_size, transform=augmentation)
    folder = make_dataset(f"ImageFolder:root={jpeg_dir}", transform=augmentation)
    return {f"synthetic {args.synthetic_size}px": synthetic, f"jpeg {args.jpeg_size[0]}x{args.jpeg_size[1]}": folder}


def print_table(rows: list[dict], columns: tuple[str, ...]) -> None:
    print(" | ".join(f"{c:>24}" for c in columns))
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(" | ".join(f"{c:>24}" for c in cells), flush=True)


def environment(args: argparse.Namespace) -> dict:
    report = run_environment(torch.device("cpu"), __file__, args.argv)
    report["main_process_threads"] = report.pop("num_threads")
    return {
        **report,
        "device": f"{cpu_name()} ({os.cpu_count()} logical cores visible)",
        "recipe": f"2x{GLOBAL_SIZE} scale {GLOBAL_SCALE} + {LOCAL_NUMBER}x{LOCAL_SIZE} scale {LOCAL_SCALE}, "
        f"masks on {GLOBAL_SIZE // PATCH}x{GLOBAL_SIZE // PATCH}, collate dtype {args.dtype}",
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = load_recipe()
    report = environment(args)
    print(f"{report['device']} | torch {report['torch']} | {report['recipe']}")
    with tempfile.TemporaryDirectory(prefix="benchmark_data_") as tmp:
        jpeg_dir = Path(tmp)
        write_jpegs(jpeg_dir, args.jpeg_count, tuple(args.jpeg_size))
        report["transforms"] = transform_rows(next(iter(sorted(jpeg_dir.glob("*.jpg")))), args)
        print_table(report["transforms"], ("step", "input", "ms"))
        report["modelled_augmentation_ms_per_image"] = modelled_ms(report["transforms"])
        print(f"modelled augmentation cost: {report['modelled_augmentation_ms_per_image']:.1f} ms/image (no decode)")
        report["rows"] = []
        if not args.skip_loaders:
            augmentation = recipe[0](GLOBAL_SCALE, LOCAL_SCALE, LOCAL_NUMBER, GLOBAL_SIZE, LOCAL_SIZE)
            collate = make_collate(args, recipe)
            for name, dataset in datasets(jpeg_dir, augmentation, args).items():
                for workers in args.workers:
                    report["rows"].append(loader_row(name, dataset, workers, collate, args))
            columns = ("dataset", "workers", "timed_images", "warmup_s", "timed_s", "img_s", "img_s_per_worker")
            print_table(report["rows"], columns)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
