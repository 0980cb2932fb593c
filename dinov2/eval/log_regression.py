"""Multinomial logistic regression on frozen features, fitted with full-batch L-BFGS in torch.

The DINOv2 protocol: an L2-regularised multinomial logistic regression on the CLS features, its
inverse regularisation strength ``C`` chosen from 45 log-spaced values in ``[1e-6, 1e5]`` on a
held-out part of the training set, then refitted on the whole training set with the best ``C``
and tested on the validation set. The objective is scikit-learn's up to a constant factor:

    mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C n)      (the bias is not penalised)

so a given ``C`` means the same as in ``sklearn.linear_model.LogisticRegression(C=C)``. The fit runs
in float64 by default (as the original protocol; ``--train-dtype float32`` halves memory) on the
features' device (GPU when present); under ``torchrun`` the ``C`` values are split over ranks.

    python dinov2/eval/log_regression.py --config-file vitl14_pretrain --pretrained-weights W.pth \\
        --train-dataset ImageNet:split=TRAIN:root=R:extra=E --val-dataset ImageNet:split=VAL:root=R:extra=E \\
        --output-dir OUT
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from dinov2 import distributed
from dinov2.eval.knn import extract_train_and_val
from dinov2.eval.metrics import (
    format_table,
    mean_per_class_accuracy,
    run_record,
    topk_accuracy,
    topk_hits,
    write_json_atomic,
)
from dinov2.eval.setup import get_args_parser as get_setup_args_parser
from dinov2.eval.setup import setup_and_build_model
from dinov2.utils.device import full_precision_matmuls

logger = logging.getLogger("dinov2")

RESULTS_FILE = "results_eval_log_regression.json"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
METRIC_TYPES = ("top1", "mean_per_class")  # what chooses C on the held-out part


def check_metric(metric: str) -> None:
    if metric not in METRIC_TYPES:
        raise ValueError(f"unknown metric {metric!r}; choose from {METRIC_TYPES}")


def score(scores: torch.Tensor, labels: torch.Tensor, metric: str = "top1") -> float:
    """Top-1 or mean per-class accuracy (percent) of class ``scores`` (N, C)."""
    check_metric(metric)
    if metric == "mean_per_class":
        return mean_per_class_accuracy(scores, labels)
    return topk_accuracy(scores, labels, (1,))[1]


def default_c_values(count: int = 45, low_power: float = -6.0, high_power: float = 5.0) -> list[float]:
    """``count`` values ``10 ** p`` with ``p`` evenly spaced in ``[low_power, high_power]``; a grid of
    one value is ``10 ** high_power``, the weakest penalty of the range."""
    if count < 1:
        raise ValueError(f"the C grid needs at least one value (--c-count), got {count}")
    if count == 1:
        return [10.0**high_power]
    return [10.0 ** (low_power + (high_power - low_power) * i / (count - 1)) for i in range(count)]


@full_precision_matmuls()
def fit_logistic_regression(
    features: torch.Tensor,
    labels: torch.Tensor,
    c: float,
    num_classes: int,
    max_iter: int = 1000,
    tolerance_grad: float = 1e-7,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) in ``dtype`` minimising the objective above, from ``init`` or zeros.

    The fit runs on centred features (the unpenalised bias absorbs the mean, so the minimiser is the
    same, but the problem is far better conditioned); the returned bias applies to raw features.
    """
    if c <= 0:
        raise ValueError(f"C must be positive, got {c}")
    y = labels.long()
    mean = features.to(dtype).mean(dim=0)
    x = features.to(dtype) - mean
    zeros = {"device": x.device, "dtype": dtype}
    weight = torch.zeros(x.shape[1], num_classes, **zeros) if init is None else init[0].to(dtype).clone()
    bias = torch.zeros(num_classes, **zeros) if init is None else init[1].to(dtype) + mean @ weight
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    penalty = 1.0 / (2.0 * c * x.shape[0])
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance_grad, tolerance_change=1e-12,
        history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=False)
        loss = F.cross_entropy(torch.addmm(bias, x, weight), y) + penalty * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    return weight, bias - mean @ weight


