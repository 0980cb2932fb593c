"""DINOv2 multi-crop augmentation split between the data workers and the training device.

The CPU recipe (:class:`~dinov2.data.augmentations.DataAugmentationDINO`) costs a core per ~20-30
images/s. Here the workers only decode and draw the random parameters (:class:`MultiCropParams`),
the collate pads the uint8 images into one tensor (:func:`collate_multicrop_params`), and
:class:`GPUMultiCrop` renders every crop of the batch at once on the device the batch is on.

:class:`MultiCropParams` makes the CPU path's random draws, in the CPU path's order, with torch's
global generator: seeded identically, both paths use the same crop boxes, flips, jitter factors and
order, grayscale, blur and solarisation decisions. What differs is how pixels are computed (see
docs/data.md, "GPU-side augmentation").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from dinov2.data.augmentations import check_crop_settings
from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, GaussianBlur, ToRGB

# One row of floats per crop; the crop box is in the coordinates of the image the row travels with.
PARAM_NAMES = (
    "top", "left", "height", "width", "flip", "jitter", "brightness", "contrast", "saturation", "hue",
    "order0", "order1", "order2", "order3", "grayscale", "blur", "sigma", "solarize",
)  # fmt: skip
P = {name: index for index, name in enumerate(PARAM_NAMES)}
RAW_KEYS = ("images", "image_sizes", "global_crop_params", "local_crop_params")
HUE_OP = 3  # torchvision's ColorJitter op ids: 0 brightness, 1 contrast, 2 saturation, 3 hue
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


class _RadiusProbe:
    """Stands in for a PIL image: :class:`GaussianBlur` calls ``filter`` only when it blurs, with the
    radius it drew, so its own code draws the decision and the radius."""

    def filter(self, kernel) -> float:
        return float(kernel.radius)


class MultiCropParams:
    """Dataset transform for GPU-side augmentation: a PIL image -> ``{"image": uint8 (3, H, W),
    "params": float32 (2 + local_crops_number, len(PARAM_NAMES))}``.

    Takes the arguments of :class:`DataAugmentationDINO` and draws what it would draw, in the same
    order, from torch's global generator: per crop, the box (``RandomResizedCrop.get_params``, ratio
    (3/4, 4/3)), the flip (0.5), whether ColorJitter(0.4, 0.4, 0.2, 0.1) applies (0.8) and then its
    op order and factors (``ColorJitter.get_params``), grayscale (0.2), the blur decision and radius
    (:class:`GaussianBlur` with the crop kind's probability) and, for global crop 2 only,
    solarisation. Rows: global crop 1, global crop 2, local crops. Without jitter the factors are
    the identity (1, 1, 1, 0) in order (0, 1, 2, 3); without blur ``sigma`` is 0.

    An image whose longer side exceeds ``max_image_side`` (default ``4 * global_crops_size``) is
    downscaled (bicubic, antialiased) after the draws and its boxes scaled with it, which bounds the
    padded batch; every crop keeps at least its output resolution unless the image is very elongated.
    Settings out of range raise a ValueError naming them (``check_crop_settings``).
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float],
        local_crops_scale: Sequence[float],
        local_crops_number: int,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        global_crops_1_blur_prob: float = 0.0,
        global_crops_2_blur_prob: float = 0.9,
        local_crops_blur_prob: float = 0.5,
        solarization_prob: float = 0.2,
        max_image_side: int | None = None,
    ) -> None:
        blur_probs = (global_crops_1_blur_prob, global_crops_2_blur_prob, local_crops_blur_prob)
        check_crop_settings(
            global_crops_scale, local_crops_scale, local_crops_number, global_crops_size, local_crops_size,
            dict(zip(("global_crops_1_blur_prob", "global_crops_2_blur_prob", "local_crops_blur_prob"), blur_probs),
                 solarization_prob=solarization_prob),
        )  # fmt: skip
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size, self.local_crops_size = int(global_crops_size), int(local_crops_size)
        self.ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.flip_prob, self.jitter_prob, self.grayscale_prob = 0.5, 0.8, 0.2
        self.jitter = T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        self.blurs = tuple(GaussianBlur(p) for p in blur_probs)  # global 1, global 2, local
        self.solarization_prob = solarization_prob
        self.max_image_side = 4 * self.global_crops_size if max_image_side is None else int(max_image_side)
        if self.max_image_side < 1:
            raise ValueError(f"max_image_side must be >= 1, got {max_image_side}")

    @property
    def n_crops(self) -> int:
        return 2 + self.local_crops_number

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        image = ToRGB()(image)  # as the CPU path: alpha composited on white, 16-bit grey scaled
        rows = [
            self.draw_crop(image, self.global_crops_scale, self.blurs[0]),
            self.draw_crop(image, self.global_crops_scale, self.blurs[1], self.solarization_prob),
        ]
        rows += [self.draw_crop(image, self.local_crops_scale, self.blurs[2]) for _ in range(self.local_crops_number)]
        params = torch.tensor(rows, dtype=torch.float32)
        image, params = self._limit_size(image, params)
        return {"image": TF.pil_to_tensor(image), "params": params}

    def draw_crop(self, image: Image.Image, scale: Sequence[float], blur: GaussianBlur, solarization_prob=None):
        """One crop's parameter row, drawn exactly as the CPU path's transforms draw them."""
        top, left, height, width = T.RandomResizedCrop.get_params(image, list(scale), list(self.ratio))
        flip = bool(torch.rand(1) < self.flip_prob)  # RandomHorizontalFlip
        order, factors = [0, 1, 2, 3], [1.0, 1.0, 1.0, 0.0]
        jitter = not bool(self.jitter_prob < torch.rand(1))  # RandomApply
        if jitter:
            j = self.jitter
            fn_idx, *factors = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            order = fn_idx.tolist()
        grayscale = bool(torch.rand(1) < self.grayscale_prob)  # RandomGrayscale
        radius = blur(_RadiusProbe())
        sigma = radius if isinstance(radius, float) else 0.0
        solarize = solarization_prob is not None and torch.rand(1).item() < solarization_prob  # RandomSolarize
        return [top, left, height, width, flip, jitter, *factors, *order, grayscale, sigma > 0, sigma, solarize]

    def _limit_size(self, image: Image.Image, params: torch.Tensor) -> tuple[Image.Image, torch.Tensor]:
        width, height = image.size
        if max(width, height) <= self.max_image_side:
            return image, params
        factor = self.max_image_side / max(width, height)
        new_width, new_height = max(1, round(width * factor)), max(1, round(height * factor))
        image = image.resize((new_width, new_height), Image.Resampling.BICUBIC, reducing_gap=3.0)
        params = params.clone()
        params[:, [P["top"], P["height"]]] *= new_height / height
        params[:, [P["left"], P["width"]]] *= new_width / width
        return image, params


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (3, h, w) images -> (B, 3, Hmax, Wmax) and their (h, w) sizes (B, 2). The padding
    repeats each image's last column and row, so that bilinear sampling at the border reads the
    edge pixel as it would in the unpadded image."""
    sizes = torch.tensor([tuple(image.shape[-2:]) for image in images], dtype=torch.long)
    height, width = sizes.max(dim=0).values.tolist()
    out = torch.empty((len(images), 3, height, width), dtype=torch.uint8)
    for k, image in enumerate(images):
        h, w = image.shape[-2:]
        out[k, :, :h, :w] = image
        out[k, :, :h, w:] = image[:, :, w - 1 : w]
        out[k, :, h:, :] = out[k, :, h - 1 : h, :]
    return out, sizes


def _crop_major(params: torch.Tensor) -> torch.Tensor:
    """(B, n, P) -> (n * B, P): all samples' first crop, then all second crops, ..."""
    return params.transpose(0, 1).reshape(-1, params.shape[-1])


