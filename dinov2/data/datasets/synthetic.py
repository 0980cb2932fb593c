"""Procedural shapes-and-textures dataset: the embedded default, with no files and no downloads.

Every image is drawn on demand from a generator seeded by ``(seed, split, index)``, so a sample
is the same in every process and every run, and TRAIN and VAL come from disjoint random streams.
The twelve classes are six filled shapes and six textures. One to three instances per image vary
in hue, saturation, brightness, scale, position and rotation; the background varies in tint,
brightness, gradient direction and noise. Pixel-level nearest neighbours therefore do poorly,
while the class survives the DINO crops and colour jitter.

The nuisance ranges are deliberately moderate: a random-init ViT's features mostly encode global
colour and brightness, and with fully random backgrounds its k-NN accuracy falls to chance (see
``tests/data/test_synthetic.py`` for the check that it stays above 1.5x chance).
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

CLASS_NAMES = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "dots",
    "spiral",
)
_NUM_SHAPES = 6  # the first six classes are solid shapes, the rest textures inside a region
_SPLITS = {"TRAIN": (0, 5000), "VAL": (1, 1000)}  # split -> (stream id, default length)
_LABEL_STREAM = 2**31 - 1  # index slot of the label-shuffle generator, outside any image index
_TRIANGLE_NORMALS = np.array([[np.cos(a), np.sin(a)] for a in np.deg2rad([90.0, 210.0, 330.0])])


def _soft(field: np.ndarray, px_per_unit: float) -> np.ndarray:
    """Anti-aliased coverage of ``field < 0`` where ``field`` is a distance in local units."""
    return np.clip(0.5 - field * px_per_unit, 0.0, 1.0)


def _shape_field(label: int, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Approximate signed distance (negative inside) of a shape of radius ~1 in local coordinates."""
    r = np.hypot(u, v)
    if label == 0:
        return r - 0.9
    if label == 1:
        return np.maximum(np.abs(u), np.abs(v)) - 0.72
    if label == 2:
        proj = u[..., None] * _TRIANGLE_NORMALS[:, 0] + v[..., None] * _TRIANGLE_NORMALS[:, 1]
        return proj.max(axis=-1) - 0.5
    if label == 3:
        points = int(rng.integers(5, 7))
        phase = (np.arctan2(v, u) * points / (2 * np.pi)) % 1.0
        return 0.6 * (r - (0.42 + 0.55 * np.abs(2.0 * phase - 1.0)))
    if label == 4:
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 0.28, av - 0.9), np.maximum(av - 0.28, au - 0.9))
    return np.abs(r - 0.66) - 0.24  # ring


def _texture(label: int, u: np.ndarray, v: np.ndarray, px: float, rng: np.random.Generator) -> np.ndarray:
    """Fraction (0..1) of the first texture colour at each pixel, anti-aliased at ``px`` pixels per unit."""
    freq = rng.uniform(2.5, 4.5)  # periods across the region's width of 2 units
    if label in (6, 7, 8):  # stripes along v (horizontal) or u (vertical, diagonal after rotation)
        wave = np.sin(np.pi * freq * (v if label == 6 else u))
        return np.clip(0.5 + wave * px / (np.pi * freq), 0.0, 1.0)
    if label == 9:
        wave = np.sin(np.pi * freq * u) * np.sin(np.pi * freq * v)
        return np.clip(0.5 + wave * px / (np.pi * freq), 0.0, 1.0)
    if label == 10:
        cell = 2.0 / freq
        du = (u / cell + 0.5) % 1.0 - 0.5
        dv = (v / cell + 0.5) % 1.0 - 0.5
        return _soft((np.hypot(du, dv) - rng.uniform(0.22, 0.32)) * cell, px)
    arms, turns = int(rng.integers(1, 4)), rng.uniform(1.5, 3.0) * rng.choice((-1.0, 1.0))
    wave = np.sin(arms * np.arctan2(v, u) + 2.0 * np.pi * turns * np.hypot(u, v))
    return np.clip(0.5 + wave * px / (2.0 * np.pi * abs(turns) + 1.0), 0.0, 1.0)


def _rotation(label: int, rng: np.random.Generator) -> float:
    """Rotation angle (radians): free for shapes, bounded where it defines the class (stripes)."""
    if label == 6 or label == 7:
        return np.deg2rad(rng.uniform(-15.0, 15.0))
    if label == 8:
        return np.deg2rad(rng.choice((-45.0, 45.0)) + rng.uniform(-12.0, 12.0))
    return rng.uniform(0.0, 2.0 * np.pi)


