"""Synthetic dataset: determinism, splits, balance, format, and how hard it is for untrained features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov2.data.datasets.synthetic import Synthetic
from dinov2.models.vision_transformer import DinoVisionTransformer


def _pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


def test_same_index_same_pixels_across_calls_and_instances():
    ds = Synthetic(num_images=40, seed=3)
    again = Synthetic(num_images=40, seed=3)
    for i in (0, 7, 39):
        np.testing.assert_array_equal(_pixels(ds[i][0]), _pixels(ds[i][0]))
        np.testing.assert_array_equal(_pixels(ds[i][0]), _pixels(again[i][0]))
        assert ds[i][1] == again[i][1]
    np.testing.assert_array_equal(ds.get_targets(), again.get_targets())


def test_seed_and_split_change_the_images():
    train = Synthetic(split="TRAIN", num_images=20, seed=0)
    val = Synthetic(split="VAL", num_images=20, seed=0)
    other_seed = Synthetic(split="TRAIN", num_images=20, seed=1)
    for i in range(5):
        assert not np.array_equal(_pixels(train[i][0]), _pixels(val[i][0]))
        assert not np.array_equal(_pixels(train[i][0]), _pixels(other_seed[i][0]))
    # different images within a split, too
    assert not np.array_equal(_pixels(train[0][0]), _pixels(train[1][0]))


def test_lengths_classes_and_balance():
    assert len(Synthetic()) == 5000
    assert len(Synthetic(split="val")) == 1000
    ds = Synthetic(num_images=130)
    assert ds.num_classes >= 10 and len(ds.class_names) == ds.num_classes
    targets = ds.get_targets()
    assert targets.shape == (130,) and targets.dtype.kind == "i"
    counts = np.bincount(targets, minlength=ds.num_classes)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 130
    assert not np.array_equal(targets, np.arange(130) % ds.num_classes)  # shuffled
    assert [ds[i][1] for i in range(130)] == targets.tolist()
    with pytest.raises(ValueError):
        Synthetic(split="TEST")
    with pytest.raises(IndexError):
        ds[130]


@pytest.mark.parametrize("size", [32, 64, 97])
def test_image_format_and_transforms(size):
    ds = Synthetic(num_images=12, image_size=size, transform=lambda im: im.size, target_transform=str)
    image, label = Synthetic(num_images=12, image_size=size)[5]
    assert image.mode == "RGB" and image.size == (size, size)
    assert isinstance(label, int) and 0 <= label < ds.num_classes
    assert ds[5] == ((size, size), str(label))
    assert _pixels(image).std() > 5  # not a blank image


def _load(split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = Synthetic(split=split, num_images=n, image_size=64)
    images = np.stack([_pixels(ds.get_image(i)) for i in range(n)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0, torch.from_numpy(ds.get_targets())


def _knn_top1(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor, k: int = 20):
    train, test = F.normalize(train.flatten(1), dim=1), F.normalize(test.flatten(1), dim=1)
    neighbours = (test @ train.T).topk(k, dim=1).indices
    votes = F.one_hot(train_y[neighbours], int(train_y.max()) + 1).sum(1)
    return (votes.argmax(1) == test_y).float().mean().item()


def test_knn_is_weak_but_above_chance_for_untrained_features():
    """Raw pixels and a random-init tiny ViT: far from solved, yet not noise (chance is 1/12)."""
    x_train, y_train = _load("TRAIN", 1000)
    x_val, y_val = _load("VAL", 300)
    chance = 1.0 / Synthetic.num_classes
    x_small = [F.interpolate(x, size=16, mode="area") for x in (x_train, x_val)]
    pixel_acc = _knn_top1(x_small[0], y_train, x_small[1], y_val)
    torch.manual_seed(0)
    vit = DinoVisionTransformer(
        img_size=64, patch_size=8, embed_dim=64, depth=2, num_heads=4, init_values=1.0, block_chunks=0
    ).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = [vit.forward_features((x - mean) / std)["x_norm_clstoken"] for x in (x_train, x_val)]
    vit_acc = _knn_top1(feats[0], y_train, feats[1], y_val)
    print(f"k-NN top-1 (k=20, cosine): pixels 16x16 {pixel_acc:.3f}, random-init ViT {vit_acc:.3f}")
    assert 1.5 * chance < vit_acc < 0.75
    assert pixel_acc < 0.5
