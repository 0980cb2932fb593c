"""Behaviour of the evaluation code that a mutation audit found unpinned by the other tests.

Every expected value comes from a hand computation in the test (a formula, a naive loop, a
reference SGD written here), never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from dinov2 import distributed
from dinov2.eval import linear
from dinov2.eval import linear_heads as core
from dinov2.eval.features import align_class_indices, class_names_of
from dinov2.eval.knn import knn_classify
from dinov2.eval.log_regression import evaluate_log_regression, val_accuracies
from dinov2.eval.online import CachedDataset, OnlineKNN

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread


def _unit(angle_degrees: float) -> list[float]:
    angle = math.radians(angle_degrees)
    return [math.cos(angle), math.sin(angle)]


# --- k-NN votes --------------------------------------------------------------------------------


def test_votes_that_would_overflow_keep_their_ranking_at_a_small_temperature():
    """T = 0.01. The query (label 1) has two class-1 neighbours at similarity 1, one of class 0 at
    0.95 and one of class 2 at -1. By hand: class 1 scores 2 exp(1/T), class 0 exp(0.95/T), i.e.
    class 1 wins by a factor 2 exp(5). Shifting by anything but the top similarity (e.g. the lowest,
    -1) sends exp(1.95/T) and exp(2/T) to inf in float32, a tie that class 0 (lower index) wins."""
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.95, math.sqrt(1 - 0.95**2)], [-1.0, 0.0]])
    train_labels = torch.tensor([1, 1, 0, 2])
    query, label = torch.tensor([[1.0, 0.0]]), torch.tensor([1])
    got = knn_classify(train, train_labels, query, label, nb_knn=(4,), temperature=0.01, num_classes=3)
    assert got[4] == {"top1": 100.0, "top5": 100.0}


def test_a_vote_that_underflows_float32_still_counts_as_a_vote():
    """T = 0.01, k = 2: the query's neighbours are class 0 at similarity 1 and class 1 at -1. Class 1's
    weight exp(-2/T) = exp(-200) is positive (below float32's range, but a vote): a class-1 query
    is a top-5 hit (2nd place), a class-2 query (no vote) never is."""
    train, train_labels = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([0, 1])
    query = torch.tensor([[1.0, 0.0]])
    for label, expected in ((0, {"top1": 100.0, "top5": 100.0}), (1, {"top1": 0.0, "top5": 100.0}),
                            (2, {"top1": 0.0, "top5": 0.0})):  # fmt: skip
        got = knn_classify(train, train_labels, query, torch.tensor([label]), nb_knn=(2,), temperature=0.01,
                           num_classes=3)  # fmt: skip
        assert got[2] == expected, label


def test_a_query_of_a_class_the_training_set_lacks_is_a_miss_without_num_classes():
    """``num_classes`` left to the default (as the online k-NN does): a query labelled 5 while the
    training labels stop at 2 (a val-only class, indexed after train's) is counted as a miss, not an
    error. By hand: the other two queries sit on their own class's training points."""
    train = torch.tensor([_unit(0), _unit(120), _unit(240)])
    train_labels = torch.tensor([0, 1, 2])
    queries = torch.tensor([_unit(2), _unit(118), _unit(60)])
    got = knn_classify(train, train_labels, queries, torch.tensor([0, 1, 5]), nb_knn=(1,))
    assert got[1]["top1"] == pytest.approx(200.0 / 3)
    assert got[1]["top5"] == pytest.approx(200.0 / 3)  # class 5 got no vote: never among the top 5


def test_sixty_four_equally_similar_training_rows_are_taken_in_index_order():
    """Every training row is the same point, so for any query all 64 tie: k = 2 takes rows 0 and 1,
    k = 3 rows 0 to 2, not whichever ``topk`` returns (on the CPU, rows in the middle of the block).
    Rows 0, 1 are class 0, row 2 class 2, the rest class 1: by hand, k = 2 votes 2 x class 0, and
    k = 3 ranks class 0 (2 votes), class 2 (1), class 1 (0, never predicted)."""
    train, train_labels = torch.ones(64, 3), torch.tensor([0, 0, 2] + [1] * 61)
    queries = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]])
    for label, top1, top5 in ((0, 100.0, 100.0), (1, 0.0, 0.0), (2, 0.0, 100.0)):
        got = knn_classify(train, train_labels, queries, torch.full((2,), label), nb_knn=(2, 3), num_classes=3)
        assert got[2] == {"top1": top1, "top5": top1}, label
        assert got[3] == {"top1": top1, "top5": top5}, label