def _hsv(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """An RGB colour in [0, 1] of random hue, saturation in ``sat`` and value in ``val``."""
    h, s_, v = rng.random(), rng.uniform(*sat), rng.uniform(*val)
    return np.asarray(colorsys.hsv_to_rgb(h, s_, v))


def _draw_object(image: np.ndarray, label: int, rng: np.random.Generator, grid, v_bg: float) -> np.ndarray:
    """Composite one instance of class ``label`` (random frame and colours) over ``image``."""
    size = image.shape[0]
    radius = rng.uniform(0.42, 0.84) if label < _NUM_SHAPES else rng.uniform(0.6, 1.0)  # image half-widths
    cx, cy = rng.uniform(-1.0 + radius * 0.8, 1.0 - radius * 0.8, size=2)
    theta = _rotation(label, rng)
    # work only inside the object's bounding box (everything drawn lies within 1.25 radii)
    rows = _span(cy, radius * 1.25, size)
    cols = _span(cx, radius * 1.25, size)
    y, x = grid[0][rows], grid[1][:, cols]
    cos, sin = np.cos(theta), np.sin(theta)
    u = ((x - cx) * cos + (y - cy) * sin) / radius
    v = ((y - cy) * cos - (x - cx) * sin) / radius
    px = radius * size / 2.0  # pixels per local unit
    colour_a = _hsv(rng, (0.0, 0.5), (v_bg + 0.3, v_bg + 0.6))  # brighter than the background
    if label < _NUM_SHAPES:
        alpha = _soft(_shape_field(label, u, v, rng), px)[..., None]
        shade = 1.0 + rng.uniform(-0.25, 0.25) * u[..., None]  # soft lighting across the shape
        fill = np.clip(colour_a * shade, 0.0, 1.0)
    else:
        region = np.maximum(np.abs(u), np.abs(v)) - 0.85 if rng.random() < 0.5 else np.hypot(u, v) - 0.95
        alpha = _soft(region, px)[..., None]
        colour_b = _hsv(rng, (0.0, 0.5), (v_bg - 0.1, v_bg + 0.1))
        fill = colour_b + (colour_a - colour_b) * _texture(label, u, v, px, rng)[..., None]
    box = image[rows, cols]
    box += (fill - box) * alpha
    return image


def _span(centre: float, half: float, size: int) -> slice:
    """Pixel slice covering ``[centre - half, centre + half]`` in [-1, 1] image coordinates."""
    lo = int(np.floor((centre - half + 1.0) * size / 2.0))
    hi = int(np.ceil((centre + half + 1.0) * size / 2.0))
    return slice(max(lo, 0), min(hi, size))


def render(label: int, size: int, rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Draw one ``size`` x ``size`` float RGB image of class ``label`` from ``rng`` (values in [0, 1]).

    A dim, slightly tinted background with a brightness gradient in a random direction, one to three
    instances of the class with independent colours and frames, then grey pixel noise.
    """
    y, x = grid
    v_bg = rng.uniform(0.25, 0.35)
    bg_a = _hsv(rng, (0.0, 0.08), (v_bg, v_bg))
    bg_b = np.clip(bg_a + rng.uniform(-0.08, 0.08), 0.0, 1.0)
    ang = rng.uniform(0.0, 2.0 * np.pi)
    t = np.clip(0.5 + 0.5 * (x * np.cos(ang) + y * np.sin(ang)), 0.0, 1.0)[..., None]
    image = bg_a + (bg_b - bg_a) * t
    for _ in range(int(rng.integers(1, 4))):
        image = _draw_object(image, label, rng, grid, v_bg)
    image += rng.standard_normal((size, size, 1)) * rng.uniform(0.0, 0.02)
    return np.clip(image, 0.0, 1.0)


class Synthetic:
    """Procedural 12-class shapes and textures: ``dataset[i]`` is ``(PIL RGB image, int label)``.

    Args:
        split: ``"TRAIN"`` (5000 images by default) or ``"VAL"`` (1000); case-insensitive.
        num_images: overrides the split's default length.
        image_size: side of the square images in pixels.
        seed: with ``split`` and the index, fixes every image and the label order.
        transform, target_transform: applied to the image and the label, as in torchvision.
    """

    class_names = CLASS_NAMES
    num_classes = len(CLASS_NAMES)

    def __init__(
        self,
        *,
        split: str = "TRAIN",
        num_images: int | None = None,
        image_size: int = 64,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        key = str(getattr(split, "value", split)).upper()
        if key not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        stream, default_len = _SPLITS[key]
        length = default_len if num_images is None else int(num_images)
        if length < 0 or image_size < 8:
            raise ValueError(f"need num_images >= 0 and image_size >= 8, got {length} and {image_size}")
        if int(seed) < 0:  # NumPy's SeedSequence, which seeds every image, takes no negative words
            raise ValueError(f"Synthetic: seed must be a non-negative integer, got {seed}")
        self.split, self.seed, self.image_size = key, int(seed), int(image_size)
        self.transform, self.target_transform = transform, target_transform
        self._stream = stream
        labels = np.arange(length, dtype=np.int64) % self.num_classes
        self._targets = np.random.default_rng([self.seed, stream, _LABEL_STREAM]).permutation(labels)
        centres = (np.arange(self.image_size, dtype=np.float64) + 0.5) * (2.0 / self.image_size) - 1.0
        self._grid = (centres[:, None], centres[None, :])  # (y, x), broadcast to (size, size)

    def __len__(self) -> int:
        return len(self._targets)

    def get_targets(self) -> np.ndarray:
        """Labels of all samples in index order (balanced: counts differ by at most one)."""
        return self._targets.copy()

    def get_target(self, index: int) -> int:
        return int(self._targets[index])

    def get_image(self, index: int) -> Image.Image:
        """The image at ``index`` without ``transform``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        rng = np.random.default_rng([self.seed, self._stream, index])
        pixels = render(int(self._targets[index]), self.image_size, rng, self._grid)
        return Image.fromarray((pixels * 255.0 + 0.5).astype(np.uint8))

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, target = self.get_image(index), self.get_target(index % max(len(self), 1))
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target

    def __repr__(self) -> str:
        return (
            f"Synthetic(split={self.split!r}, num_images={len(self)}, image_size={self.image_size}, seed={self.seed})"
        )
