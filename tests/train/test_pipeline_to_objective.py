"""The data issue's batch format feeds the objective: augmentation -> collate -> SSLMetaArch."""

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from dinov2.data.augmentations import DataAugmentationDINO
from dinov2.data.collate import collate_data_and_cast
from dinov2.data.masking import MaskingGenerator
from dinov2.models import vision_transformer
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import default_config_with

GLOBAL, LOCAL, PATCH, N_LOCAL = 32, 16, 8, 2


@pytest.fixture(autouse=True)
def _tiny_arch(monkeypatch):
    tiny = partial(vision_transformer.DinoVisionTransformer, embed_dim=32, depth=2, num_heads=2)
    monkeypatch.setitem(vision_transformer.ARCHS, "vit_test", tiny)


def test_augmented_and_collated_batch_trains_the_objective():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)) for _ in range(4)]
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), N_LOCAL, global_crops_size=GLOBAL, local_crops_size=LOCAL)
    grid = GLOBAL // PATCH
    batch = collate_data_and_cast(
        [(augment(im), -1) for im in images],
        mask_ratio_tuple=(0.1, 0.5),
        mask_probability=0.5,
        dtype=torch.float32,
        n_tokens=grid * grid,
        mask_generator=MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid),
    )
    cfg = default_config_with(
        {
            "student": {"arch": "vit_test", "patch_size": PATCH, "drop_path_rate": 0.2},
            "crops": {"global_crops_size": GLOBAL, "local_crops_size": LOCAL, "local_crops_number": N_LOCAL},
            "dino": {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
            "ibot": {"head_n_prototypes": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        }
    )
    model = SSLMetaArch(cfg).train()
    assert batch["n_masked_patches"].item() > 0
    out = model(batch, teacher_temp=0.04)
    assert set(out) == {"loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert model.student.ibot_head.mlp[0].weight.grad.abs().sum() > 0