# --- class names ---------------------------------------------------------------------------------


class _NamedByClassId(Dataset):
    """ImageNet-like: no ``classes`` list; class names from ``get_class_id`` of a sample of each class."""

    def __init__(self, targets, ids):
        self.targets, self.ids, self.target_transform = list(targets), list(ids), None

    def __len__(self):
        return len(self.targets)

    def get_targets(self):
        return self.targets

    def get_class_id(self, index):
        return self.ids[index]


class _NamedByFolders(_NamedByClassId):
    def __init__(self, targets, classes):
        super().__init__(targets, [classes[t] for t in targets])
        self.classes = list(classes)


def test_class_names_from_class_ids_include_class_zero():
    dataset = _NamedByClassId([1, 0, 2, 0], ["n02", "n01", "n03", "n01"])
    assert class_names_of(dataset) == ["n01", "n02", "n03"]


def test_a_val_tree_without_a_train_class_is_relabelled_by_name_including_class_zero():
    """Train (by class id) has n01, n02, n03 as 0, 1, 2; the val tree lacks n02, so its folders n01,
    n03 are indices 0, 1: only val's 1 must become 2 (n01 keeps 0)."""
    train = _NamedByClassId([0, 1, 2], ["n01", "n02", "n03"])
    val = _NamedByFolders([0, 1], ["n01", "n03"])
    assert align_class_indices(train, val) == {1: 2}
    assert [val.target_transform(t) for t in (0, 1)] == [0, 2]


# --- linear probe: initialisation, optimiser, schedule ------------------------------------------


def test_classifiers_start_at_normal_std_0_01_and_zero_bias():
    heads, _ = core.build_heads(64, 100, [0.1, 0.2], n_last_blocks=(1,), avgpool=(False,))
    first, second = heads.values()
    weight = first.linear.weight.detach()
    assert weight.shape == (100, 64)
    assert abs(float(weight.mean())) < 0.0005  # 6400 draws: standard error 0.01 / 80
    assert float(weight.std()) == pytest.approx(0.01, rel=0.05)
    assert torch.equal(first.linear.bias, torch.zeros(100))
    assert torch.equal(second.linear.weight, first.linear.weight)  # same (n_blocks, avgpool): same start


def _reference_sgd(weight, bias, batches, lr, max_iter, momentum=0.9):
    """SGD with momentum (PyTorch's form: buf = g, then buf = m buf + g), no weight decay, learning
    rate lr * (1 + cos(pi t / max_iter)) / 2 at step t, on the mean cross-entropy, gradients by hand
    (softmax - one-hot), in float64."""
    w, b = weight.double().clone(), bias.double().clone()
    buf_w = buf_b = None
    for t, (x, y) in enumerate(batches):
        x = x.double()
        logits = x @ w.T + b
        p = torch.softmax(logits, dim=1)
        g = (p - nn.functional.one_hot(y, w.shape[0]).double()) / x.shape[0]
        grad_w, grad_b = g.T @ x, g.sum(dim=0)
        buf_w = grad_w if buf_w is None else momentum * buf_w + grad_w
        buf_b = grad_b if buf_b is None else momentum * buf_b + grad_b
        step_lr = lr * 0.5 * (1.0 + math.cos(math.pi * t / max_iter))
        w, b = w - step_lr * buf_w, b - step_lr * buf_b
    assert t == max_iter - 1
    return w, b


