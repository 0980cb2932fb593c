"""Feature extraction: dataset order, labels, modes and errors; two gloo ranks equal one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dinov2.eval.features import extract_features, extract_labelled_features
from dinov2.eval.knn import knn_classify
from dinov2.eval.online import CachedDataset, OnlineKNN

WORLD = 2
ODD_SIZE = 7  # not divisible by the world size: the last rank's block ends with padding
SYNTHETIC = ("Synthetic:split=TRAIN:num_images=30:image_size=32", "Synthetic:split=VAL:num_images=15:image_size=32")


class IndexImages(torch.utils.data.Dataset):
    """Image ``i`` is a 3x4x4 tensor filled with ``i``; its label is ``i % 3`` (``None`` when unlabelled)."""

    def __init__(self, size: int, labelled: bool = True, bad_index: int | None = None) -> None:
        self.size, self.labelled, self.bad_index = size, labelled, bad_index

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        label = index % 3 if self.labelled and index != self.bad_index else None
        return torch.full((3, 4, 4), float(index)), label


class SkippingIndexImages(IndexImages):
    """``IndexImages`` with unreadable indices, following the ``FileImageDataset`` contract: an
    unreadable index increments ``num_skipped`` and the next index (cyclically) is returned instead."""

    def __init__(self, size: int, unreadable: set[int]) -> None:
        super().__init__(size)
        self.unreadable, self.num_skipped = set(unreadable), 0

    def __getitem__(self, index: int):
        while index in self.unreadable:
            self.num_skipped += 1
            index = (index + 1) % self.size
        return super().__getitem__(index)


class IndexFeatures(nn.Module):
    """Features ``(i, 2 i)`` from an image filled with ``i``; records the mode it ran in."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)  # would scramble the features in training mode
        self.modes_seen = []

    def forward(self, x):
        self.modes_seen.append(self.training)
        value = self.dropout(x.flatten(1)[:, :1])
        return torch.cat([value, 2 * value], dim=1)


def expected_features(size: int) -> torch.Tensor:
    index = torch.arange(size, dtype=torch.float32)[:, None]
    return torch.cat([index, 2 * index], dim=1)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
@pytest.mark.parametrize("gather_on_cpu", [False, True])
def test_one_process_keeps_dataset_order_and_labels(batch_size, gather_on_cpu):
    features, labels = extract_features(
        IndexFeatures(), IndexImages(ODD_SIZE), batch_size, gather_on_cpu=gather_on_cpu, progress=False
    )
    torch.testing.assert_close(features, expected_features(ODD_SIZE))
    assert labels.tolist() == [i % 3 for i in range(ODD_SIZE)]
    assert features.dtype == torch.float32 and labels.dtype == torch.int64


def test_model_runs_in_eval_mode_and_every_submodule_mode_is_restored():
    model = IndexFeatures().train()
    model.dropout.eval()  # a deliberately mixed state must come back as it was
    extract_features(model, IndexImages(5), 2, progress=False)
    assert model.modes_seen == [False, False, False]
    assert model.training and not model.dropout.training


def test_empty_dataset_and_missing_labels_raise_clear_errors():
    with pytest.raises(ValueError, match="empty"):
        extract_features(IndexFeatures(), IndexImages(0), 4, progress=False)
    with pytest.raises(ValueError, match="no label"):
        extract_features(IndexFeatures(), IndexImages(4, labelled=False), 4, progress=False)
    with pytest.raises(ValueError, match="index 5 has no label"):
        extract_features(IndexFeatures(), IndexImages(7, bad_index=5), 2, progress=False)


def _write_image_folder(root: Path, corrupt: str | None = None) -> str:
    """Two classes of three 8x8 images, each a distinct flat colour; ``corrupt`` (e.g. "a/1.png")
    is written as bytes that are not an image. Returns the dataset string."""
    from PIL import Image

    for c, name in enumerate("ab"):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i + 10, 100 * c + 20, 7 * i)).save(root / name / f"{i}.png")
    if corrupt is not None:
        (root / corrupt).write_bytes(b"not an image")
    return f"ImageFolder:root={root}"


