"""Feature extraction and class alignment: behaviour a mutation audit found untested (autocast during
extraction, the CLS entry of a feature dict, a dataset none of whose images can be read, the
previous target transform kept under a relabelling, class names of classes without samples, the
indices of val-only classes, and targets that are not integers)."""

from __future__ import annotations

import pytest
import torch
from test_feature_extraction import IndexImages
from torch import nn

from dinov2.eval.features import (
    ClassIndexMap,
    align_class_indices,
    check_labelled,
    class_names_of,
    extract_labelled_features,
)


class _AutocastProbe(nn.Module):
    """Features ``(i, 2 i)``; records whether it ran under autocast, and in which dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([[1.0, 2.0]]))
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return x.flatten(1)[:, :1] @ self.weight


def test_extraction_runs_the_model_under_the_given_autocast_dtype_and_not_without_one():
    model = _AutocastProbe()
    extract_labelled_features(model, IndexImages(4), 2, autocast_dtype=torch.bfloat16, progress=False)
    assert model.seen == [(True, torch.bfloat16)] * 2
    model.seen.clear()
    extract_labelled_features(model, IndexImages(4), 2, progress=False)
    assert [enabled for enabled, _ in model.seen] == [False, False]


class _DictOutput(nn.Module):
    """A backbone's feature dict: CLS ``(i, -i)``, patch tokens of other values."""

    def forward(self, x):
        value = x.flatten(1)[:, :1]
        return {"x_norm_clstoken": torch.cat([value, -value], 1), "x_norm_patchtokens": torch.ones(len(x), 4, 2)}


def test_a_feature_dict_gives_its_cls_tokens():
    got = extract_labelled_features(_DictOutput(), IndexImages(5), 2, progress=False)
    index = torch.arange(5.0)[:, None]
    torch.testing.assert_close(got.features, torch.cat([index, -index], 1))


class _NothingReadable(IndexImages):
    """Every sample is a substitute (the dataset skipped an unreadable image to produce each one)."""

    def sample_with_skips(self, index):
        image, label = self[index]
        return image, label, 1


def test_a_dataset_none_of_whose_images_can_be_read_is_an_error():
    with pytest.raises(ValueError, match="none of the 6 images of _NothingReadable could be read"):
        extract_labelled_features(nn.Flatten(), _NothingReadable(6), 4, progress=False)


class _Named:
    """A dataset naming its classes through ``get_class_id`` / ``get_targets`` (as ImageNet does)."""

    def __init__(self, targets, ids, num_classes=None, target_transform=None):
        self.targets, self.ids, self.target_transform = list(targets), dict(ids), target_transform
        if num_classes is not None:
            self.num_classes = num_classes

    def get_targets(self):
        return self.targets

    def get_class_id(self, index):
        return self.ids[self.targets[index]]


def test_class_names_cover_the_declared_classes_without_samples():
    dataset = _Named([0, 2, 2], {0: "n01", 2: "n03"}, num_classes=5)
    assert class_names_of(dataset) == ["n01", None, "n03", None, None]


def test_val_only_classes_get_indices_after_every_train_index_including_nameless_ones():
    # train: classes 0 and 2 have samples, 1 has none (no name); val: "n01" and "n09" (not in train)
    train = _Named([0, 2], {0: "n01", 2: "n03"})
    val = _Named([0, 1], {0: "n01", 1: "n09"})
    mapping = align_class_indices(train, val)
    assert mapping == {1: 3}  # index 2 would score n09's images as train's n03
    assert val.target_transform(1) == 3 and val.target_transform(0) == 0


def test_a_relabelling_keeps_the_val_sets_previous_target_transform():
    assert ClassIndexMap({0: 2}, then=lambda t: t + 100)(0) == 102
    train = _Named([0, 1], {0: "b", 1: "a"})
    val = _Named([0, 1], {0: "a", 1: "b"}, target_transform=lambda t: -t)
    assert align_class_indices(train, val) == {0: 1, 1: 0}
    assert [val.target_transform(t) for t in (0, 1)] == [-1, 0]  # mapped by name, then the old transform


def test_targets_that_are_not_integers_are_left_to_the_per_batch_check():
    class Unlabelled:
        def get_targets(self):
            return [None, 1, None]

    check_labelled(Unlabelled(), "Custom")  # no TypeError: checked batch by batch during extraction
    with pytest.raises(ValueError, match="has 1 unlabelled samples"):
        check_labelled(_Named([0, -1], {0: "a"}), "Custom")