def test_each_classifier_follows_plain_sgd_with_momentum_and_the_cosine_schedule():
    """A grid of four classifiers trained together equals, classifier by classifier, a hand-written
    SGD on its own loss alone (its slots of the packed features): the summed loss gives each exactly
    its own gradient, momentum 0.9, cosine factor 1 at the first step."""
    gen = torch.Generator().manual_seed(0)
    dim, classes, batch, max_iter = 6, 3, 8, 5
    batches = [(torch.randn(batch, 2, dim, generator=gen), torch.randint(0, classes, (batch,), generator=gen))
               for _ in range(max_iter)]  # fmt: skip
    lrs = [0.8, 0.3]
    heads, base_lrs = core.build_heads(dim, classes, lrs, n_last_blocks=(1,), avgpool=(False, True))
    start = {name: (h.linear.weight.detach().clone(), h.linear.bias.detach().clone()) for name, h in heads.items()}
    core.train_heads(heads, core.make_optimizer(heads, base_lrs), iter(batches), max_iter)
    for name, head in heads.items():
        slots = 2 if head.use_avgpool else 1
        inputs = [(packed[:, :slots].reshape(batch, -1), labels) for packed, labels in batches]
        w, b = _reference_sgd(*start[name], inputs, base_lrs[name], max_iter)
        assert not torch.allclose(w.float(), start[name][0], atol=1e-3), name  # it did move
        torch.testing.assert_close(head.linear.weight.detach().double(), w, rtol=0, atol=2e-5)
        torch.testing.assert_close(head.linear.bias.detach().double(), b, rtol=0, atol=2e-5)


def test_mean_per_class_averages_only_the_classes_present_in_the_val_set():
    """Five classes, val labels only in 0, 1, 3. A classifier whose weights are zero and whose bias
    favours class 1 predicts 1 for everyone: per class (present) 0 %, 100 %, 0 %, mean 33.3 %
    (averaging over all five classes would give 20 %)."""
    heads, _ = core.build_heads(4, 5, [0.1], n_last_blocks=(1,), avgpool=(False,))
    (head,) = heads.values()
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    labels = torch.tensor([0, 0, 1, 3, 3, 3])
    (result,) = core.evaluate_heads(heads, torch.randn(6, 2, 4), labels, num_classes=5).values()
    assert result["top1"] == pytest.approx(100.0 / 6)
    assert result["mean_per_class"] == pytest.approx(100.0 / 3)


def test_a_checkpoint_of_the_same_classifiers_in_another_order_is_refused(tmp_path):
    """--learning-rates 0.1 0.2 then 0.2 0.1: the same classifier names and shapes, but the optimiser's
    parameter groups (learning rates, momentum) are matched by position, so loading would swap the
    learning rates of the classifiers. The checkpoint must be refused."""
    heads, lrs = core.build_heads(4, 3, [0.1, 0.2], n_last_blocks=(1,), avgpool=(False,))
    torch.save(core.checkpoint_state(heads, core.make_optimizer(heads, lrs), 7), tmp_path / "c.pth")
    other, other_lrs = core.build_heads(4, 3, [0.2, 0.1], n_last_blocks=(1,), avgpool=(False,))
    with pytest.raises(ValueError, match="classifiers"):
        core.load_checkpoint(tmp_path / "c.pth", other, core.make_optimizer(other, other_lrs))
    same, same_lrs = core.build_heads(4, 3, [0.1, 0.2], n_last_blocks=(1,), avgpool=(False,))
    assert core.load_checkpoint(tmp_path / "c.pth", same, core.make_optimizer(same, same_lrs))["iteration"] == 7


