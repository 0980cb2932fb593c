"""Frozen-backbone feature extraction over a labelled dataset, in dataset order, on any number of ranks.

Each rank runs the model on its block of an :class:`~dinov2.data.samplers.EpochSampler` (dataset
order, padded by repeating the first indices so that every rank gets the same number of batches).
After every batch the ranks all-gather their outputs, and each gathered row is written to the
dataset index it came from; rows that are padding are dropped. Every rank ends with the features
and labels of the whole dataset in dataset order.

Unreadable images: a file-backed dataset (:class:`~dinov2.data.datasets.base.FileImageDataset`)
that cannot decode ``dataset[i]`` returns the next readable sample instead, with that sample's
label, and counts the failure in ``num_skipped``. Each sample is loaded together with the growth
of that counter (:func:`sample_with_skips`), so a substituted sample is recognised; its row is
dropped, not kept as a duplicate of its neighbour, and the number of dropped rows (over all ranks)
is logged as a warning and returned as ``num_skipped``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
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


def check_labelled(dataset, dataset_str: str, role: str = "dataset", purpose: str = "evaluation") -> None:
    """Refuse, before any feature is extracted, a dataset with unlabelled samples (target < 0), read
    from its ``get_targets()`` where it has one (others are checked batch by batch during
    extraction). Every rank reads the same targets and stops together."""
    get_targets = getattr(dataset, "get_targets", None)
    targets = np.asarray(get_targets()) if callable(get_targets) else None
    if targets is None or targets.dtype.kind not in "iu":
        return
    missing = np.flatnonzero(targets < 0)
    if missing.size:
        raise ValueError(
            f"the {role} {dataset_str!r} has {missing.size} unlabelled samples (target -1; the first at index "
            f"{int(missing[0])}); {purpose} needs a label for every image"
        )


class ClassIndexMap:
    """Target transform (picklable, for loader workers): a class index of one dataset -> the index of
    the same class name in another; indices it does not list (-1: unlabelled) are kept. ``then``, the
    dataset's previous target transform, is applied to the result."""

    def __init__(self, mapping: dict[int, int], then=None) -> None:
        self.mapping, self.then = dict(mapping), then

    def __call__(self, target):
        target = self.mapping.get(target, target) if target is not None else None
        return target if self.then is None else self.then(target)


def _few(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names)} classes)" if len(names) > shown else "")


def class_names_of(dataset) -> list[str | None] | None:
    """The name of each class index of ``dataset``: its ``classes`` (``ImageFolder``: the folder
    names; ``ImageNet``, ``ImageNet22k``: the wnids), else, for datasets with ``get_class_id(index)`` and ``get_targets()`` (``ImageNet``,
    ``ImageNet22k``: the wnids), the class id of the first sample of each class (``None`` for an
    index without samples). ``None`` when the dataset names no classes (``FileList``)."""
    names = getattr(dataset, "classes", None)
    if isinstance(names, list | tuple) and names:  # empty: an unlabelled split (ImageNet TEST) names no class
        return [str(name) for name in names]
    get_class_id, get_targets = getattr(dataset, "get_class_id", None), getattr(dataset, "get_targets", None)
    if not callable(get_class_id) or not callable(get_targets):
        return None
    targets = np.asarray(get_targets())
    labelled = np.flatnonzero(targets >= 0) if targets.dtype.kind in "iu" else np.zeros(0, dtype=np.int64)
    if not labelled.size:
        return None
    classes, first = np.unique(targets[labelled], return_index=True)
    count = getattr(dataset, "num_classes", 0)  # also classes without samples: val-only names go after them
    names = [None] * max(int(classes[-1]) + 1, count if isinstance(count, int) else 0)
    for cls, row in zip(classes.tolist(), labelled[first].tolist()):
        names[cls] = str(get_class_id(row))
    return names


