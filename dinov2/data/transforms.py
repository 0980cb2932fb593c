"""Image transforms: ImageNet normalisation, RGB conversion, random Gaussian blur and classification train/eval
pipelines."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from dinov2.data.datasets.base import to_rgb

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def make_normalize_transform(
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD
) -> T.Normalize:
    """``(x - mean) / std`` per channel, for float tensors in [0, 1]."""
    return T.Normalize(mean=mean, std=std)


class ToRGB:
    """A PIL image of any mode -> 8-bit RGB, converted as the datasets' ``load_image`` converts (transparency
    composited on white, 16-bit grey scaled to 8 bits; ``dinov2.data.datasets.to_rgb``); anything else is
    returned unchanged. Lets the pipelines take an image opened by hand (RGBA PNG, grayscale JPEG)."""

    def __call__(self, img):
        return to_rgb(img) if isinstance(img, Image.Image) else img

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GaussianBlur:
    """Gaussian blur with a random radius (standard deviation) in ``[radius_min, radius_max]``, applied with
    probability ``p``.

    ``p`` is the probability of blurring (unlike Meta's code, whose blur class applies with ``1 - p``).
    Randomness comes from torch's generator, like torchvision's random transforms.

    PIL images are blurred with ``PIL.ImageFilter.GaussianBlur``: on a 224x224 RGB PIL image (one thread)
    it took ~1.7-1.8 ms versus ~6.4-7.2 ms for ``torchvision.transforms.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))``
    (~5.5-6.7 ms on a uint8 tensor), i.e. ~3.5-4x faster. Tensors go through ``torchvision``'s functional blur with
    a kernel covering +-3 sigma.
    """

    def __init__(self, p: float = 0.5, radius_min: float = 0.1, radius_max: float = 2.0) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        if not 0.0 < radius_min <= radius_max:
            raise ValueError(f"need 0 < radius_min <= radius_max, got {radius_min}, {radius_max}")
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
        if self.p < 1.0 and torch.rand(()).item() >= self.p:
            return img
        radius = self.radius_min + (self.radius_max - self.radius_min) * torch.rand(()).item()
        if isinstance(img, torch.Tensor):
            kernel = 2 * math.ceil(3 * radius) + 1
            return TF.gaussian_blur(img, kernel_size=[kernel, kernel], sigma=[radius, radius])
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius_min={self.radius_min}, radius_max={self.radius_max})"


MAX_ASPECT = 8  # longer side / shorter side that reaches the evaluation transform's resize


def centre_to_aspect(image: Image.Image | torch.Tensor, max_aspect: int = MAX_ASPECT) -> Image.Image | torch.Tensor:
    """The centre of ``image`` (PIL, or a ``(..., H, W)`` tensor), at most ``max_aspect`` times longer than its
    shorter side; an image within that ratio is returned as it is. The evaluation transform resizes the shorter
    side and keeps a centre crop, so the cut-off ends (of a web banner, 20,000 x 1: resized to 5.1M x 256 pixels,
    GBs) never reach the output; what stays around the crop (3.5 shorter sides each way at 8:1) covers the resize
    filter's reach: the output moves by a sub-pixel rounding of the resized size at most."""
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    width, height = TF.get_image_size(image)
    keep = int(max_aspect * min(width, height))
    if max(width, height) <= keep:
        return image
    keep += (max(width, height) - keep) % 2  # the same number cut from each end: the centre stays put
    return TF.center_crop(image, [height, keep] if width > height else [keep, width])


class CentreToAspect:
    """:func:`centre_to_aspect` as a (picklable) transform."""

    def __init__(self, max_aspect: int = MAX_ASPECT) -> None:
        if max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
        self.max_aspect = max_aspect

    def __call__(self, img):
        return centre_to_aspect(img, self.max_aspect)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_aspect={self.max_aspect})"


def make_classification_eval_transform(
    resize_size: int = 256,
    crop_size: int = 224,
    interpolation: T.InterpolationMode = T.InterpolationMode.BICUBIC,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    max_aspect: int = MAX_ASPECT,
) -> T.Compose:
    """RGB (:class:`ToRGB`), keep the centre at most ``max_aspect``:1 (:func:`centre_to_aspect`: a banner is not
    resized whole; an image within that ratio is untouched), resize the shorter side to ``resize_size``
    (antialiased), center-crop ``crop_size``, to tensor, normalise."""
    return T.Compose(
        [
            ToRGB(),
            CentreToAspect(max_aspect),
            T.Resize(resize_size, interpolation=interpolation, antialias=True),
            T.CenterCrop(crop_size),
            T.ToTensor(),
            make_normalize_transform(mean, std),
        ]
    )


def make_classification_train_transform(
    crop_size: int = 224,
    interpolation: T.InterpolationMode = T.InterpolationMode.BICUBIC,
    hflip_prob: float = 0.5,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> T.Compose:
    """RGB (:class:`ToRGB`), random-resized crop to ``crop_size``, horizontal flip with ``hflip_prob``, to tensor,
    normalise."""
    steps = [ToRGB(), T.RandomResizedCrop(crop_size, interpolation=interpolation, antialias=True)]
    if hflip_prob > 0.0:
        steps.append(T.RandomHorizontalFlip(hflip_prob))
    steps += [T.ToTensor(), make_normalize_transform(mean, std)]
    return T.Compose(steps)