def test_a_backbone_whose_weights_differ_by_a_tenth_of_a_percent_is_another_backbone():
    """Ten weights at 1, then one of them at 1.01: the sums move by 1e-3 relative, far above float32
    rounding, so a linear checkpoint trained on the first must not resume on the second."""
    a, b = nn.Linear(10, 1, bias=False), nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(1.0)
        b.weight[0, 0] = 1.01
    assert linear._same_backbone(linear.backbone_fingerprint(a), linear.backbone_fingerprint(a))
    assert not linear._same_backbone(linear.backbone_fingerprint(a), linear.backbone_fingerprint(b))


def test_the_best_classifier_on_a_tie_is_the_first_in_grid_order():
    results = {name: {"top1": top1} for name, top1 in (("a", 50.0), ("b", 70.0), ("c", 70.0), ("d", 10.0))}
    assert core.best_classifier(results) == "b"


class _FakeBackbone(nn.Module):
    def __init__(self, n_blocks=2, embed_dim=4):
        super().__init__()
        self.n_blocks, self.embed_dim = n_blocks, embed_dim
        self.weight = nn.Parameter(torch.zeros(1))


def test_learning_rates_scale_with_the_global_batch_of_all_ranks(monkeypatch):
    """lr = base lr x (batch per process x processes) / 256: with 2 processes of 32, x 0.25."""
    args = linear.get_args_parser().parse_args(["--batch-size", "32", "--learning-rates", "0.1", "0.4",
                                                "--n-last-blocks", "1"])  # fmt: skip
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    _, optimizer, base_lrs, lrs = linear._grid(args, _FakeBackbone(), 5)
    assert sorted(base_lrs.values()) == [0.1, 0.1, 0.4, 0.4]
    for name, base in base_lrs.items():
        assert lrs[name] == pytest.approx(base * 64 / 256)
    assert sorted(g["initial_lr"] for g in optimizer.param_groups) == pytest.approx([0.025, 0.025, 0.1, 0.1])