def collate_multicrop_params(samples: Sequence[tuple], mask_collate: Callable[[list], dict]) -> dict:
    """Collate ``(MultiCropParams output, *rest)`` samples for :class:`GPUMultiCrop`.

    ``mask_collate`` is the CPU path's collate (e.g. ``dinov2.train.data.build_collate(cfg)``); it
    runs on the same samples with empty crops, so the iBOT masks, their companions and any extra keys
    (``skipped_images``) are exactly the CPU path's. Adds ``images`` (uint8 (B, 3, Hmax, Wmax)),
    ``image_sizes`` (B, 2), ``global_crop_params`` (2B, P) and ``local_crop_params``
    (local_crops_number * B, P), crop-major like the CPU collate.
    """
    empty = torch.empty(0)
    placeholders = [({"global_crops": [empty, empty], "local_crops": []}, *sample[1:]) for sample in samples]
    batch = mask_collate(placeholders)
    batch.pop("collated_global_crops")
    batch.pop("collated_local_crops")
    images, sizes = pad_images([sample[0]["image"] for sample in samples])
    params = torch.stack([sample[0]["params"] for sample in samples])
    batch.update(
        images=images,
        image_sizes=sizes,
        global_crop_params=_crop_major(params[:, :2]),
        local_crop_params=_crop_major(params[:, 2:]),
    )
    return batch


