"""Logistic regression with torch L-BFGS against scikit-learn on the same features."""

from __future__ import annotations

import math

import pytest
import torch

from dinov2.eval.log_regression import (
    default_c_values,
    evaluate_log_regression,
    fit_logistic_regression,
    predict_scores,
    stratified_split,
)

sklearn_linear = pytest.importorskip("sklearn.linear_model")


def overlapping_gaussians(seed, n_train=400, n_val=300, dim=10, num_classes=6, spread=1.6):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=gen) * 1.5 + 0.5

    def draw(n):  # fmt: skip
        labels = torch.randint(0, num_classes, (n,), generator=gen)
        return centres[labels] + spread * torch.randn(n, dim, generator=gen), labels

    return (*draw(n_train), *draw(n_val))


@pytest.mark.parametrize("c", [0.01, 1.0])
@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-4), (torch.float32, 1e-2)])
def test_fit_matches_sklearn_lbfgs_multinomial(c, dtype, atol, one_thread):
    train_x, train_y, val_x, val_y = overlapping_gaussians(0)
    params = fit_logistic_regression(train_x, train_y, c, num_classes=6, dtype=dtype)
    assert params[0].dtype == params[1].dtype == dtype
    ours = (predict_scores(val_x, params).argmax(1) == val_y).double().mean().item() * 100
    reference = sklearn_linear.LogisticRegression(C=c, solver="lbfgs", max_iter=5000, tol=1e-10)
    reference.fit(train_x.double().numpy(), train_y.numpy())
    theirs = reference.score(val_x.double().numpy(), val_y.numpy()) * 100
    assert 30.0 < theirs < 99.0  # overlapping classes: the comparison is not trivially 100 %
    assert abs(ours - theirs) <= 1.0
    # same objective, same minimiser: the weights agree too, and the (unpenalised) bias up to a
    # constant shift, which the softmax does not see
    torch.testing.assert_close(params[0].double(), torch.from_numpy(reference.coef_.T), rtol=0, atol=atol)
    bias = params[1].double() - torch.from_numpy(reference.intercept_)
    assert (bias - bias.mean()).abs().max() < atol


def test_stronger_regularisation_shrinks_weights(one_thread):
    train_x, train_y, _, _ = overlapping_gaussians(1)
    norms = [fit_logistic_regression(train_x, train_y, c, 6)[0].norm().item() for c in (1e-4, 1e-2, 1.0)]
    assert norms[0] < norms[1] < norms[2]


def test_sweep_chooses_c_on_held_out_train_and_reports_val_accuracy(one_thread):
    train_x, train_y, val_x, val_y = overlapping_gaussians(2)
    c_values = [1e-6, 1e-2, 1.0]
    result = evaluate_log_regression(train_x, train_y, val_x, val_y, c_values=c_values, holdout_fraction=0.2)
    assert list(result["holdout_top1"]) == c_values
    assert result["best_c"] == max(c_values, key=lambda c: (result["holdout_top1"][c], -c))
    assert result["best_c"] != 1e-6  # barely fitted weights lose on held-out data here
    params = fit_logistic_regression(train_x, train_y, result["best_c"], 6)
    expected = (predict_scores(val_x, params).argmax(1) == val_y).float().mean().item() * 100
    assert result["top1"] == pytest.approx(expected)
    assert result["top1"] <= result["top5"] <= 100.0


def test_single_c_skips_the_sweep(one_thread):
    train_x, train_y, val_x, val_y = overlapping_gaussians(3, n_train=100, n_val=50)
    result = evaluate_log_regression(train_x, train_y, val_x, val_y, c_values=[0.5])
    assert result["best_c"] == 0.5 and result["holdout_top1"] == {}


def test_stratified_split_holds_out_each_class_proportionally():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 2 + [3] * 1)
    fit, holdout = stratified_split(labels, 0.1, seed=0)
    assert sorted(torch.cat([fit, holdout]).tolist()) == list(range(len(labels)))
    counts = torch.bincount(labels[holdout], minlength=4).tolist()
    assert counts == [5, 2, 1, 0]  # rounded share, at least one, never a whole class
    assert torch.equal(stratified_split(labels, 0.1, seed=0)[1], holdout)
    assert not torch.equal(stratified_split(labels, 0.1, seed=1)[1], holdout)
    with pytest.raises(ValueError, match="holdout_fraction"):
        stratified_split(labels, 1.0)