class _IndexImages(Dataset):
    """Image ``i`` is constant ``i / n``; its label is ``i`` (so labels name the samples)."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return torch.full((3, 32, 32), index / self.n), index


def test_a_resumed_stream_on_two_ranks_continues_where_it_stopped(monkeypatch):
    """Rank 0 of 2 resuming at iteration 2 gets the batch it would have had at iteration 2 of an
    uninterrupted run: the stream restarts after 2 iterations x 2 ranks x the batch."""
    from eval_micro import micro_vit

    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "get_rank", lambda: 0)
    args = linear.get_args_parser().parse_args(["--batch-size", "3", "--num-workers", "0", "--seed", "4"])
    backbone, dataset = micro_vit().eval(), _IndexImages(10)
    uninterrupted = linear.train_batches(backbone, dataset, args, 0, 1, None)
    labels = [next(uninterrupted)[1].tolist() for _ in range(3)]
    resumed = linear.train_batches(backbone, dataset, args, 2, 1, None)
    assert next(resumed)[1].tolist() == labels[2]


def test_a_checkpoint_is_written_at_the_end_when_the_period_does_not_divide_the_run(tmp_path):
    """--save-checkpoint-frequency 2 epochs on a 1-epoch run (3 iterations): no periodic checkpoint
    falls inside the run, yet the finished run is saved (iteration 3), so rerunning resumes it."""
    from eval_micro import micro_vit

    argv = [
        "--output-dir", str(tmp_path), "--device", "cpu", "--batch-size", "4", "--num-workers", "0",
        "--train-dataset", "Synthetic:split=TRAIN:num_images=12:image_size=32",
        "--val-dataset", "Synthetic:split=VAL:num_images=6:image_size=32",
        "--epochs", "1", "--epoch-length", "3", "--save-checkpoint-frequency", "2", "--eval-period-iterations", "0",
        "--learning-rates", "0.1", "--n-last-blocks", "1", "--resize-size", "32", "--crop-size", "32", "--no-progress",
    ]  # fmt: skip
    torch.manual_seed(0)
    linear.run_linear_probe(linear.get_args_parser().parse_args(argv), micro_vit().eval(), None)
    state = torch.load(tmp_path / linear.CHECKPOINT_FILE, weights_only=True)
    assert state["iteration"] == 3


def test_num_classes_without_a_count_is_the_largest_target_plus_one():
    class Targets:
        def get_targets(self):
            return [0, 3, 1, 3]

    class Counted(Targets):
        num_classes = 9

    assert linear.num_classes_of(Targets()) == 4
    assert linear.num_classes_of(Counted()) == 9


def test_the_results_table_lists_the_best_classifiers_first():
    results = {f"c{i}": {"top1": float(v), "top5": 0.0, "mean_per_class": 0.0}
               for i, v in enumerate([5, 60, 20, 90, 40, 10, 70, 30, 80, 50, 0, 15])}  # fmt: skip
    lines = linear.results_table(results, "top1").splitlines()[2:]
    names = [line.split()[0] for line in lines]
    assert names == ["c3", "c8", "c6", "c1", "c9", "c4", "c7", "c2", "c11", "c5"]  # the 10 best, descending


# --- logistic regression -------------------------------------------------------------------------


def test_a_tie_in_held_out_accuracy_goes_to_the_smaller_c():
    """Three well separated clusters: every C of the grid scores 100 % on the held-out part, so the
    smallest C (the strongest regularisation) is chosen, whatever the grid's order."""
    gen = torch.Generator().manual_seed(0)
    centres = 10.0 * torch.eye(3, 4)
    train_y, val_y = torch.arange(3).repeat(10), torch.arange(3).repeat(3)
    train_x = centres[train_y] + 0.1 * torch.randn(30, 4, generator=gen)
    val_x = centres[val_y] + 0.1 * torch.randn(9, 4, generator=gen)
    result = evaluate_log_regression(train_x, train_y, val_x, val_y, c_values=[10.0, 1.0, 100.0],
                                     holdout_fraction=0.3, max_iter=100)  # fmt: skip
    assert result["holdout_top1"] == {10.0: 100.0, 1.0: 100.0, 100.0: 100.0}
    assert result["best_c"] == 1.0


def test_top5_is_recorded_only_with_more_than_5_classes():
    """With exactly 5 classes every class is in the top 5 (top-5 would always be 100 %): None."""
    labels = torch.tensor([0, 1, 2, 3, 4, 4])
    scores5 = torch.zeros(6, 5)
    assert val_accuracies(scores5, labels, labels)["top5"] is None
    scores6 = torch.zeros(6, 6)
    scores6[:, 5] = 1.0  # class 5 ranks first for everyone, then 0, 1, 2, 3: class 4 is 6th
    assert val_accuracies(scores6, labels, labels)["top5"] == pytest.approx(100.0 * 4 / 6)


def test_log_regression_mean_per_class_averages_only_the_classes_present():
    """Labels 0, 0, 2 (class 1 absent), everyone predicted class 0: per class 100 % and 0 %, mean 50 %
    (over the three indices it would be 33.3 %)."""
    labels = torch.tensor([0, 0, 2])
    scores = torch.tensor([[1.0, 0.0, 0.0]] * 3)
    result = val_accuracies(scores, labels, labels)
    assert result["top1"] == pytest.approx(200.0 / 3)
    assert result["mean_per_class"] == pytest.approx(50.0)


# --- online k-NN ---------------------------------------------------------------------------------


