"""Build a DINOv2 backbone, run it on an image and show what it returns.

    python scripts/backbone_demo.py                      # ViT-S/14, random weights, synthetic image
    python scripts/backbone_demo.py --weights dinov2_vits14_pretrain.pth --image photo.jpg

Without --weights nothing is downloaded (random initialisation); pass --weights LVD142M to fetch
the official checkpoint.
"""

from __future__ import annotations

import argparse
import time

import torch
from PIL import Image
from torchvision.transforms import v2

from dinov2.hub.backbones import BACKBONES

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def synthetic_image(size: int = 256) -> Image.Image:
    """A red disc on a blue/green gradient: something with a foreground."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = ((xx - 0.55) ** 2 + (yy - 0.45) ** 2 < 0.08).float()
    rgb = torch.stack([disc, (1 - disc) * xx, (1 - disc) * yy], dim=-1)
    return Image.fromarray((rgb * 255).to(torch.uint8).numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dinov2_vits14", choices=sorted(BACKBONES))
    parser.add_argument("--weights", default=None, help="path, URL, or LVD142M for the official download")
    parser.add_argument("--image", default=None, help="an image file (default: a synthetic one)")
    parser.add_argument("--size", type=int, default=224, help="input side, a multiple of 14")
    args = parser.parse_args()

    model = BACKBONES[args.model](pretrained=args.weights is not None, weights=args.weights).eval()
    image = Image.open(args.image).convert("RGB") if args.image else synthetic_image()
    transform = v2.Compose([
        v2.PILToTensor(), v2.Resize(args.size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(args.size), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])  # fmt: skip
    x = transform(image).unsqueeze(0)

    start = time.perf_counter()
    with torch.inference_mode():
        out = model.forward_features(x)
        layers = model.get_intermediate_layers(x, n=4, reshape=True)
    elapsed = time.perf_counter() - start

    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.model}: {params:.1f}M parameters, weights: {args.weights or 'random init'}")
    print(f"input {tuple(x.shape)} -> forward + 4 intermediate layers in {elapsed:.2f}s")
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        print(f"  {key:20s} {tuple(out[key].shape)}")
    print(f"  intermediate layers  {[tuple(t.shape) for t in layers]}")
    print(
        f"  CLS feature norm {out['x_norm_clstoken'].norm():.3f}; first values {out['x_norm_clstoken'][0, :4].tolist()}"
    )


if __name__ == "__main__":
    main()