# ---------------------------------------------------------------------- batched device ops (float32, [0, 1])
def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


def crop_resize(pixels: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Crop ``i`` of the rows (crop-major: image ``i % B``) resized to ``size`` x ``size`` by
    ``roi_align`` (aligned, adaptive sampling: bilinear samples averaged over each output bin)."""
    index = torch.arange(params.shape[0], device=params.device) % pixels.shape[0]
    top, left, height, width = (params[:, P[k]] for k in ("top", "left", "height", "width"))
    boxes = torch.stack([index.to(params.dtype), left, top, left + width, top + height], dim=1)
    return roi_align(pixels, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = x.unbind(dim=1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def blend_step(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per sample, brightness (op 0, blend with black), contrast (1, with the mean luma) or
    saturation (2, with the luma image) with that op's factor; any other op leaves it unchanged."""
    ones = torch.ones_like(factors[:, 0])
    ratio = torch.where(op == 2, factors[:, 2], ones)
    ratio = torch.where(op == 0, factors[:, 0], torch.where(op == 1, factors[:, 1], ratio))
    gray = rgb_to_gray(x)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    target = torch.where(_per_sample(op == 2), gray, torch.where(_per_sample(op == 1), mean, torch.zeros_like(mean)))
    ratio = _per_sample(ratio)
    return (ratio * x + (1.0 - ratio) * target).clamp(0.0, 1.0)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of each sample by ``shift`` (a fraction of a turn); 0 leaves it untouched."""
    maxc, minc = x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True)
    chroma = maxc - minc
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    r, g, b = x.split(1, dim=1)
    hue6 = torch.where(r == maxc, (g - b) / safe, torch.where(g == maxc, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    hue6 = torch.remainder(hue6 + 6.0 * _per_sample(shift), 6.0)
    k = torch.remainder(hue6 + torch.arange(5.0, 0.0, -2.0, device=x.device).view(1, 3, 1, 1), 6.0)  # R, G, B
    rotated = maxc - chroma * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)
    return torch.where(_per_sample(shift != 0), rotated, x)


def color_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Each sample's four jitter ops in its own order, sync-free: every order is run as up to three
    blend ops, the hue rotation, then up to three blend ops (slots outside a sample's order are
    identity), so the hue rotation is computed once per batch."""
    factors = params[:, P["brightness"] : P["hue"] + 1]
    order = params[:, P["order0"] : P["order3"] + 1].long()
    hue_position = (order == HUE_OP).long().argmax(dim=1)
    for slot in range(7):
        if slot == 3:
            x = adjust_hue(x, factors[:, 3])
            continue
        position = hue_position + (slot - 3)
        valid = (position >= 0) & (position <= 3)
        op = order.gather(1, position.clamp(0, 3).unsqueeze(1)).squeeze(1)
        x = blend_step(x, torch.where(valid, op, torch.full_like(op, -1)), factors)
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius_max: float = 2.0) -> torch.Tensor:
    """Per-sample separable Gaussian blur, kernel ``2 * ceil(3 sigma) + 1`` taps (as
    :class:`GaussianBlur` on tensors), reflect padding; ``sigma`` 0 leaves a sample unchanged."""
    half = math.ceil(3 * radius_max)
    n, c, h, w = x.shape
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    sigma = sigma.to(x.dtype).unsqueeze(1)
    kernel = torch.exp(-0.5 * (offsets / sigma.clamp(min=1e-6)) ** 2) * (offsets.abs() <= torch.ceil(3 * sigma))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    mode = "reflect" if min(h, w) > half else "replicate"
    padded = F.pad(x, (half, half, half, half), mode=mode).reshape(1, n * c, h + 2 * half, w + 2 * half)
    out = F.conv2d(padded, kernel.view(n * c, 1, -1, 1), groups=n * c)
    out = F.conv2d(out, kernel.view(n * c, 1, 1, -1), groups=n * c)
    return out.view(n, c, h, w)


