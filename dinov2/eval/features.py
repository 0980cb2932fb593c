"""Frozen-backbone feature extraction over a labelled dataset, in dataset order, on any number of ranks.

Each rank runs the model on its block of an :class:`~dinov2.data.samplers.EpochSampler` (dataset
order, padded by repeating the first indices so that every rank gets the same number of batches).
After every batch the ranks all-gather their outputs, and each gathered row is written to the
dataset index it came from; rows that are padding are dropped. Every rank ends with the features
and labels of the whole dataset, row ``i`` for ``dataset[i]``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from dinov2 import distributed
from dinov2.data.loaders import make_data_loader
from dinov2.data.samplers import EpochSampler

logger = logging.getLogger("dinov2")

MISSING_LABEL = -1


def make_eval_dataset(dataset_str: str, transform=None, role: str = "dataset"):
    """``make_dataset(dataset_str, transform)`` with errors that name the dataset string and its role."""
    from dinov2.data.datasets import make_dataset

    if not dataset_str:
        raise ValueError(f"no {role} given: pass a dataset string such as 'Synthetic:split=VAL'")
    try:
        dataset = make_dataset(dataset_str, transform=transform)
    except (ValueError, FileNotFoundError, OSError) as error:
        raise ValueError(f"cannot build the {role} {dataset_str!r}: {error}") from error
    if len(dataset) == 0:
        raise ValueError(f"the {role} {dataset_str!r} is empty (0 samples)")
    return dataset


def collate_images_and_labels(batch: Sequence[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images; labels become an int64 tensor with ``None`` mapped to -1 (checked by the caller)."""
    images = torch.stack([image for image, _ in batch])
    labels = torch.tensor([MISSING_LABEL if t is None else int(t) for _, t in batch], dtype=torch.int64)
    return images, labels


def _cls_features(output: Any) -> torch.Tensor:
    """The CLS features of a backbone's output: a tensor, or the ``x_norm_clstoken`` of a feature dict."""
    if isinstance(output, dict):
        output = output["x_norm_clstoken"]
    if not isinstance(output, torch.Tensor) or output.ndim != 2:
        raise TypeError("the model must return (batch, dim) features or a dict with 'x_norm_clstoken'")
    return output


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, dynamic_ncols=True, mininterval=2.0)


class _Gathered:
    """Output buffers for all ranks' rows; ``add`` places one batch from every rank."""

    def __init__(self, sampler: EpochSampler, storage: torch.device) -> None:
        self.sampler, self.storage = sampler, storage
        self.order = torch.from_numpy(np.asarray(sampler.global_indices, dtype=np.int64))
        self.features: torch.Tensor | None = None
        self.labels = torch.full((sampler.sample_count,), MISSING_LABEL, dtype=torch.int64, device=storage)
        self.offset = 0  # position of the current batch inside each rank's block

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        world, n, per_rank = self.sampler.world_size, self.sampler.sample_count, self.sampler.num_samples
        features, labels = distributed.all_gather_cat(features), distributed.all_gather_cat(labels)
        batch = features.shape[0] // world
        positions = torch.arange(batch)[None, :] + self.offset + torch.arange(world)[:, None] * per_rank
        positions = positions.reshape(-1)
        keep = positions < n  # padding sits at the end of the padded global order
        rows = self.order[positions[keep]].to(self.storage)
        keep = keep.to(features.device)
        if self.features is None:
            self.features = torch.zeros(n, features.shape[1], dtype=torch.float32, device=self.storage)
        labels = labels[keep]
        if (labels < 0).any():  # every rank sees the same gathered labels, so all raise together
            raise ValueError(
                f"dataset index {int(rows[(labels < 0).nonzero()[0, 0].item()])} has no label; "
                "evaluation needs a labelled split"
            )
        self.features[rows] = features[keep].float().to(self.storage)
        self.labels[rows] = labels.to(self.storage)
        self.offset += batch


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    gather_on_cpu: bool = False,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, D) float32 and labels (N,) int64 of ``dataset``, in dataset order, on every rank.

    The model runs in eval mode (every submodule's previous mode is restored) without gradients, under autocast
    when ``autocast_dtype`` is given. Results live on ``device`` (default: the model's), or on the
    CPU with ``gather_on_cpu``. Raises ``ValueError`` for an empty dataset or missing labels.
    """
    if len(dataset) == 0:
        raise ValueError(f"cannot extract features: {type(dataset).__name__} is empty")
    device = torch.device(device) if device is not None else _model_device(model)
    sampler = EpochSampler(len(dataset))
    loader = make_data_loader(
        dataset, batch_size, num_workers, sampler=sampler, shuffle=False, drop_last=False,
        persistent_workers=False, collate_fn=collate_images_and_labels,
    )  # fmt: skip
    gathered = _Gathered(sampler, torch.device("cpu") if gather_on_cpu else device)
    bar = _progress_bar(sampler.total_size, progress and distributed.is_main_process(), "features")
    modes, start = [(module, module.training) for module in model.modules()], time.perf_counter()
    model.eval()
    try:
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                features = _cls_features(model(images))
            gathered.add(features, labels.to(device))
            if bar is not None:
                bar.update(images.shape[0] * sampler.world_size)
    finally:
        for module, training in modes:  # exactly as before, also where submodules differed
            module.training = training
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    logger.info("Features of %d images in %.1f s (%.0f images/s)", len(dataset), seconds, len(dataset) / seconds)
    return gathered.features, gathered.labels
