"""Images the curation tests generate: distinct random pictures and planted copies of some of them.

Each picture is a smooth random colour field with random ellipses and rectangles, drawn from its
own seed, so two pictures share nothing but the generator. A copy is re-encoded (JPEG), resized, or
slightly cropped, the edits a web crawl makes to one image.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COPY_KINDS = ("exact", "jpeg", "resized", "cropped")


def picture(seed: int, size: int = 64) -> Image.Image:
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


def copy_of(image: Image.Image, kind: str) -> Image.Image:
    if kind == "exact":
        return image.copy()
    if kind == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=60)
        buffer.seek(0)
        return Image.open(buffer).convert("RGB")
    if kind == "resized":
        return image.resize((int(image.width * 0.7), int(image.height * 0.7)), Image.BILINEAR)
    if kind == "cropped":
        w, h = image.size
        m = max(1, int(0.06 * w))
        return image.crop((m, m // 2, w - m // 2, h - m))
    raise ValueError(kind)


def write_pool(root: Path, num_distinct: int, copies: dict[int, tuple[str, ...]] | None = None, first_seed: int = 0):
    """Write ``num_distinct`` pictures (``img_NNNN.png``) and, for each ``{original: kinds}``, its copies
    (``copy_NNNN_kind.png``). Returns ``{path: group}``: the seed each file was made from."""
    root.mkdir(parents=True, exist_ok=True)
    groups = {}
    for i in range(num_distinct):
        path = root / f"img_{i:04d}.png"
        picture(first_seed + i).save(path)
        groups[str(path)] = first_seed + i
    for original, kinds in (copies or {}).items():
        for kind in kinds:
            path = root / f"copy_{original:04d}_{kind}.png"
            copy_of(picture(first_seed + original), kind).save(path)
            groups[str(path)] = first_seed + original
    return groups