def test_default_grid_is_the_protocols_45_log_spaced_values():
    values = default_c_values()
    assert len(values) == 45
    assert values[0] == pytest.approx(1e-6) and values[-1] == pytest.approx(1e5)
    steps = [math.log10(b) - math.log10(a) for a, b in zip(values, values[1:])]
    assert max(steps) == pytest.approx(min(steps)) == pytest.approx(11 / 44)


def test_a_common_offset_in_the_features_changes_only_the_bias(one_thread):
    """The bias absorbs a shared offset, so the minimiser's weights and predictions stay the same."""
    train_x, train_y, val_x, _ = overlapping_gaussians(4, n_train=200, n_val=50)
    offset = torch.linspace(20.0, 60.0, train_x.shape[1])
    plain = fit_logistic_regression(train_x, train_y, 0.3, 6)
    shifted = fit_logistic_regression(train_x + offset, train_y, 0.3, 6)
    torch.testing.assert_close(shifted[0], plain[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(predict_scores(val_x + offset, shifted), predict_scores(val_x, plain), rtol=0, atol=1e-4)


def test_constant_features_score_chance_level(one_thread):
    """A collapsed backbone (one feature vector for every image) predicts one class set for all
    samples: with 10 balanced classes that is 10 % top-1 and 50 % top-5, never 100 %."""
    labels_train, labels_val = torch.arange(200) % 10, torch.arange(100) % 10
    result = evaluate_log_regression(torch.full((200, 8), 0.3), labels_train, torch.full((100, 8), 0.3), labels_val,
                                     c_values=[0.01, 1.0], max_iter=50)  # fmt: skip
    assert (result["top1"], result["top5"]) == (10.0, 50.0)


def test_fits_run_without_tf32(monkeypatch):
    """The L-BFGS fits run in full fp32/fp64 precision even when TF32 is allowed (as for extraction)."""
    from dinov2.eval.log_regression import fit_logistic_regression

    seen, step = [], torch.optim.LBFGS.step

    def recording(self, closure):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return step(self, closure)

    monkeypatch.setattr(torch.optim.LBFGS, "step", recording)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        gen = torch.Generator().manual_seed(0)
        fit_logistic_regression(torch.randn(20, 4, generator=gen), torch.arange(20) % 3, 1.0, 3, max_iter=5)
        assert seen and not any(seen) and torch.backends.cuda.matmul.allow_tf32 is True
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_sweep_sums_accuracies_on_the_collective_device(monkeypatch, one_thread):
    """Under NCCL the process group only reduces CUDA tensors, while --gather-on-cpu fits on the CPU:
    the held-out accuracies must be summed on the collective device, not on the features' device.
    (``meta`` stands in for CUDA; the fake all-reduce plays the 2-rank sum.)"""
    from dinov2.eval import log_regression

    train_x, train_y, _, _ = overlapping_gaussians(4, n_train=120)
    holdout = (train_x[:40], train_y[:40])
    seen = []

    def fake_all_reduce(tensor):
        seen.append(tensor.device)
        return torch.tensor([11.0, 22.0, 33.0], dtype=torch.float64)  # the sum over both ranks

    monkeypatch.setattr(log_regression.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(log_regression.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(log_regression.distributed, "all_reduce", fake_all_reduce)
    sums = log_regression.sweep_c(
        (train_x, train_y), holdout, [1e-2, 1.0, 1e-4], 6, max_iter=20, collective_device="meta"
    )
    assert seen == [torch.device("meta")]
    assert sums == [11.0, 22.0, 33.0]


def test_c_can_be_chosen_on_mean_per_class_accuracy(one_thread):
    """Imbalanced classes: the record holds the val mean per-class accuracy (checked against an
    independent per-class count) and the held-out scores of the chosen metric."""
    train_x, train_y, val_x, val_y = overlapping_gaussians(5, n_train=240, n_val=120)
    keep = (train_y != 1) | (torch.arange(len(train_y)) % 6 == 0)  # class 1 is rare in train
    train_x, train_y = train_x[keep], train_y[keep]
    c_values = [1e-4, 1e-2, 1.0]
    result = evaluate_log_regression(train_x, train_y, val_x, val_y, c_values=c_values, holdout_fraction=0.3,
                                     max_iter=100, metric="mean_per_class")  # fmt: skip
    assert result["metric_type"] == "mean_per_class" and list(result["holdout_mean_per_class"]) == c_values
    assert result["best_c"] == max(c_values, key=lambda c: (result["holdout_mean_per_class"][c], -c))
    predictions = predict_scores(val_x, fit_logistic_regression(train_x, train_y, result["best_c"], 6, 100)).argmax(1)
    per_class = [(predictions[val_y == c] == c).float().mean().item() * 100 for c in val_y.unique().tolist()]
    assert result["mean_per_class"] == pytest.approx(sum(per_class) / len(per_class))
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_log_regression(train_x, train_y, val_x, val_y, c_values=c_values, metric="top5")


def _sklearn_topk(train_x, train_y, val_x, val_y, c, k):
    """Independent top-1 / top-k (%) and per-class top-1: scikit-learn's classifier, whose outputs are
    the classes of ``train_y`` only; a val class it lacks is a miss."""
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency; one BLAS thread is far faster here

    model = sklearn_linear.LogisticRegression(C=c, solver="lbfgs", max_iter=2000, tol=1e-8)
    with threadpool_limits(1):
        model.fit(train_x.double().numpy(), train_y.numpy())
    ranked = model.classes_[(-model.predict_proba(val_x.double().numpy())).argsort(axis=1)]
    truth = val_y.numpy()[:, None]
    top1, topk = (ranked[:, :1] == truth).any(1), (ranked[:, :k] == truth).any(1)
    per_class = [top1[val_y.numpy() == c].mean() for c in sorted(set(val_y.tolist()))]
    return 100 * top1.mean(), 100 * topk.mean(), 100 * sum(per_class) / len(per_class)


def test_top5_uses_only_the_classes_the_classifier_was_trained_on(one_thread):
    """Train has classes 0 1 2, val also class 3 (a val-only class, as the class-name alignment gives
    it). The classifier used to get an output for class 3 too, so with 4 outputs every class was in
    the top 5 and every val image counted as a top-5 hit, class 3's included (100 %). Now the
    classifier knows 0 1 2 only; top-5 with 5 classes or fewer is not reported (None), top-1 and
    the per-class mean (class 3 scoring 0) agree with scikit-learn's."""
    train_x, train_y, val_x, val_y = overlapping_gaussians(6, n_train=150, n_val=120, num_classes=4)
    keep = train_y != 3
    train_x, train_y = train_x[keep], train_y[keep]
    assert (val_y == 3).sum() > 10
    result = evaluate_log_regression(train_x, train_y, val_x, val_y, c_values=[1.0])
    top1, _, per_class = _sklearn_topk(train_x, train_y, val_x, val_y, 1.0, 5)
    assert result["top5"] is None and result["num_classes"] == 3
    assert abs(result["top1"] - top1) <= 1.0 and abs(result["mean_per_class"] - per_class) <= 1.0


def test_top5_with_a_class_gap_and_a_val_only_class_matches_sklearn(one_thread):
    """Train labels with a gap (class 2 missing: ImageNet-style indices of a subset), val with every
    class: top-1 / top-5 / per-class mean over the 6 known classes, as scikit-learn computes them."""
    train_x, train_y, val_x, val_y = overlapping_gaussians(7, n_train=210, n_val=140, num_classes=7)
    keep = train_y != 2
    train_x, train_y = train_x[keep], train_y[keep]
    result = evaluate_log_regression(train_x, train_y, val_x, val_y, c_values=[0.1])
    expected = _sklearn_topk(train_x, train_y, val_x, val_y, 0.1, 5)
    assert result["num_classes"] == 6
    for got, want in zip((result["top1"], result["top5"], result["mean_per_class"]), expected):
        assert abs(got - want) <= 1.0
