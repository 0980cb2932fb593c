"""Invariances of the evaluation: results do not depend on batch size, loader workers, world size, the
order of tied neighbours, or (for normal images) on the banner guard of the eval transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from dinov2.data.transforms import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ToRGB, centre_to_aspect
from dinov2.data.transforms import make_classification_eval_transform as eval_transform
from dinov2.eval.features import extract_features
from dinov2.eval.knn import knn_classify
from dinov2.eval.log_regression import evaluate_log_regression

ODD = 7  # images over 2 ranks: rank 1's block ends with a padding sample
BATCHES = (1, 7, 64)
C_VALUES = (1e-4, 1e-2, 1.0, 100.0)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _plain_eval_transform(resize_size: int, crop_size: int) -> T.Compose:
    """The eval transform as it was before the banner guard: resize the shorter side, centre crop."""
    return T.Compose([
        ToRGB(), T.Resize(resize_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(crop_size), T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])  # fmt: skip


# The eval transform's banner guard ----------------------------------------------------------------


@pytest.mark.parametrize("size", [(40, 30), (30, 40), (64, 8), (8, 64), (33, 33)])
def test_eval_transform_of_an_image_up_to_8_to_1_is_bit_identical_to_the_plain_resize_and_crop(size):
    image = _image(*size)
    assert torch.equal(eval_transform(24, 16)(image), _plain_eval_transform(24, 16)(image))


@pytest.mark.parametrize(("size", "box"), [((4000, 2), (1992, 0, 2008, 2)), ((2, 4001), (0, 1992, 2, 2009))])
def test_a_banner_is_cut_to_its_8_to_1_centre_before_the_resize(size, box, monkeypatch):
    """A 4000 x 2 banner was resized whole (Resize(256): 512,000 x 256 pixels) before the centre crop.
    Now only its centre (16 x 2; 17 pixels with an odd difference, the same cut from both ends) reaches
    the resize, and the output is the plain transform of that centre."""
    image = _image(*size)
    resized, forward = [], T.Resize.forward
    monkeypatch.setattr(T.Resize, "forward", lambda self, img: resized.append(img.size) or forward(self, img))
    got = eval_transform(24, 16)(image)
    centre = image.crop(box)  # golden: left/top = (4000 - 16) / 2 = 1992 and (4001 - 17) / 2 = 1992
    assert resized == [centre.size] and max(centre.size) <= 8 * min(centre.size) + 1
    assert torch.equal(got, _plain_eval_transform(24, 16)(centre))
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) tensors are cut the same way
    top, left = box[1], box[0]
    expected = tensor[:, top : box[3], left : box[2]]
    assert torch.equal(centre_to_aspect(tensor), expected)


def test_centre_to_aspect_leaves_images_within_the_ratio_untouched_and_rejects_a_ratio_below_one():
    image = _image(80, 10)
    assert centre_to_aspect(image) is image and centre_to_aspect(image, 2).size == (20, 10)
    with pytest.raises(ValueError, match="max_aspect"):
        centre_to_aspect(image, 0)


# k-NN with exact ties -----------------------------------------------------------------------------


def _tie_problem():
    """40 training rows, all the same vector (exact ties), labels 0 for rows 0-9 and 1 for the rest, plus
    row 40 (label 2) farther away; queries: that vector, label 0. The 10 nearest by (similarity, index)
    are rows 0-9 (all label 0); ``topk`` alone may return any 10 of the 40 tied rows."""
    train = torch.zeros(41, 4)
    train[:40, 0] = 1.0
    train[40] = torch.tensor([1.0, 1.0, 0.0, 0.0])
    labels = torch.tensor([0] * 10 + [1] * 30 + [2])
    queries = torch.tensor([[1.0, 0.0, 0.0, 0.0]] * 3)
    return train, labels, queries, torch.zeros(3, dtype=torch.long)


def _reference_knn(train, train_labels, test, test_labels, ks, temperature, num_classes):
    """Brute force in float64 from the definition: the k most similar rows, ties to the lower index."""
    train, test = F.normalize(train.double(), dim=1), F.normalize(test.double(), dim=1)
    out = {}
    for k in ks:
        top1 = 0
        for q in range(len(test)):
            sims = (train @ test[q]).tolist()
            nearest = sorted(range(len(train)), key=lambda j: (-sims[j], j))[:k]
            votes = [0.0] * num_classes
            for j in nearest:
                votes[int(train_labels[j])] += float(np.exp(sims[j] / temperature))
            top1 += int(max(range(num_classes), key=lambda c: (votes[c], -c)) == int(test_labels[q]))
        out[k] = 100.0 * top1 / len(test)
    return out


def test_tied_neighbours_at_the_k_th_place_go_to_the_lower_index_with_either_backend():
    problem = _tie_problem()
    expected = _reference_knn(*problem, (1, 10, 30), 0.07, 3)
    assert expected == {1: 100.0, 10: 100.0, 30: 0.0}  # 10 rows of label 0, then 20 of label 1
    for chunk_size in (1, 256):
        got = knn_classify(*problem, nb_knn=(1, 10, 30), num_classes=3, chunk_size=chunk_size)
        assert {k: r["top1"] for k, r in got.items()} == expected
    pytest.importorskip("faiss")  # the torch backend above is the real check; faiss must agree with it
    got = knn_classify(*problem, nb_knn=(1, 10, 30), num_classes=3, backend="faiss")
    assert {k: r["top1"] for k, r in got.items()} == expected


def test_knn_does_not_depend_on_the_training_order_without_ties():
    gen = torch.Generator().manual_seed(3)
    train, labels = torch.randn(60, 8, generator=gen), torch.randint(0, 4, (60,), generator=gen)
    test, test_labels = torch.randn(13, 8, generator=gen), torch.randint(0, 4, (13,), generator=gen)
    expected = knn_classify(train, labels, test, test_labels, nb_knn=(1, 5, 20), num_classes=4)
    order = torch.randperm(60, generator=gen)
    assert knn_classify(train[order], labels[order], test, test_labels, nb_knn=(1, 5, 20), num_classes=4) == expected
    reference = _reference_knn(train, labels, test, test_labels, (1, 5, 20), 0.07, 4)
    assert {k: r["top1"] for k, r in expected.items()} == pytest.approx(reference)


# Feature extraction and probes: batch size, workers, world size ---------------------------------------


def _micro_features(batch_size: int, num_workers: int = 0) -> torch.Tensor:
    from eval_micro import micro_vit

    from dinov2.eval.features import make_eval_dataset

    torch.manual_seed(0)
    model = micro_vit()
    dataset = make_eval_dataset(f"Synthetic:split=VAL:num_images={ODD}:image_size=32", eval_transform(32, 32))
    features, labels = extract_features(model, dataset, batch_size, num_workers, progress=False)
    return features, labels


def _log_regression_problem():
    """3 overlapping classes: the held-out accuracy differs between the C values (0.01 is the best)."""
    gen = torch.Generator().manual_seed(5)
    centres = torch.randn(3, 6, generator=gen)
    train_labels, val_labels = torch.arange(60) % 3, torch.arange(15) % 3
    train = centres[train_labels] + torch.randn(60, 6, generator=gen)
    val = centres[val_labels] + torch.randn(15, 6, generator=gen)
    return train, train_labels, val, val_labels


def _log_regression():
    return evaluate_log_regression(*_log_regression_problem(), c_values=C_VALUES, max_iter=200, holdout_fraction=0.25)


def two_rank_results() -> dict:
    """What each of two gloo ranks computes (called from the 2-rank worker of test_feature_extraction.py, so
    that one spawn serves both files); checked against one process by the ``check_two_ranks_*`` functions."""
    out = {f"features_{b}": _micro_features(b) for b in BATCHES}
    out["features_workers"] = _micro_features(3, num_workers=2)
    out["knn_ties"] = knn_classify(*_tie_problem(), nb_knn=(1, 10, 30), num_classes=3, shard_train=True)
    out["knn_ties_queries"] = knn_classify(*_tie_problem(), nb_knn=(1, 10, 30), num_classes=3, shard_queries=True)
    out["log_regression"] = _log_regression()
    return out


def test_features_do_not_depend_on_batch_size_or_loader_workers(one_thread):
    """Row i is image i's features whatever the batch size (1, 7, 64 for 7 images) or worker count, up to
    float32 rounding of the batched matmuls (atol 1e-5 on entries up to ~2.3; bit-identical here on one CPU
    thread, but other kernels may round a batch of 1 differently from a batch of 64)."""
    reference, labels = _micro_features(64)
    assert reference.shape[0] == ODD and labels.tolist() == [int(t) for t in _synthetic_labels()]
    for batch_size, workers in ((1, 0), (7, 0), (3, 2)):
        features, got_labels = _micro_features(batch_size, workers)
        torch.testing.assert_close(features, reference, rtol=0, atol=1e-5)
        assert torch.equal(got_labels, labels)


def _synthetic_labels():
    from dinov2.data.datasets import make_dataset

    dataset = make_dataset(f"Synthetic:split=VAL:num_images={ODD}:image_size=32")
    return [dataset[i][1] for i in range(ODD)]


def check_two_ranks_give_the_features_of_one_process_for_every_batch_size(results: list[dict]) -> None:
    """7 images over 2 ranks (4 + 3, one padding sample): every image once, in dataset order, for batch
    sizes 1, 7, 64 and with 2 loader workers."""
    reference, labels = _micro_features(64)
    for result in results:
        for key in [f"features_{b}" for b in BATCHES] + ["features_workers"]:
            features, got_labels = result[key]
            assert features.shape == reference.shape and torch.equal(got_labels, labels)
            torch.testing.assert_close(features, reference, rtol=0, atol=1e-5)


def check_two_ranks_break_knn_ties_as_one_process(results: list[dict]) -> None:
    """Rank 0 holds rows 0-20, rank 1 rows 21-40: the merged neighbours are the lowest-indexed tied rows,
    as on one process (the merge kept rank 1's tied rows in place of rank 0's before)."""
    expected = knn_classify(*_tie_problem(), nb_knn=(1, 10, 30), num_classes=3)
    assert {k: r["top1"] for k, r in expected.items()} == {1: 100.0, 10: 100.0, 30: 0.0}
    for result in results:
        assert result["knn_ties"] == expected and result["knn_ties_queries"] == expected


def check_two_ranks_choose_the_same_c_and_accuracy_as_one_process(results: list[dict]) -> None:
    """The C sweep is split over ranks (each warm-starts from its own previous C): the held-out accuracies,
    the chosen C and the val accuracy are those of one process."""
    expected = _log_regression()
    assert expected["best_c"] == 1e-2 and len(set(expected["holdout_top1"].values())) > 1  # C matters here
    for result in results:
        got = dict(result["log_regression"])
        assert got.pop("holdout_top1") == pytest.approx(expected["holdout_top1"])
        assert got == pytest.approx({k: v for k, v in expected.items() if k != "holdout_top1"})
