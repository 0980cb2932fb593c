"""GPU-side augmentation: behaviour a mutation audit found untested (the downscaled size rounded to
the nearest pixel, solarisation of a value equal to the threshold, and the output dtype of every crop
group, empty ones included)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from test_gpu_augmentation import KW, _row, make_image

from dinov2.data.gpu_augmentation import GPUMultiCrop, MultiCropParams, pad_images


def test_a_downscaled_image_has_its_sides_rounded_to_the_nearest_pixel():
    # 1000 x 607 with a longest side of 100: 607 * 100 / 1000 = 60.7 -> 61 rows (truncation gives 60).
    image = Image.fromarray(np.full((607, 1000, 3), 90, dtype=np.uint8))
    out = MultiCropParams(**KW, max_image_side=100)(image)
    assert tuple(out["image"].shape) == (3, round(607 * 100 / 1000), 100) == (3, 61, 100)


def test_a_value_equal_to_the_solarisation_threshold_is_inverted():
    # torchvision's solarize inverts x >= threshold. Take the threshold to be a value the crop has, so
    # that the boundary is hit exactly; values below it stay, values at or above it are inverted.
    pixels = torch.from_numpy(np.asarray(make_image(3, size=(16, 16)))).permute(2, 0, 1)
    images, _ = pad_images([pixels])
    row = _row(0, 0, 16, 16)
    plain = GPUMultiCrop(16, 8).render(images.float(), row[None], 16, normalize=False)
    threshold = float(plain.flatten().sort().values[plain.numel() // 2])  # the median value, as float32
    solarized = GPUMultiCrop(16, 8, solarize_threshold=threshold)
    out = solarized.render(images.float(), _row(0, 0, 16, 16, solarize=1)[None], 16, normalize=False)
    at = plain == threshold
    assert at.any()
    torch.testing.assert_close(out[at], 1.0 - plain[at])
    torch.testing.assert_close(out[plain < threshold], plain[plain < threshold])


def test_every_crop_group_comes_out_in_the_requested_dtype_even_when_empty():
    pixels = torch.from_numpy(np.asarray(make_image(4, size=(40, 32)))).permute(2, 0, 1)
    images, sizes = pad_images([pixels, pixels])
    batch = {
        "images": images,
        "image_sizes": sizes,
        "global_crop_params": torch.stack([_row(0, 0, 32, 40)] * 4),
        "local_crop_params": torch.zeros(0, _row(0, 0, 1, 1).numel()),  # crops.local_crops_number=0
    }
    out = GPUMultiCrop(16, 8, dtype=torch.bfloat16)(batch)
    assert out["collated_global_crops"].dtype == torch.bfloat16
    assert out["collated_global_crops"].shape == (4, 3, 16, 16)
    assert out["collated_local_crops"].dtype == torch.bfloat16 and out["collated_local_crops"].numel() == 0
