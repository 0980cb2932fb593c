"""DINOv2 multi-crop augmentation: two global crops and several local crops per image."""

from __future__ import annotations

import logging

import torch
from PIL import Image
from torchvision import transforms as T

from dinov2.data.transforms import GaussianBlur, ToRGB, make_normalize_transform
from dinov2.utils.config import is_integer_at_least

logger = logging.getLogger("dinov2")


def _is_fraction_range(scale) -> bool:
    try:
        low, high = (float(v) for v in scale)
    except (TypeError, ValueError):
        return False
    return 0.0 < low <= high <= 1.0


def is_probability(value) -> bool:
    """Whether ``value`` is a number in [0, 1] (not None, a string, NaN or a bool)."""
    if isinstance(value, (bool, str)):
        return False
    try:
        return 0.0 <= float(value) <= 1.0
    except (TypeError, ValueError):
        return False


def check_crop_settings(
    global_crops_scale,
    local_crops_scale,
    local_crops_number,
    global_crops_size,
    local_crops_size,
    probabilities: dict[str, float],
) -> None:
    """Raise a ValueError naming the setting (the ``crops.*`` config keys have the same names) unless the
    scales are ``(min, max)`` area fractions with ``0 < min <= max <= 1``, the crop count is an integer
    >= 0, the sizes are integers >= 1 and every probability is in [0, 1]."""
    for name, scale in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
        if not _is_fraction_range(scale):
            raise ValueError(f"{name} must be a (min, max) area fraction with 0 < min <= max <= 1, got {scale!r}")
    for name, value, least in (
        ("local_crops_number", local_crops_number, 0),
        ("global_crops_size", global_crops_size, 1),
        ("local_crops_size", local_crops_size, 1),
    ):
        if not is_integer_at_least(value, least):
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    for name, p in probabilities.items():
        if not is_probability(p):
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


class DataAugmentationDINO:
    """Multi-crop view generator for DINO/iBOT self-distillation.

    Every crop gets: RandomResizedCrop (bicubic, scale range of its kind) + horizontal flip (0.5), colour
    jitter ``ColorJitter(0.4, 0.4, 0.2, 0.1)`` with probability 0.8, grayscale with probability 0.2, Gaussian
    blur with its kind's probability, then to tensor + ImageNet normalisation. Only the second global crop
    is solarised (threshold 128, ``solarization_prob``).

    Blur probabilities: the DINOv2 paper lists 1.0 (global crop 1), 0.1 (global crop 2) and 0.5 (local crops),
    but Meta's released code applies its blur with ``1 - p``, so the published models were trained with
    global crop 1 never blurred, global crop 2 blurred with probability 0.9 and local crops with 0.5. Our
    defaults are those trained-with values and each ``*_blur_prob`` here is the probability of blurring.

    Sub-pipelines are attributes (``geometric_augmentation_global``/``_local``, ``color_jittering``,
    ``global_transfo1``/``2``, ``local_transfo``, ``normalize``) so they can be inspected or tested alone.
    Settings out of range (see :func:`check_crop_settings`) raise a ValueError naming them.
    Randomness comes from torch's global CPU generator. In training, ``SeededSamples``
    (``dinov2/data/seeding.py``) seeds it before each sample from ``train.seed`` and the sample's position
    in the ``PositionedSampler`` stream, so a sample's crops do not depend on the worker, the rank or a resume.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float],
        local_crops_scale: tuple[float, float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        global_crops_1_blur_prob: float = 0.0,
        global_crops_2_blur_prob: float = 0.9,
        local_crops_blur_prob: float = 0.5,
        solarization_prob: float = 0.2,
    ) -> None:
        check_crop_settings(
            global_crops_scale, local_crops_scale, local_crops_number, global_crops_size, local_crops_size,
            dict(global_crops_1_blur_prob=global_crops_1_blur_prob, global_crops_2_blur_prob=global_crops_2_blur_prob,
                 local_crops_blur_prob=local_crops_blur_prob, solarization_prob=solarization_prob),
        )  # fmt: skip
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self._log_settings(global_crops_1_blur_prob, global_crops_2_blur_prob, local_crops_blur_prob, solarization_prob)

        self.geometric_augmentation_global = self._geometric(global_crops_size, self.global_crops_scale)
        self.geometric_augmentation_local = self._geometric(local_crops_size, self.local_crops_scale)
        self.color_jittering = T.Compose(
            [
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        )
        self.normalize = T.Compose([T.ToTensor(), make_normalize_transform()])
        self.global_transfo1 = T.Compose(
            [self.color_jittering, GaussianBlur(p=global_crops_1_blur_prob), self.normalize]
        )
        self.global_transfo2 = T.Compose(
            [
                self.color_jittering,
                GaussianBlur(p=global_crops_2_blur_prob),
                T.RandomSolarize(threshold=128, p=solarization_prob),
                self.normalize,
            ]
        )
        self.local_transfo = T.Compose([self.color_jittering, GaussianBlur(p=local_crops_blur_prob), self.normalize])

    @staticmethod
    def _geometric(size: int, scale: tuple[float, float]) -> T.Compose:
        return T.Compose(
            [
                T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                T.RandomHorizontalFlip(p=0.5),
            ]
        )

    def _log_settings(self, blur_1: float, blur_2: float, blur_local: float, solarization: float) -> None:
        logger.info(
            "DataAugmentationDINO: global_crops_scale=%s local_crops_scale=%s local_crops_number=%d "
            "global_crops_size=%d local_crops_size=%d blur_prob(global 1, global 2, local)=(%s, %s, %s) "
            "solarization_prob(global 2 only)=%s",
            self.global_crops_scale,
            self.local_crops_scale,
            self.local_crops_number,
            self.global_crops_size,
            self.local_crops_size,
            blur_1,
            blur_2,
            blur_local,
            solarization,
        )

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor] | tuple]:
        """Crops of one PIL image: ``global_crops`` (2), ``global_crops_teacher`` (same), ``local_crops``.
        An image in another mode than RGB is converted first (:class:`~dinov2.data.transforms.ToRGB`)."""
        image = ToRGB()(image)
        global_crop_1 = self.global_transfo1(self.geometric_augmentation_global(image))
        global_crop_2 = self.global_transfo2(self.geometric_augmentation_global(image))
        global_crops = [global_crop_1, global_crop_2]
        local_crops = [
            self.local_transfo(self.geometric_augmentation_local(image)) for _ in range(self.local_crops_number)
        ]
        return {
            "global_crops": global_crops,
            "global_crops_teacher": global_crops,
            "local_crops": local_crops,
            "offsets": (),
        }
