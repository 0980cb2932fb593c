"""PCA visualisation of patch features: foreground separation and an RGB map per image.

``python -m dinov2.eval.pca --pretrained-weights W [--config-file C] IMAGE [IMAGE ...] --output out.png``

1. Every image is resized to ``image_size`` x ``image_size`` (a multiple of the patch size) and the
   backbone's normalised patch tokens (``x_norm_patchtokens``) are taken.
2. A PCA is fitted jointly over the patches of all images. The first component's scores, divided by
   their standard deviation, separate foreground from background: the component is oriented so that
   its positive side holds the *minority* of the patches (objects usually cover less of the image
   than the background), and the foreground is ``score > threshold`` (``--threshold``, in standard
   deviations; 0 splits at the mean).
3. A second PCA with 3 components is fitted over the foreground patches only; each component is
   min-max scaled to [0, 1] over those patches and used as an RGB channel. Background is black.
4. The figure has one row per image: the resized input beside its PCA map (nearest-upsampled), so
   it is ``2 * image_size`` pixels wide and ``len(images) * image_size`` pixels high. Saved with PIL.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import functional as TF

from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

logger = logging.getLogger("dinov2.eval.pca")


def snap_image_size(size: int, patch_size: int) -> int:
    """``size`` rounded to the nearest multiple of ``patch_size`` (at least one patch)."""
    if size < 1:
        raise ValueError(f"image size must be positive, got {size}")
    snapped = max(patch_size, int(round(size / patch_size)) * patch_size)
    if snapped != size:
        logger.warning("image size %d is not a multiple of the patch size %d; using %d", size, patch_size, snapped)
    return snapped


def load_images(paths: Sequence[str | Path], image_size: int) -> list[Image.Image]:
    """The images at ``paths`` as RGB, resized (bicubic) to ``image_size`` x ``image_size``."""
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC))
    return images


def to_model_input(images: Sequence[Image.Image]) -> torch.Tensor:
    """A normalised (B, 3, H, W) float batch of equally sized PIL images."""
    batch = [TF.normalize(TF.to_tensor(image), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) for image in images]
    return torch.stack(batch)


@torch.no_grad()
def patch_features(
    model: nn.Module, batch: torch.Tensor, device: torch.device, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """(B, h, w, D) float32 normalised patch tokens of ``batch``, one image at a time."""
    patch = model.patch_size
    grid = (batch.shape[-2] // patch, batch.shape[-1] // patch)
    features = []
    for image in batch:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            tokens = model.forward_features(image.unsqueeze(0).to(device))["x_norm_patchtokens"]
        features.append(tokens.float().cpu().reshape(*grid, -1))
    return torch.stack(features)


def principal_components(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and the first ``k`` principal directions (k, D) of the rows of ``x`` (N, D).

    Directions come from an SVD of the centred data (float64) and are oriented so that each one's
    largest-magnitude entry is positive. Directions beyond the data's rank are zero.
    """
    x = x.double()
    mean = x.mean(dim=0)
    _, singular, vh = torch.linalg.svd(x - mean, full_matrices=False)
    components = torch.zeros(k, x.shape[1], dtype=torch.float64)
    rank = int((singular > singular.max().clamp_min(1e-300) * 1e-10).sum()) if singular.numel() else 0
    take = min(k, rank)
    components[:take] = vh[:take]
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components *= torch.where(signs == 0, torch.ones_like(signs), signs)
    return mean, components


def foreground_mask(features: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Boolean (B, h, w) foreground of patch ``features`` (B, h, w, D), from the first component fitted
    over all images' patches: standardised scores, oriented so that fewer patches score > 0, then
    ``score > threshold``."""
    flat = features.reshape(-1, features.shape[-1])
    if flat.shape[0] < 2:
        return torch.zeros(features.shape[:-1], dtype=torch.bool)
    mean, components = principal_components(flat, 1)
    scores = (flat.double() - mean) @ components[0]
    scores = scores / scores.std().clamp_min(1e-12)
    if (scores > 0).sum() > (scores < 0).sum():
        scores = -scores
    return (scores > threshold).reshape(features.shape[:-1])


def foreground_rgb(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, h, w, 3) colours in [0, 1]: 3 principal components of the foreground patches, each min-max
    scaled over the foreground; background (and everything, when under 2 patches are foreground) black."""
    rgb = torch.zeros(*features.shape[:-1], 3)
    foreground = features[mask]
    if foreground.shape[0] < 2:
        return rgb
    mean, components = principal_components(foreground, 3)
    scores = (foreground.double() - mean) @ components.T
    low, high = scores.min(dim=0).values, scores.max(dim=0).values
    span = high - low
    scaled = torch.where(span > 0, (scores - low) / span.clamp_min(1e-300), torch.zeros_like(scores))
    rgb[mask] = scaled.float()
    return rgb


def render_figure(images: Sequence[Image.Image], rgb_maps: torch.Tensor) -> Image.Image:
    """One row per image: the image, then its PCA map upsampled (nearest) to the image's size."""
    width, height = images[0].size
    figure = Image.new("RGB", (2 * width, len(images) * height))
    for row, (image, rgb) in enumerate(zip(images, rgb_maps)):
        pixels = (rgb.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).numpy()
        pca_image = Image.fromarray(pixels, mode="RGB").resize((width, height), Image.Resampling.NEAREST)
        figure.paste(image, (0, row * height))
        figure.paste(pca_image, (width, row * height))
    return figure


def pca_figure(
    model: nn.Module,
    image_paths: Sequence[str | Path],
    image_size: int = 448,
    threshold: float = 0.0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[Image.Image, torch.Tensor]:
    """The figure for ``image_paths`` and the (B, h, w) foreground mask."""
    if not image_paths:
        raise ValueError("need at least one image")
    image_size = snap_image_size(image_size, model.patch_size)
    images = load_images(image_paths, image_size)
    features = patch_features(model, to_model_input(images), torch.device(device), autocast_dtype)
    mask = foreground_mask(features, threshold)
    return render_figure(images, foreground_rgb(features, mask)), mask


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="PCA visualisation of DINOv2 patch features", allow_abbrev=False)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument("--pretrained-weights", required=True, help="backbone weights (path or URL)")
    parser.add_argument("--config-file", default="", help="config naming the architecture (student.*)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--image-size", type=int, default=448, help="side in pixels (rounded to the patch size)")
    parser.add_argument("--threshold", type=float, default=0.0, help="foreground threshold in standard deviations")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | ...")
    parser.add_argument(
        "--opts", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides (e.g. student.arch=vit_small)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    from dinov2.eval.setup import autocast_dtype_for, build_eval_model, setup_logging

    args = get_args_parser().parse_args(argv)
    setup_logging()
    model, _ = build_eval_model(args.config_file, args.pretrained_weights, opts=args.opts, device=args.device)
    device = next(model.parameters()).device
    figure, mask = pca_figure(model, args.images, args.image_size, args.threshold, device, autocast_dtype_for(device))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.save(output, format="PNG")
    logger.info("foreground: %d of %d patches; wrote %s", int(mask.sum()), mask.numel(), output)
    return output


if __name__ == "__main__":
    main()
