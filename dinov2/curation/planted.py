"""Planted copies: the edits a web crawl makes to one image, and random pictures to plant them among.

Used to calibrate a deduplication threshold for an embedder (embed a few of your images and their
altered copies, and look where copies and distinct images fall), by the tests, and by
scripts/curation_demo.py. ``random_picture(seed)`` draws a smooth random colour field with random
ellipses and rectangles from its own seed, so two pictures share nothing but the generator.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

COPY_KINDS = ("exact", "jpeg", "resized", "cropped")


def random_picture(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    field = rng.uniform(0, 255, (4, 4, 3)).astype(np.uint8)
    image = Image.fromarray(field).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 10, size // 2, 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=colour)
    return image


def altered_copy(image: Image.Image, kind: str) -> Image.Image:
    """``exact``; ``jpeg`` (re-encoded at quality 60); ``resized`` (to 70 %); ``cropped`` (6 % off two sides)."""
    if kind == "exact":
        return image.copy()
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, "JPEG", quality=60)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if kind == "resized":
        return image.resize((int(image.width * 0.7), int(image.height * 0.7)), Image.BILINEAR)
    if kind == "cropped":
        w, h = image.size
        m = max(1, int(0.06 * w))
        return image.crop((m, m // 2, w - m // 2, h - m))
    raise ValueError(f"copy kind must be one of {COPY_KINDS}, got {kind!r}")