def align_class_indices(train_dataset, val_dataset, role: str = "val dataset") -> dict[int, int]:
    """Give ``val_dataset`` the class indices of ``train_dataset`` when both name their classes
    (:func:`class_names_of`: ``ImageFolder`` trees, whose indices are the positions of the folder
    names in each tree, and ``ImageNet`` splits, named by wnid) and the names differ: a val tree
    without one of train's class folders would otherwise label its classes with shifted indices and
    be scored against the wrong classes. Val classes that train lacks get the indices after train's
    (never predicted by k-NN; refused by the linear probe). Returns the mapping (empty when nothing
    changes) and logs a warning naming the differences. Val classes none of whose names train has
    (``0 1 2`` against ``n014...``), or a val set that needs relabelling but has no
    ``target_transform``, are a ``ValueError``: every query would be scored as a miss, or against
    the wrong class."""
    train_names, val_names = class_names_of(train_dataset), class_names_of(val_dataset)
    if train_names is None or val_names is None or train_names == val_names:
        return {}
    index = {name: i for i, name in enumerate(train_names) if name is not None}
    named = [name for name in val_names if name is not None]  # indices without a name have no sample
    extra = [name for name in named if name not in index]
    if len(extra) == len(named):
        raise ValueError(
            f"the {role}'s classes share no name with the train dataset's (val: {_few(named)}; train: "
            f"{_few(list(index))}), so no val image could be classified correctly: name its class folders as train's"
        )
    index.update({name: len(train_names) + j for j, name in enumerate(extra)})
    mapping = {i: index[name] for i, name in enumerate(val_names) if name is not None and index[name] != i}
    in_val = set(named)
    missing = [name for name in train_names if name is not None and name not in in_val]
    if not mapping and not missing:
        return {}
    if mapping and not hasattr(val_dataset, "target_transform"):
        raise ValueError(f"the {role} names other classes than the train dataset and cannot be relabelled")
    logger.warning(
        "The %s's classes differ from the train dataset's (absent from val: %s; absent from train: %s): %s",
        role, missing or "none", extra or "none",
        "its labels are mapped to the train dataset's class indices by name" if mapping
        else "its labels already are the train dataset's class indices",
    )  # fmt: skip
    if mapping:
        val_dataset.target_transform = ClassIndexMap(mapping, then=val_dataset.target_transform)
    return mapping