class _Points(Dataset):
    def __init__(self, points, labels):
        self.points, self.labels = torch.tensor(points), list(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.points[index], self.labels[index]


def test_online_knn_reports_the_best_k_at_its_own_temperature(monkeypatch):
    """The query (class 1) has a class-0 neighbour at similarity 1 and two class-1 ones at 0.5.
    k = 1: a miss. k = 3 at T = 10: class 1 scores 2 exp(0.5 / 10) > exp(1 / 10): a hit (at T = 0.07,
    the default, it would be a miss: 2 exp(0.5 / 0.07) < exp(1 / 0.07)). knn_top1 is the best k's."""
    train = _Points([_unit(0), _unit(60), _unit(-60)], [0, 1, 1])
    val = _Points([_unit(0)], [1])
    online = OnlineKNN("unused", "unused", nb_knn=(1, 3), temperature=10.0, batch_size=2)
    monkeypatch.setattr(online, "datasets", lambda: (train, val))
    metrics = online(nn.Identity(), torch.device("cpu"))
    assert metrics == {"knn_top1": 100.0, "knn_top1_k1": 0.0, "knn_top1_k3": 100.0}


def test_online_knn_cache_holds_at_most_its_budget_over_both_datasets():
    """768-byte images (3 x 8 x 8 float32), a budget of 20 of them: 10 for each dataset."""
    budget = 768 * 20
    online = OnlineKNN("Synthetic:split=TRAIN:num_images=36:image_size=8",
                       "Synthetic:split=VAL:num_images=18:image_size=8", nb_knn=(3,), resize_size=8, crop_size=8,
                       batch_size=6, cache_bytes=budget)  # fmt: skip
    online(nn.Flatten(), torch.device("cpu"))
    train, val = online.datasets()
    assert isinstance(train, CachedDataset) and isinstance(val, CachedDataset)
    assert (len(train.cache), len(val.cache)) == (10, 10)
    assert train.cached_bytes + val.cached_bytes <= budget


def test_a_one_value_c_grid_is_the_top_of_the_range():
    from dinov2.eval.log_regression import default_c_values

    assert default_c_values(1, -2.0, 3.0) == [1000.0]  # the weakest penalty, as documented
    assert default_c_values(3, -2.0, 2.0) == pytest.approx([0.01, 1.0, 100.0])


class _Counted(Dataset):
    """Four items made by ``make(index)``; counts the reads."""

    def __init__(self, make):
        self.make, self.reads = make, 0

    def __len__(self):
        return 4

    def __getitem__(self, index):
        self.reads += 1
        return self.make(index), index % 2


def test_a_cached_sample_is_served_from_the_cache_without_reading_the_dataset_again():
    dataset = _Counted(lambda index: torch.full((2,), float(index)))
    cached = CachedDataset(dataset, max_bytes=1024)
    first = [cached[i] for i in range(4)]
    again = [cached[i] for i in range(4)]
    assert dataset.reads == 4
    assert all(torch.equal(a[0], b[0]) and a[1] == b[1] for a, b in zip(first, again, strict=True))


def test_images_of_unknown_size_are_not_cached():
    # a PIL image (no transform to a tensor) has no byte count to hold against the budget
    dataset = _Counted(lambda index: [float(index)] * 3)
    cached = CachedDataset(dataset, max_bytes=2**30)
    for _ in range(2):
        cached[0]
    assert cached.cache == {} and cached.cached_bytes == 0 and dataset.reads == 2


def test_online_knn_refuses_k_of_zero():
    with pytest.raises(ValueError, match=r"nb_knn must be positive integers, got \(0, 10\)"):
        OnlineKNN("a", "b", nb_knn=(0, 10))


def test_online_knn_extracts_under_the_autocast_dtype_it_is_given(monkeypatch):
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
            return x

    train = _Points([_unit(0), _unit(90)], [0, 1])
    online = OnlineKNN("unused", "unused", nb_knn=(1,), batch_size=2)
    monkeypatch.setattr(online, "datasets", lambda: (train, train))
    assert online(Probe(), torch.device("cpu"), autocast_dtype=torch.bfloat16)["knn_top1"] == 100.0
    assert seen and all(entry == (True, torch.bfloat16) for entry in seen)
