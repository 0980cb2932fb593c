"""Weighted k-NN against a brute-force reference written with Python loops."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from dinov2.eval.knn import class_balanced_subset, few_shot_knn, knn_classify


def brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes):
    """Top-1/top-5 (%) by explicit loops: cosine similarities, sorted neighbours, exp(sim/T) votes,
    correct when the true class got a vote and fewer than 1 (resp. 5) classes got more votes or the
    same votes with a lower class index."""
    train = [[float(v) for v in row] for row in train_x]
    hits1 = hits5 = 0
    for query, label in zip(test_x.tolist(), test_y.tolist()):
        sims = []
        for j, row in enumerate(train):
            dot = sum(a * b for a, b in zip(query, row))
            norm = math.sqrt(sum(a * a for a in query)) * math.sqrt(sum(b * b for b in row))
            sims.append((dot / norm, j))
        sims.sort(reverse=True)
        votes = [0.0] * num_classes
        for sim, j in sims[: min(k, len(train))]:
            votes[int(train_y[j])] += math.exp(sim / temperature)
        higher = sum(v > votes[label] or (v == votes[label] and c < label) for c, v in enumerate(votes))
        hits1 += votes[label] > 0 and higher < 1
        hits5 += votes[label] > 0 and higher < 5
    n = len(test_y)
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n}


def random_problem(seed, n_train=60, n_test=25, dim=8, num_classes=7, spread=1.0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen)
    train_y = torch.randint(0, num_classes, (n_train,), generator=gen)
    test_y = torch.randint(0, num_classes, (n_test,), generator=gen)
    train_x = centres[train_y] + spread * torch.randn(n_train, dim, generator=gen)
    test_x = centres[test_y] + spread * torch.randn(n_test, dim, generator=gen)
    return train_x, train_y, test_x, test_y


@pytest.mark.parametrize("num_classes", [3, 7])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_matches_brute_force(num_classes, temperature):
    train_x, train_y, test_x, test_y = random_problem(num_classes, num_classes=num_classes)
    nb_knn = (1, 5, 20, 60)
    got = knn_classify(train_x, train_y, test_x, test_y, nb_knn=nb_knn, temperature=temperature,
                       num_classes=num_classes)  # fmt: skip
    assert list(got) == list(nb_knn)
    for k in nb_knn:
        expected = brute_force_knn(train_x, train_y, test_x, test_y, k, temperature, num_classes)
        assert got[k]["top1"] == pytest.approx(expected["top1"])
        assert got[k]["top5"] == pytest.approx(expected["top5"])
    # the data are noisy enough that k matters and top-5 differs from top-1 somewhere
    assert len({got[k]["top1"] for k in nb_knn}) > 1
    assert any(got[k]["top5"] > got[k]["top1"] for k in nb_knn)
    if num_classes < 5:  # fewer than 5 classes: top-5 counts every query whose class got a vote
        assert got[60]["top5"] == 100.0


def test_k_larger_than_train_set_is_clipped():
    train_x, train_y, test_x, test_y = random_problem(1, n_train=12)
    got = knn_classify(train_x, train_y, test_x, test_y, nb_knn=(12, 500))
    assert got[500] == got[12]


def test_separable_clusters_are_classified_perfectly():
    train_x, train_y, test_x, test_y = random_problem(2, n_train=200, n_test=100, dim=16, num_classes=10, spread=0.01)
    got = knn_classify(train_x, train_y, test_x, test_y, nb_knn=(1, 10, 20))
    assert all(r["top1"] == 100.0 and r["top5"] == 100.0 for r in got.values())


def test_scale_of_features_does_not_matter():
    train_x, train_y, test_x, test_y = random_problem(3)
    scale = torch.rand(len(train_x), 1) * 10 + 0.1
    assert knn_classify(train_x * scale, train_y, test_x * 3, test_y, nb_knn=(5,)) == knn_classify(
        train_x, train_y, test_x, test_y, nb_knn=(5,)
    )


def test_chunked_equals_unchunked():
    train_x, train_y, test_x, test_y = random_problem(4, n_test=50)
    whole = knn_classify(train_x, train_y, test_x, test_y, nb_knn=(3, 10), chunk_size=1000)
    for chunk in (1, 7, 50):
        assert knn_classify(train_x, train_y, test_x, test_y, nb_knn=(3, 10), chunk_size=chunk) == whole


@pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss not installed")
def test_faiss_backend_equals_torch_backend():
    train_x, train_y, test_x, test_y = random_problem(5, n_train=300, n_test=80, num_classes=9)
    torch_result = knn_classify(train_x, train_y, test_x, test_y, nb_knn=(1, 10, 50), chunk_size=32)
    faiss_result = knn_classify(train_x, train_y, test_x, test_y, nb_knn=(1, 10, 50), chunk_size=32, backend="faiss")
    assert faiss_result == torch_result


def test_shard_queries_on_one_process_is_the_plain_result():
    train_x, train_y, test_x, test_y = random_problem(6)
    assert knn_classify(train_x, train_y, test_x, test_y, shard_queries=True) == knn_classify(
        train_x, train_y, test_x, test_y
    )


def test_bad_arguments_are_rejected():
    train_x, train_y, test_x, test_y = random_problem(7)
    with pytest.raises(ValueError, match="backend"):
        knn_classify(train_x, train_y, test_x, test_y, backend="annoy")
    with pytest.raises(ValueError, match="nb_knn"):
        knn_classify(train_x, train_y, test_x, test_y, nb_knn=(0,))
    with pytest.raises(ValueError, match="at least one"):
        knn_classify(train_x[:0], train_y[:0], test_x, test_y)
    for chunk_size in (0, -4):  # -4 used to skip every query and report 0 %
        with pytest.raises(ValueError, match="chunk_size"):
            knn_classify(train_x, train_y, test_x, test_y, chunk_size=chunk_size)


def test_small_temperature_does_not_overflow_the_votes():
    """With T = 0.01, exp(sim / T) exceeds float32 for similarities near 1. The 15 class-0
    neighbours are each closer to every query than the 5 of class 1, so with k = 20 class 0 gets
    more and larger votes and must win at any temperature."""
    gen = torch.Generator().manual_seed(0)
    centre = torch.randn(16, generator=gen)
    train_x = torch.cat(
        [centre + 0.01 * torch.randn(15, 16, generator=gen), centre + 0.3 * torch.randn(5, 16, generator=gen)]
    )
    train_y = torch.tensor([0] * 15 + [1] * 5)
    queries = centre + 0.01 * torch.randn(30, 16, generator=gen)
    sims = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(train_x, dim=1).T
    assert float(sims.max()) / 0.01 > 88.8  # exp of this overflows float32
    assert float(sims[:, :15].min()) > float(sims[:, 15:].max())
    for label, expected in ((0, 100.0), (1, 0.0)):
        got = knn_classify(train_x, train_y, queries, torch.full((30,), label), nb_knn=(20,), temperature=0.01)
        assert got[20]["top1"] == expected


def test_similarities_are_computed_without_tf32(monkeypatch):
    """TF32 (allowed for feature extraction on CUDA) is off for the k-NN arithmetic and back on after."""
    import dinov2.eval.knn as knn

    seen, search = [], knn._torch_neighbours

    def recording(*args):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return search(*args)

    monkeypatch.setattr(knn, "_torch_neighbours", recording)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        knn_classify(*random_problem(0), nb_knn=(3,), chunk_size=10)
        assert seen == [False, False, False] and torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_class_balanced_subset_takes_n_random_rows_of_every_class():
    labels = torch.tensor([2, 0, 2, 1, 2, 0, 2, 2, 0, 1, 0, 4])  # class 3 absent, class 4 has one row
    for seed in range(3):
        rows = class_balanced_subset(labels, 2, seed)
        assert rows.tolist() == sorted(set(rows.tolist()))  # sorted, no repeats
        assert torch.bincount(labels[rows], minlength=5).tolist() == [2, 2, 2, 0, 1]
    assert class_balanced_subset(labels, 2, 0).equal(class_balanced_subset(labels, 2, 0))
    draws = {tuple(class_balanced_subset(labels, 2, seed).tolist()) for seed in range(10)}
    assert len(draws) > 1  # the seed changes the draw
    assert class_balanced_subset(labels, 100, 0).tolist() == list(range(len(labels)))
    with pytest.raises(ValueError, match="n_per_class"):
        class_balanced_subset(labels, 0)


def test_few_shot_knn_is_the_mean_over_tries_of_knn_on_the_subsets():
    train_x, train_y, test_x, test_y = random_problem(8, n_train=80, n_test=30, num_classes=5)
    got = few_shot_knn(train_x, train_y, test_x, test_y, n_per_class=3, n_tries=2, nb_knn=(1, 2, 10),
                       temperature=0.1, num_classes=5)  # fmt: skip
    assert list(got) == [1, 2, 3]  # the k up to n_per_class, and n_per_class itself
    for k in got:
        tries = []
        for seed in (0, 1):
            rows = class_balanced_subset(train_y, 3, seed)
            tries.append(brute_force_knn(train_x[rows], train_y[rows], test_x, test_y, k, 0.1, 5))
        for metric in ("top1", "top5"):
            assert got[k][metric] == pytest.approx(sum(t[metric] for t in tries) / 2)
    with pytest.raises(ValueError, match="n_tries"):
        few_shot_knn(train_x, train_y, test_x, test_y, n_per_class=3, n_tries=0)
