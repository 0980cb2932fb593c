"""OnlineKNN as the training loop uses it: from the config, on a micro backbone, mode preserved."""

from __future__ import annotations

import pytest
import torch
from eval_micro import micro_vit

from dinov2.eval.online import OnlineKNN
from dinov2.utils.config import load_config

TRAIN = "Synthetic:split=TRAIN:num_images=36:image_size=32"
VAL = "Synthetic:split=VAL:num_images=18:image_size=32"


def test_from_config_is_none_when_a_dataset_is_missing():
    assert OnlineKNN.from_config(load_config().evaluation.knn) is None  # the default: disabled
    assert OnlineKNN.from_config(load_config(None, [f"evaluation.knn.train_dataset={TRAIN}"]).evaluation.knn) is None
    assert OnlineKNN.from_config(None) is None


def test_from_config_reads_every_key():
    cfg = load_config(None, [
        f"evaluation.knn.train_dataset={TRAIN}", f"evaluation.knn.val_dataset={VAL}", "evaluation.knn.nb_knn=[3,7]",
        "evaluation.knn.temperature=0.2", "evaluation.knn.resize_size=36", "evaluation.knn.crop_size=32",
        "evaluation.knn.batch_size=5", "evaluation.knn.num_workers=2",
    ])  # fmt: skip
    online = OnlineKNN.from_config(cfg.evaluation.knn)
    assert (online.train_dataset_str, online.val_dataset_str) == (TRAIN, VAL)
    assert online.nb_knn == (3, 7) and online.temperature == 0.2
    assert (online.resize_size, online.crop_size, online.batch_size, online.num_workers) == (36, 32, 5, 2)


def test_call_returns_percentages_and_keeps_the_training_mode():
    online = OnlineKNN(TRAIN, VAL, nb_knn=(5, 10), resize_size=36, crop_size=32, batch_size=8)
    backbone = micro_vit().train()
    before = {name: p.clone() for name, p in backbone.state_dict().items()}
    metrics = online(backbone, torch.device("cpu"))
    assert list(metrics) == ["knn_top1", "knn_top1_k5", "knn_top1_k10"]
    assert all(0.0 <= v <= 100.0 for v in metrics.values())
    assert metrics["knn_top1"] == max(metrics["knn_top1_k5"], metrics["knn_top1_k10"])
    assert all((v * 18 / 100) == pytest.approx(round(v * 18 / 100)) for v in metrics.values())  # counts of 18
    assert backbone.training and all(m.training for m in backbone.modules())
    assert all(torch.equal(before[n], p) for n, p in backbone.state_dict().items())
    backbone.eval()
    assert online(backbone, torch.device("cpu")) == metrics  # same weights, same numbers; datasets reused
    assert not backbone.training


def test_bad_dataset_fails_on_first_call_with_its_name():
    online = OnlineKNN("Synthetic:split=TEST", VAL)
    with pytest.raises(ValueError, match="online k-NN train_dataset 'Synthetic:split=TEST'"):
        online(micro_vit(), torch.device("cpu"))
    with pytest.raises(ValueError, match="needs both"):
        OnlineKNN("", VAL)
    for temperature in (0.0, -0.07):  # used to pass until the first evaluation, deep into training
        with pytest.raises(ValueError, match="temperature must be positive"):
            OnlineKNN(VAL, VAL, temperature=temperature)


def test_transformed_images_are_cached_within_the_budget():
    from dinov2.data.datasets import make_dataset
    from dinov2.eval.online import CachedDataset

    dataset = make_dataset(VAL, transform=lambda image: torch.zeros(3, 8, 8))  # 768 bytes per image
    cached = CachedDataset(dataset, max_bytes=768 * 3)
    for index in (0, 1, 2, 3, 1):
        image, label = cached[index]
        assert label == dataset.get_target(index)
    assert sorted(cached.cache) == [0, 1, 2] and cached.cached_bytes == 768 * 3
    online = OnlineKNN(TRAIN, VAL, resize_size=32, crop_size=32, num_workers=0)
    assert all(isinstance(d, CachedDataset) for d in online.datasets())
    assert not any(isinstance(d, CachedDataset) for d in OnlineKNN(TRAIN, VAL, cache_bytes=0).datasets())
    # loader workers would fill their own copies of a cache, never this process's: no cache with workers
    assert not any(isinstance(d, CachedDataset) for d in OnlineKNN(TRAIN, VAL, num_workers=2).datasets())