class MeanColour(nn.Module):
    """Features: the mean of each channel (identifies the flat-coloured test images)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.mean(dim=(2, 3))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_images_are_dropped_and_counted(tmp_path, num_workers, caplog):
    """A corrupt file is replaced by the dataset's next image; its row must be left out (not kept
    as a duplicate with the neighbour's label), counted and warned about. Expected: the same
    folder without the corrupt file."""
    from dinov2.data.datasets import make_dataset
    from dinov2.data.transforms import make_classification_eval_transform

    transform = make_classification_eval_transform(8, 8)
    corrupt = make_dataset(_write_image_folder(tmp_path / "corrupt", corrupt="a/1.png"), transform=transform)
    clean_root = tmp_path / "clean"
    _write_image_folder(clean_root)
    (clean_root / "a" / "1.png").unlink()
    clean = make_dataset(f"ImageFolder:root={clean_root}", transform=transform)

    with caplog.at_level("WARNING", logger="dinov2"):
        got = extract_labelled_features(MeanColour(), corrupt, 2, num_workers=num_workers, progress=False)
    expected_features, expected_labels = extract_features(MeanColour(), clean, 2, progress=False)
    assert got.num_skipped == 1
    assert got.labels.tolist() == expected_labels.tolist() == [0, 0, 1, 1, 1]
    assert got.indices.tolist() == [0, 2, 3, 4, 5]
    torch.testing.assert_close(got.features, expected_features)
    assert any("1 of 6 images" in record.getMessage() for record in caplog.records)


def test_cached_dataset_keeps_reporting_substitutes():
    """The online k-NN cache must not hide a substituted sample on later (cached) calls."""
    cached = CachedDataset(SkippingIndexImages(6, unreadable={1, 2}), max_bytes=2**20)
    for _ in range(2):
        got = extract_labelled_features(IndexFeatures(), cached, 4, progress=False)
        assert got.num_skipped == 2
        assert got.indices.tolist() == [0, 3, 4, 5]
        torch.testing.assert_close(got.features, expected_features(6)[[0, 3, 4, 5]])


def _class_trees(root: Path, splits: dict[str, str]) -> dict[str, str]:
    """ImageFolder trees ``root/<split>/<class letter>/<i>.png`` (two flat images per class); returns
    the dataset strings."""
    from PIL import Image

    for split, classes in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (sum(map(ord, name)) % 256, 40 * i, 9)).save(root / split / name / f"{i}.png")
    return {split: f"ImageFolder:root={root / split}" for split in splits}


@pytest.mark.parametrize("entry", ["knn", "linear", "online"])
def test_val_tree_with_other_class_folders_gets_the_train_class_indices(tmp_path, entry, caplog):
    """Two ImageFolder trees index their classes by their own sorted folder names: a val tree
    without train's "a" folder used to label "b" as 0 (train's "a") and score every query against
    the wrong class. Expected labels: the index of the image's folder among train's folder names,
    val-only "z" after them."""
    import argparse

    from dinov2.eval import knn, linear

    data = _class_trees(tmp_path, {"train": "abc", "val": "bcz"})
    expected = [{"a": 0, "b": 1, "c": 2, "z": 3}[name] for name in "bcz" for _ in range(2)]
    args = argparse.Namespace(train_dataset=data["train"], val_dataset=data["val"], resize_size=8, crop_size=8,
                              batch_size=4, num_workers=0, gather_on_cpu=False, progress=False)  # fmt: skip
    with caplog.at_level("WARNING", logger="dinov2"):
        if entry == "knn":
            labels = knn.extract_train_and_val(args, MeanColour(), None, torch.device("cpu"))["val_labels"]
        elif entry == "linear":
            from dinov2.data.datasets import make_dataset

            backbone = IndexFeatures()
            backbone.get_intermediate_layers = lambda x, **_: [(x.flatten(2).transpose(1, 2), x.mean(dim=(2, 3)))]
            _, labels, _ = linear.encode_val_set(args, backbone, 1, None, make_dataset(data["train"]))
        else:
            train, val = OnlineKNN(data["train"], data["val"], resize_size=8, crop_size=8).datasets()
            labels = [val[i][1] for i in range(len(val))]
    assert list(map(int, labels)) == expected
    assert any("absent from val: ['a']" in r.getMessage() and "['z']" in r.getMessage() for r in caplog.records)


def test_val_tree_sharing_no_class_name_with_train_is_refused(tmp_path):
    """Val folders ``0 1`` against train's ``a b``: every val class used to be mapped after train's
    (indices 2 and 3, with a warning), so k-NN and logistic regression reported 0 % for a val tree
    that merely names its classes differently. It is refused, naming both sides, before extraction."""
    from dinov2.data.datasets import make_dataset
    from dinov2.eval.features import align_class_indices

    data = _class_trees(tmp_path, {"train": "ab", "val": "01"})
    train, val = make_dataset(data["train"]), make_dataset(data["val"])
    with pytest.raises(ValueError, match=r"share no name with the train dataset's \(val: 0, 1; train: a, b\)"):
        align_class_indices(train, val)
    assert val.target_transform is None and [val[i][1] for i in range(len(val))] == [0, 0, 1, 1]


def _imagenet_train(root: Path, wnids: str) -> str:
    """An ImageNet-1k train split ``root/train/<wnid>/<wnid>_<i>.JPEG`` (two images per wnid, all
    of them in ``labels.txt``) with its metadata dumped; returns its dataset string."""
    from PIL import Image

    from dinov2.data.datasets import ImageNet

    root.mkdir(parents=True)
    (root / "labels.txt").write_text("".join(f"{w},class {w}\n" for w in wnids.split()))
    for w in wnids.split():
        (root / "train" / w).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (int(w[1:]), 40 * i, 9)).save(root / "train" / w / f"{w}_{i}.JPEG")
    ImageNet(split="TRAIN", root=str(root), extra=str(root / "extra")).dump_extra()
    return f"ImageNet:split=TRAIN:root={root}:extra={root / 'extra'}"


def test_imagenet_train_and_imagefolder_val_are_matched_by_class_name(tmp_path):
    """An ImageNet train split (wnids n1 n2 n3 of labels.txt, indices 0 1 2) with an ImageFolder val
    tree of wnid folders lacking n1: the val tree numbers n2 n3 as 0 1, and because the ImageNet class
    exposed no ``classes`` the labels were kept by position (scored against n1 and n2). Expected: the
    train index of each folder's wnid; with swapped roles the val set gets train's indices too."""
    from dinov2.data.datasets import make_dataset
    from dinov2.eval.features import align_class_indices

    imagenet = make_dataset(_imagenet_train(tmp_path / "in1k", "n1 n2 n3"))
    folders = _class_trees(tmp_path / "folders", {"val": ["n2", "n3"], "train": ["n3", "n4"]})
    val = make_dataset(folders["val"])
    assert align_class_indices(imagenet, val) == {0: 1, 1: 2}
    assert [val[i][1] for i in range(len(val))] == [1, 1, 2, 2]
    train, val = make_dataset(folders["train"]), imagenet  # n3 n4 against n1 n2 n3
    assert align_class_indices(train, val) == {0: 2, 1: 3, 2: 0}  # n1, n2 (absent from train) after n4
    assert [val[i][1] for i in range(len(val))] == [2, 2, 3, 3, 0, 0]


def test_imagenet_train_and_val_folders_without_a_shared_name_are_refused(tmp_path):
    from dinov2.data.datasets import make_dataset
    from dinov2.eval.features import align_class_indices

    imagenet = make_dataset(_imagenet_train(tmp_path / "in1k", "n1 n2"))
    val = make_dataset(_class_trees(tmp_path / "folders", {"val": "01"})["val"])
    with pytest.raises(ValueError, match=r"share no name with the train dataset's \(val: 0, 1; train: n1, n2\)"):
        align_class_indices(imagenet, val)
    fixed = type("FixedLabels", (), {"classes": ["n2"]})()  # needs relabelling, has no target_transform
    with pytest.raises(ValueError, match="names other classes than the train dataset and cannot be relabelled"):
        align_class_indices(imagenet, fixed)
    assert align_class_indices(imagenet, type("Same", (), {"classes": ["n1"]})()) == {}  # n1 keeps index 0


def test_unlabelled_val_set_stops_before_any_feature_is_extracted(tmp_path):
    """A val ImageFolder without class folders (every target -1) used to be found only when its
    first batch was gathered, after the whole train set had been encoded (hours on ImageNet-22k),
    and the error did not say which dataset. Now it stops before the first forward, naming it."""
    import argparse

    from PIL import Image

    from dinov2.eval import knn

    data = _class_trees(tmp_path, {"train": "ab"})
    (tmp_path / "flat").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(tmp_path / "flat" / f"{i}.png")
    args = argparse.Namespace(train_dataset=data["train"], val_dataset=f"ImageFolder:root={tmp_path / 'flat'}",
                              resize_size=8, crop_size=8, batch_size=4, num_workers=0, gather_on_cpu=False,
                              progress=False)  # fmt: skip
    model = IndexFeatures()
    with pytest.raises(ValueError, match=r"val dataset .*flat.* has 3 unlabelled samples .*index 0"):
        knn.extract_train_and_val(args, model, None, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"online k-NN val_dataset .*flat.* has 3 unlabelled samples"):
        OnlineKNN(args.train_dataset, args.val_dataset, resize_size=8, crop_size=8)(model, torch.device("cpu"))
    assert model.modes_seen == []


def _knn_problem():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(40, 6, generator=gen), torch.randint(0, 5, (40,), generator=gen), \
        torch.randn(ODD_SIZE + 4, 6, generator=gen), torch.randint(0, 5, (ODD_SIZE + 4,), generator=gen)  # fmt: skip


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for batch_size in (1, 3):
            for on_cpu in (False, True):
                feats, labels = extract_features(
                    IndexFeatures(), IndexImages(ODD_SIZE), batch_size, gather_on_cpu=on_cpu, progress=False
                )
                out[f"features_{batch_size}_{on_cpu}"], out[f"labels_{batch_size}_{on_cpu}"] = feats, labels
        skipping = extract_labelled_features(IndexFeatures(), SkippingIndexImages(ODD_SIZE, {2, 3, 6}), 2,
                                             progress=False)  # fmt: skip
        out["skipping"] = (skipping.features, skipping.labels, skipping.num_skipped)
        out["knn"] = knn_classify(*_knn_problem(), nb_knn=(1, 4, 10), shard_queries=True)
        out["knn_train"] = knn_classify(*_knn_problem(), nb_knn=(1, 4, 10, 40), shard_train=True)
        out["knn_train_faiss"] = knn_classify(*_knn_problem(), nb_knn=(1, 4, 10), shard_train=True, backend="faiss")
        train_x, train_y, test_x, test_y = _knn_problem()  # one training row: rank 1 holds none
        out["knn_train_one"] = knn_classify(train_x[:1], train_y[:1], test_x, test_y, nb_knn=(1, 3), shard_train=True)
        from eval_micro import micro_vit

        torch.manual_seed(0)
        out["online"] = OnlineKNN(*SYNTHETIC, resize_size=32, crop_size=32, batch_size=4)(
            micro_vit(), torch.device("cpu")
        )
        from test_eval_invariance import two_rank_results

        out["invariance"] = two_rank_results()
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_features")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.distributed
def test_two_ranks_gather_features_in_dataset_order_without_padding(two_ranks):
    for result in two_ranks:
        for batch_size in (1, 3):
            for on_cpu in (False, True):
                torch.testing.assert_close(result[f"features_{batch_size}_{on_cpu}"], expected_features(ODD_SIZE))
                assert result[f"labels_{batch_size}_{on_cpu}"].tolist() == [i % 3 for i in range(ODD_SIZE)]


@pytest.mark.distributed
def test_two_ranks_drop_and_count_unreadable_images_of_every_rank(two_ranks):
    """Indices 2, 3 (rank 0's block) and 6 (rank 1's, next to the padding) are unreadable."""
    kept = [0, 1, 4, 5]
    for features, labels, num_skipped in (r["skipping"] for r in two_ranks):
        assert num_skipped == 3
        assert labels.tolist() == [i % 3 for i in kept]
        torch.testing.assert_close(features, expected_features(ODD_SIZE)[kept])


@pytest.mark.distributed
def test_two_ranks_sharded_knn_equals_one_process(two_ranks):
    expected = knn_classify(*_knn_problem(), nb_knn=(1, 4, 10))
    assert [r["knn"] for r in two_ranks] == [expected, expected]


@pytest.mark.distributed
def test_two_ranks_with_sharded_training_features_equal_one_process(two_ranks):
    """Each rank searches its half of the training features; the merged neighbours give the
    single-process result (also with faiss, and when one rank holds no training row)."""
    problem = _knn_problem()
    expected = knn_classify(*problem, nb_knn=(1, 4, 10, 40))
    assert [r["knn_train"] for r in two_ranks] == [expected, expected]
    expected_faiss = knn_classify(*problem, nb_knn=(1, 4, 10), backend="faiss")
    assert [r["knn_train_faiss"] for r in two_ranks] == [expected_faiss, expected_faiss]
    train_x, train_y, test_x, test_y = problem
    one = knn_classify(train_x[:1], train_y[:1], test_x, test_y, nb_knn=(1, 3))
    assert [r["knn_train_one"] for r in two_ranks] == [one, one]


@pytest.mark.distributed
def test_two_ranks_online_knn_equals_one_process(two_ranks):
    from eval_micro import micro_vit

    torch.manual_seed(0)
    expected = OnlineKNN(*SYNTHETIC, resize_size=32, crop_size=32, batch_size=4)(micro_vit(), torch.device("cpu"))
    assert [r["online"] for r in two_ranks] == [expected, expected]


@pytest.mark.distributed
@pytest.mark.parametrize(
    "check",
    [
        "check_two_ranks_give_the_features_of_one_process_for_every_batch_size",
        "check_two_ranks_break_knn_ties_as_one_process",
        "check_two_ranks_choose_the_same_c_and_accuracy_as_one_process",
    ],
)
def test_two_ranks_are_invariant_as_one_process(two_ranks, check, one_thread):
    """The invariance checks of test_eval_invariance.py that need two ranks (they share this spawn)."""
    import test_eval_invariance

    getattr(test_eval_invariance, check)([r["invariance"] for r in two_ranks])