def predict_scores(features: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    weight, bias = params
    return torch.addmm(bias, features.to(weight.device, weight.dtype), weight)


def stratified_split(labels: torch.Tensor, holdout_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, holdout): ``holdout_fraction`` of each class (rounded, at least one from classes
    with two or more samples) held out, chosen by a generator seeded with ``seed``."""
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    fit, holdout = [], []
    for cls in labels.unique():
        members = (labels == cls).nonzero()[:, 0]
        members = members[torch.randperm(len(members), generator=generator)]
        count = min(max(round(holdout_fraction * len(members)), 1), len(members) - 1)
        holdout.append(members[:count])
        fit.append(members[count:])
    fit, holdout = torch.cat(fit).sort().values, torch.cat(holdout).sort().values
    if len(holdout) == 0:
        raise ValueError("no class has two samples: cannot hold any out to choose C")
    return fit, holdout


def sweep_c(
    train: tuple[torch.Tensor, torch.Tensor],
    holdout: tuple[torch.Tensor, torch.Tensor],
    c_values: Sequence[float],
    num_classes: int,
    max_iter: int = 1000,
    dtype: torch.dtype = torch.float64,
    collective_device: torch.device | str | None = None,
    metric: str = "top1",
) -> list[float]:
    """Held-out accuracy (%, ``metric``: top-1 or mean per class) for each ``C``. Each rank fits every
    ``world``-th value (ascending, warm-started from its previous fit); the accuracies are summed over
    ranks on ``collective_device`` (default: the features'), the device of the process group's
    backend: CUDA under NCCL, also when the features, and so the fits, are in CPU memory
    (``--gather-on-cpu``)."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    device = train[0].device if collective_device is None else torch.device(collective_device)
    accuracies = torch.zeros(len(c_values), dtype=torch.float64, device=device)
    params = None
    for i in sorted(range(len(c_values)), key=lambda j: c_values[j])[rank::world]:
        start = time.perf_counter()
        params = fit_logistic_regression(*train, c_values[i], num_classes, max_iter, init=params, dtype=dtype)
        accuracy = score(predict_scores(holdout[0], params), holdout[1], metric)
        accuracies[i] = accuracy
        logger.info("C=%.3g: held-out %s %.2f%% (%.1f s)", c_values[i], metric, accuracy, time.perf_counter() - start)
    return distributed.all_reduce(accuracies).tolist()


def val_accuracies(scores: torch.Tensor, known_labels: torch.Tensor, labels: torch.Tensor) -> dict:
    """``top1``, ``top5`` and ``mean_per_class`` (%) of class ``scores`` (N, C) over the classifier's
    ``C`` classes. ``known_labels`` are the column of each sample's class, -1 where the classifier
    lacks that class (never a hit); ``labels`` the original classes, for the per-class mean (over
    the classes present in ``labels``). ``top5`` is ``None`` when ``C <= 5``: every class is then
    among the top 5, so it would measure nothing."""
    known = known_labels >= 0
    hits = {k: torch.zeros(len(labels), dtype=torch.bool, device=scores.device) for k in (1, 5)}
    if known.any():
        for k, found in topk_hits(scores[known], known_labels[known], (1, 5)).items():
            hits[k][known] = found
    labels = labels.to(scores.device).long()
    per_class = torch.bincount(labels[hits[1]], minlength=int(labels.max()) + 1).double()
    total = torch.bincount(labels, minlength=len(per_class)).double()
    present = total > 0
    return {
        "top1": 100.0 * float(hits[1].double().mean()),
        "top5": 100.0 * float(hits[5].double().mean()) if scores.shape[1] > 5 else None,
        "mean_per_class": 100.0 * float((per_class[present] / total[present]).mean()),
    }


def evaluate_log_regression(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    c_values: Sequence[float] | None = None,
    holdout_fraction: float = 0.1,
    max_iter: int = 1000,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    collective_device: torch.device | str | None = None,
    metric: str = "top1",
) -> dict:
    """Choose ``C`` on a stratified held-out part of train by ``metric`` (top-1 or mean per-class
    accuracy), refit on all of train, test on val. The fits run on the training features' device;
    ``collective_device`` is where the ranks sum the held-out accuracies (:func:`sweep_c`).

    The classifier has one output per class present in ``train_labels`` (as scikit-learn's): a val
    sample of a class train lacks is always a miss, also at top-5 (:func:`val_accuracies`).

    Returns ``{"best_c", "top1", "top5", "mean_per_class", "num_classes", "metric_type",
    "holdout_<metric>": {C: %}}`` (percentages; ``top5`` is ``None`` with 5 classes or fewer).
    """
    check_metric(metric)  # before any fit
    c_values = list(default_c_values() if c_values is None else c_values)
    device = train_features.device
    train_labels, val_labels = train_labels.to(device).long(), val_labels.to(device).long()
    known = torch.unique(train_labels)  # sorted: column j of the classifier is class known[j]
    num_classes = len(known)
    column = torch.full((int(max(train_labels.max(), val_labels.max())) + 1,), -1, dtype=torch.long, device=device)
    column[known] = torch.arange(num_classes, device=device)
    train_y = column[train_labels]
    if len(c_values) == 1:
        best_c, holdout = c_values[0], {}
    else:
        fit_idx, holdout_idx = (i.to(device) for i in stratified_split(train_y, holdout_fraction, seed))
        accuracies = sweep_c(
            (train_features[fit_idx], train_y[fit_idx]), (train_features[holdout_idx], train_y[holdout_idx]),
            c_values, num_classes, max_iter=max_iter, dtype=dtype, collective_device=collective_device, metric=metric,
        )  # fmt: skip
        best_c = c_values[max(range(len(c_values)), key=lambda i: (accuracies[i], -c_values[i]))]
        holdout = dict(zip(c_values, accuracies))
    params = fit_logistic_regression(train_features, train_y, best_c, num_classes, max_iter, dtype=dtype)
    accuracy = val_accuracies(predict_scores(val_features, params), column[val_labels], val_labels)
    return {"best_c": best_c, **accuracy, "num_classes": num_classes, "metric_type": metric,
            f"holdout_{metric}": holdout}  # fmt: skip


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [get_setup_args_parser(add_help=False)]
    parser = argparse.ArgumentParser(description="Logistic regression", parents=parents, add_help=add_help)
    parser.add_argument("--c-values", type=float, nargs="+", default=None, help="explicit C grid")
    parser.add_argument("--c-count", type=int, default=45, help="number of log-spaced C values")
    parser.add_argument("--c-powers", type=float, nargs=2, default=(-6.0, 5.0), help="C range as powers of 10")
    parser.add_argument("--holdout-fraction", type=float, default=0.1, help="part of train used to choose C")
    parser.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit")
    parser.add_argument("--seed", type=int, default=0, help="held-out split seed")
    parser.add_argument("--metric-type", choices=METRIC_TYPES, default="top1",
                        help="held-out metric that chooses C (mean_per_class: fine-grained benchmarks)")  # fmt: skip
    parser.add_argument("--train-dtype", choices=tuple(DTYPES), default="float64", help="precision of the fits")
    parser.add_argument("--gather-on-cpu", action="store_true", help="keep gathered features in CPU memory")
    # 224 / 224, as the original's logistic regression (k-NN and the linear probe resize to 256)
    parser.add_argument("--resize-size", type=int, default=224, help="eval transform: shorter side resized to")
    parser.add_argument("--crop-size", type=int, default=224, help="eval transform: center crop")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(args: argparse.Namespace) -> dict:
    """Extract features, run the C sweep and the final fit; returns (and on rank 0 writes) the record."""
    c_values = args.c_values or default_c_values(args.c_count, *args.c_powers)  # checked before any work
    if min(c_values) <= 0:
        raise ValueError(f"C values must be positive (--c-values), got {c_values}")
    # else found only once the features are extracted, which can take hours
    if len(c_values) > 1 and not 0.0 < args.holdout_fraction < 1.0:
        raise ValueError(f"--holdout-fraction must lie in (0, 1), e.g. 0.1 for 10 %, got {args.holdout_fraction}")
    if args.max_iter < 1:
        raise ValueError(f"--max-iter must be >= 1 L-BFGS iterations, got {args.max_iter}")
    model, autocast_dtype, _ = setup_and_build_model(args)
    device = next(model.parameters()).device
    start = time.perf_counter()
    data = extract_train_and_val(args, model, autocast_dtype, device)
    extract_s = time.perf_counter() - start
    result = evaluate_log_regression(
        data["train_features"], data["train_labels"], data["val_features"], data["val_labels"],
        c_values=c_values, holdout_fraction=args.holdout_fraction, max_iter=args.max_iter, seed=args.seed,
        dtype=DTYPES[args.train_dtype], collective_device=device, metric=args.metric_type,
    )  # fmt: skip
    seconds = {"features": extract_s, "total": time.perf_counter() - start}
    record = run_record("log_regression", args, data, seconds, **result)
    if distributed.is_main_process():
        path = write_json_atomic(Path(args.output_dir) / RESULTS_FILE, record)
        top5 = "n/a" if result["top5"] is None else result["top5"]  # 5 classes or fewer
        rows = [(f"{result['best_c']:.3g}", result["top1"], top5, result["mean_per_class"])]
        print(format_table(rows, ("best C", "top-1 %", "top-5 %", "mean per-class %")))
        logger.info("Logistic regression results written to %s", path)
    return record


if __name__ == "__main__":
    main(get_args_parser().parse_args())