class GPUMultiCrop:
    """Renders a :func:`collate_multicrop_params` batch on the device it is on: returns the batch with
    ``images``/``image_sizes``/``*_crop_params`` replaced by ``collated_global_crops`` (2B, 3, S, S) and
    ``collated_local_crops`` (n_local * B, 3, s, s) in ``dtype``, the keys and layout of the CPU collate.

    Per crop, in float32: crop + resize (:func:`crop_resize`), flip, colour jitter in the sample's op
    order (:func:`color_jitter`), grayscale, Gaussian blur (:func:`gaussian_blur`), solarisation
    (``x >= solarize_threshold -> 1 - x``; 0.5 is where a resampled value rounds to uint8 128, the
    CPU path's threshold), ImageNet normalisation. Nothing is random here.
    """

    def __init__(
        self,
        global_crops_size: int,
        local_crops_size: int,
        dtype: torch.dtype = torch.float32,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        blur_radius_max: float = 2.0,
        solarize_threshold: float = 0.5,
    ) -> None:
        self.global_crops_size, self.local_crops_size = int(global_crops_size), int(local_crops_size)
        self.dtype, self.mean, self.std = dtype, tuple(mean), tuple(std)
        self.blur_radius_max, self.solarize_threshold = float(blur_radius_max), float(solarize_threshold)
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, batch: dict) -> dict:
        out = {key: value for key, value in batch.items() if key not in RAW_KEYS}
        pixels = batch["images"].to(torch.float32)
        out["collated_global_crops"] = self.render(pixels, batch["global_crop_params"], self.global_crops_size)
        out["collated_local_crops"] = self.render(pixels, batch["local_crop_params"], self.local_crops_size)
        return out

    def render(self, pixels: torch.Tensor, params: torch.Tensor, size: int, normalize: bool = True) -> torch.Tensor:
        """The crops of ``params`` rows from ``pixels`` (float (B, 3, H, W), 0..255); without
        ``normalize``, float32 in [0, 1]."""
        if params.shape[0] == 0:  # as the CPU collate stacks no crops
            return torch.empty(0, dtype=self.dtype if normalize else torch.float32, device=pixels.device)
        params = params.to(device=pixels.device, dtype=torch.float32)
        x = crop_resize(pixels, params, size) / 255.0
        x = torch.where(_per_sample(params[:, P["flip"]] > 0), x.flip(-1), x)
        x = color_jitter(x, params)
        x = torch.where(_per_sample(params[:, P["grayscale"]] > 0), rgb_to_gray(x).expand_as(x), x)
        x = gaussian_blur(x, params[:, P["sigma"]], self.blur_radius_max)
        x = torch.where(_per_sample(params[:, P["solarize"]] > 0) & (x >= self.solarize_threshold), 1.0 - x, x)
        if not normalize:
            return x
        mean, std = self._statistics(x.device)
        return ((x - mean) / std).to(self.dtype)

    def _statistics(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:  # copied to the device once
            stats = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device) for v in (self.mean, self.std))
            self._stats[device] = tuple(stats)
        return self._stats[device]