def collate_images_and_labels(batch: Sequence[tuple[Any, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack images; labels become an int64 tensor with ``None`` mapped to -1 (checked by the caller)."""
    images = torch.stack([image for image, _ in batch])
    labels = torch.tensor([MISSING_LABEL if t is None else int(t) for _, t in batch], dtype=torch.int64)
    return images, labels


def collate_with_skips(batch: Sequence[tuple[Any, Any, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Collate ``(image, label, skipped)`` items: images, labels (as above) and skipped counts (int64)."""
    images, labels = collate_images_and_labels([(image, label) for image, label, _ in batch])
    return images, labels, torch.tensor([int(skipped) for _, _, skipped in batch], dtype=torch.int64)


def sample_with_skips(dataset: Dataset, index: int) -> tuple[Any, Any, int]:
    """``(image, label, skipped)`` for ``dataset[index]``: ``skipped`` is how many unreadable images
    the dataset passed over to produce it (the growth of its ``num_skipped``; 0 for datasets that do
    not count), so ``skipped > 0`` means the sample is a substitute for ``dataset[index]``. A dataset
    (or wrapper) may provide its own ``sample_with_skips(index)``, e.g. to cache the count."""
    own = getattr(dataset, "sample_with_skips", None)
    if callable(own):
        return own(index)
    before = getattr(dataset, "num_skipped", 0)
    image, label = dataset[index]
    return image, label, getattr(dataset, "num_skipped", 0) - before


class SkipCountedSamples(Dataset):
    """``dataset`` whose items are :func:`sample_with_skips` triples; picklable for loader workers."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        return sample_with_skips(self.dataset, index)


@dataclass
class ExtractedFeatures:
    """Result of :func:`extract_labelled_features`: rows in dataset order, substituted samples dropped."""

    features: torch.Tensor  # (N - num_skipped, D) float32
    labels: torch.Tensor  # (N - num_skipped,) int64
    indices: torch.Tensor  # (N - num_skipped,) int64: the dataset index of each row
    num_skipped: int  # samples whose image could not be read (dropped), over all ranks


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
        self.substituted = torch.zeros(sampler.sample_count, dtype=torch.bool, device=storage)
        self.offset = 0  # position of the current batch inside each rank's block

    def add(self, features: torch.Tensor, labels: torch.Tensor, skipped: torch.Tensor) -> None:
        world, n, per_rank = self.sampler.world_size, self.sampler.sample_count, self.sampler.num_samples
        features, labels = distributed.all_gather_cat(features), distributed.all_gather_cat(labels)
        substituted = distributed.all_gather_cat(skipped) > 0
        batch = features.shape[0] // world
        positions = torch.arange(batch)[None, :] + self.offset + torch.arange(world)[:, None] * per_rank
        positions = positions.reshape(-1)
        keep = positions < n  # padding sits at the end of the padded global order
        rows = self.order[positions[keep]].to(self.storage)
        keep = keep.to(features.device)
        if self.features is None:
            self.features = torch.zeros(n, features.shape[1], dtype=torch.float32, device=self.storage)
        labels, substituted = labels[keep], substituted[keep]
        unlabelled = (labels < 0) & ~substituted  # a substitute's label belongs to another index
        if unlabelled.any():  # every rank sees the same gathered labels, so all raise together
            raise ValueError(
                f"dataset index {int(rows[unlabelled.nonzero()[0, 0].item()])} has no label; "
                "evaluation needs a labelled split"
            )
        self.features[rows] = features[keep].float().to(self.storage)
        self.labels[rows] = labels.to(self.storage)
        self.substituted[rows] = substituted.to(self.storage)
        self.offset += batch

    def result(self, dataset: Dataset) -> ExtractedFeatures:
        """The rows of the readable samples; warns with the number of dropped (substituted) ones."""
        kept = ~self.substituted
        num_skipped = int(self.substituted.sum())
        if num_skipped == len(kept):
            raise ValueError(f"none of the {len(kept)} images of {type(dataset).__name__} could be read")
        if num_skipped:
            logger.warning(
                "%d of %d images of %s could not be read; their rows are left out of the features "
                "(instead of duplicating the next readable image)", num_skipped, len(kept), type(dataset).__name__,
            )  # fmt: skip
        indices = torch.arange(len(kept), device=self.storage)[kept]
        return ExtractedFeatures(self.features[kept], self.labels[kept], indices, num_skipped)


@torch.no_grad()
def extract_labelled_features(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    gather_on_cpu: bool = False,
    progress: bool = True,
) -> ExtractedFeatures:
    """Features (float32), labels (int64) and dataset indices of ``dataset``'s readable samples, in
    dataset order, on every rank, and the number of unreadable ones (dropped; see the module docstring).

    The model runs in eval mode (every submodule's previous mode is restored) without gradients, under autocast
    when ``autocast_dtype`` is given. Results live on ``device`` (default: the model's), or on the
    CPU with ``gather_on_cpu``. Raises ``ValueError`` for an empty dataset, missing labels or a
    dataset none of whose images could be read.
    """
    if len(dataset) == 0:
        raise ValueError(f"cannot extract features: {type(dataset).__name__} is empty")
    device = torch.device(device) if device is not None else _model_device(model)
    sampler = EpochSampler(len(dataset))
    loader = make_data_loader(
        SkipCountedSamples(dataset), batch_size, num_workers, sampler=sampler, shuffle=False, drop_last=False,
        persistent_workers=False, collate_fn=collate_with_skips,
    )  # fmt: skip
    gathered = _Gathered(sampler, torch.device("cpu") if gather_on_cpu else device)
    bar = _progress_bar(sampler.total_size, progress and distributed.is_main_process(), "features")
    modes, start = [(module, module.training) for module in model.modules()], time.perf_counter()
    model.eval()
    try:
        for images, labels, skipped in loader:
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                features = _cls_features(model(images))
            gathered.add(features, labels.to(device), skipped.to(device))
            if bar is not None:
                bar.update(images.shape[0] * sampler.world_size)
    finally:
        for module, training in modes:  # exactly as before, also where submodules differed
            module.training = training
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    logger.info("Features of %d images in %.1f s (%.0f images/s)", len(dataset), seconds, len(dataset) / seconds)
    return gathered.result(dataset)


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
    """``(features, labels)`` of :func:`extract_labelled_features` (same arguments): row ``i`` is
    ``dataset[i]`` unless images were unreadable, whose rows are dropped (with a warning)."""
    result = extract_labelled_features(
        model, dataset, batch_size, num_workers, device, autocast_dtype, gather_on_cpu, progress
    )
    return result.features, result.labels
