"""Online k-NN: a cheap accuracy signal logged by the training loop (``evaluation.knn.*`` in the config).

The loop builds one :class:`OnlineKNN` from ``cfg.evaluation.knn`` and calls it with the teacher
backbone every ``evaluation.eval_period_iterations`` (and before the first step with ``at_start``).
All ranks must call it: feature extraction is sharded over ranks and gathered, and the queries are
split between ranks. Datasets are built once, on the first call, and with ``num_workers=0`` the
transformed images are kept in memory (up to ``cache_bytes`` per process, half for each dataset), so later calls only
run the backbone.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from dinov2.data.transforms import make_classification_eval_transform
from dinov2.eval.features import (
    align_class_indices,
    check_labelled,
    extract_features,
    make_eval_dataset,
    sample_with_skips,
)
from dinov2.eval.knn import knn_classify
from dinov2.utils.config import select

logger = logging.getLogger("dinov2")


class CachedDataset(Dataset):
    """``dataset[i]`` memoised in this process while the stored tensors fit in ``max_bytes``.

    The evaluation transform is deterministic, so a cached sample equals a recomputed one. Samples
    loaded in DataLoader worker processes are not seen here; caching needs ``num_workers=0``. The
    cache keeps how many unreadable images each sample stands in for
    (:func:`~dinov2.eval.features.sample_with_skips`), so a substitute is recognised on every call.
    """

    def __init__(self, dataset: Dataset, max_bytes: int) -> None:
        self.dataset, self.max_bytes = dataset, int(max_bytes)
        self.cache: dict[int, tuple[Any, Any, int]] = {}
        self.cached_bytes = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_with_skips(self, index: int) -> tuple[Any, Any, int]:
        if index in self.cache:
            return self.cache[index]
        sample = sample_with_skips(self.dataset, index)
        image = sample[0]
        size = image.numel() * image.element_size() if isinstance(image, torch.Tensor) else self.max_bytes + 1
        if self.cached_bytes + size <= self.max_bytes:
            self.cache[index] = sample
            self.cached_bytes += size
        return sample

    def __getitem__(self, index: int):
        image, label, _ = self.sample_with_skips(index)
        return image, label


class OnlineKNN:
    """Weighted k-NN accuracy of a backbone on a small labelled (memory bank, queries) pair."""

    def __init__(
        self,
        train_dataset: str,
        val_dataset: str,
        nb_knn: Sequence[int] = (10, 20),
        temperature: float = 0.07,
        resize_size: int = 256,
        crop_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        cache_bytes: int = 512 * 2**20,
    ) -> None:
        if not train_dataset or not val_dataset:
            raise ValueError("OnlineKNN needs both a train_dataset (memory bank) and a val_dataset (queries)")
        if not nb_knn or min(nb_knn) < 1:
            raise ValueError(f"nb_knn must be positive integers, got {nb_knn!r}")
        if not float(temperature) > 0:  # checked here, not at the first evaluation, possibly hours into training
            raise ValueError(f"the online k-NN temperature must be positive, got {temperature!r}")
        self.train_dataset_str, self.val_dataset_str = str(train_dataset), str(val_dataset)
        self.nb_knn = tuple(int(k) for k in nb_knn)
        self.temperature = float(temperature)
        self.resize_size, self.crop_size = int(resize_size), int(crop_size)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.cache_bytes = int(cache_bytes)
        self._datasets: tuple[Any, Any] | None = None

    @classmethod
    def from_config(cls, knn_cfg: Any) -> OnlineKNN | None:
        """From ``cfg.evaluation.knn``; ``None`` (disabled) when either dataset string is empty."""
        if knn_cfg is None or not select(knn_cfg, "train_dataset", "") or not select(knn_cfg, "val_dataset", ""):
            return None
        return cls(
            train_dataset=select(knn_cfg, "train_dataset"),
            val_dataset=select(knn_cfg, "val_dataset"),
            nb_knn=tuple(select(knn_cfg, "nb_knn", (10, 20))),
            temperature=select(knn_cfg, "temperature", 0.07),
            resize_size=select(knn_cfg, "resize_size", 256),
            crop_size=select(knn_cfg, "crop_size", 224),
            batch_size=select(knn_cfg, "batch_size", 64),
            num_workers=select(knn_cfg, "num_workers", 0),
        )

    def datasets(self) -> tuple[Any, Any]:
        """The (memory bank, queries) datasets with the eval transform, built on first use."""
        if self._datasets is None:
            transform = make_classification_eval_transform(resize_size=self.resize_size, crop_size=self.crop_size)
            train = make_eval_dataset(self.train_dataset_str, transform, role="online k-NN train_dataset")
            val = make_eval_dataset(self.val_dataset_str, transform, role="online k-NN val_dataset")
            check_labelled(train, self.train_dataset_str, role="online k-NN train_dataset", purpose="online k-NN")
            check_labelled(val, self.val_dataset_str, role="online k-NN val_dataset", purpose="online k-NN")
            align_class_indices(train, val, role="online k-NN val_dataset")
            if self.cache_bytes > 0 and self.num_workers == 0:
                train = CachedDataset(train, self.cache_bytes // 2)  # half the budget each
                val = CachedDataset(val, self.cache_bytes // 2)
            self._datasets = (train, val)
        return self._datasets

    def __call__(
        self, backbone: nn.Module, device: torch.device, autocast_dtype: torch.dtype | None = None
    ) -> dict[str, float]:
        """``{"knn_top1": best, "knn_top1_k10": ..., ...}`` in percent; ``backbone``'s mode is restored."""
        device = torch.device(device)
        results = {}
        for name, dataset in zip(("train", "val"), self.datasets()):
            results[name] = extract_features(
                backbone, dataset, self.batch_size, self.num_workers, device=device,
                autocast_dtype=autocast_dtype, progress=False,
            )  # fmt: skip
        (train_x, train_y), (val_x, val_y) = results["train"], results["val"]
        accuracy = knn_classify(
            train_x, train_y, val_x, val_y, nb_knn=self.nb_knn, temperature=self.temperature, shard_queries=True
        )
        metrics = {f"knn_top1_k{k}": r["top1"] for k, r in accuracy.items()}
        metrics = {"knn_top1": max(metrics.values()), **metrics}
        logger.info("Online k-NN: %s", ", ".join(f"{key} {value:.2f}" for key, value in metrics.items()))
        return metrics
