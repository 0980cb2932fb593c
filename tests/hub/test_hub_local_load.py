"""torch.hub's own loader on this checkout (``source="local"``): hubconf.py imports through torch.hub's
module loader, its ``dependencies`` are importable, and the entry points give the documented outputs."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = str(Path(__file__).resolve().parents[2])
TINY = {"depth": 1, "img_size": 28}  # a one-block ViT-S/14 on a 2 x 2 grid


def test_torch_hub_load_local_backbone_and_classifier():
    model = torch.hub.load(REPO, "dinov2_vits14_reg", source="local", pretrained=False, **TINY).eval()
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        features = model.forward_features(x)
        assert model(x).shape == (1, 384)
        ((patches, cls),) = model.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True)
    assert {k: None if v is None else tuple(v.shape) for k, v in features.items()} == {
        "x_norm_clstoken": (1, 384),
        "x_norm_regtokens": (1, 4, 384),
        "x_norm_patchtokens": (1, 4, 384),  # (28 / 14) ** 2 patches
        "x_prenorm": (1, 1 + 4 + 4, 384),
        "masks": None,
    }
    assert patches.shape == (1, 384, 2, 2) and cls.shape == (1, 384)
    torch.testing.assert_close(cls, features["x_norm_clstoken"])
    classifier = torch.hub.load(REPO, "dinov2_vits14_lc", source="local", pretrained=False, layers=1, **TINY)
    with torch.no_grad():
        assert classifier.eval()(x).shape == (1, 1000)
