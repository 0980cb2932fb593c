"""Linear probing of a frozen backbone: the DINOv2 protocol, many classifiers trained at once.

    python dinov2/eval/linear.py --config-file vitl14_pretrain --pretrained-weights W.pth \\
        --train-dataset ImageNet:split=TRAIN:root=R:extra=E --val-dataset ImageNet:split=VAL:root=R:extra=E \\
        --output-dir OUT

One backbone forward per batch feeds a grid of linear classifiers (:mod:`dinov2.eval.linear_heads`):
every learning rate of ``--learning-rates`` (scaled by global batch / 256) x ``--n-last-blocks``
x with/without the average-pooled patch tokens. SGD (momentum 0.9, no weight decay), cosine
schedule to 0 over ``--epochs`` x ``--epoch-length`` iterations, random-resized crops and flips.
The validation set is encoded once (eval transform) and every classifier is scored on it; the best
on ``--val-metric-type`` is saved in the hub ``_lc`` head format.

Outputs in ``OUT``: ``results_eval_linear.json`` (all classifiers, the best), ``results_eval_linear.txt``
(a table), ``linear_head_best.pth`` and ``checkpoint_linear.pth`` (resumed from unless ``--no-resume``).
Resuming gives the same result as an uninterrupted run: the data order and every sample's
augmentation depend only on its position in the training stream. Under ``torchrun`` every rank
trains the same classifiers on its own share of each batch and gradients are averaged.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dinov2 import distributed
from dinov2.checkpoint import atomic_torch_save, atomic_write
from dinov2.data.loaders import make_data_loader
from dinov2.data.seeding import PositionedSampler, SeededSamples
from dinov2.data.transforms import make_classification_eval_transform, make_classification_train_transform
from dinov2.eval import linear_heads as core
from dinov2.eval.features import (
    align_class_indices,
    check_labelled,
    collate_with_skips,
    extract_labelled_features,
    make_eval_dataset,
)
from dinov2.eval.metrics import format_table, write_json_atomic
from dinov2.eval.setup import get_args_parser as get_setup_args_parser
from dinov2.eval.setup import setup_and_build_model

logger = logging.getLogger("dinov2")

RESULTS_FILE = "results_eval_linear.json"
TABLE_FILE = "results_eval_linear.txt"
CHECKPOINT_FILE = "checkpoint_linear.pth"
BEST_HEAD_FILE = "linear_head_best.pth"
DEFAULT_BATCH_SIZE = 128  # per process, as the original linear evaluation


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parents = [get_setup_args_parser(add_help=False)]
    parser = argparse.ArgumentParser(description="Linear probing", parents=parents, add_help=add_help)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epoch-length", type=int, default=1250, help="iterations per epoch")
    parser.add_argument("--eval-period-iterations", type=int, default=1250, help="0: evaluate at the end only")
    parser.add_argument("--save-checkpoint-frequency", type=int, default=1, help="epochs between checkpoints")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=list(core.DEFAULT_LEARNING_RATES),
                        help="base learning rates, scaled by global batch / 256")  # fmt: skip
    parser.add_argument("--n-last-blocks", type=int, nargs="+", default=[1, 4], help="CLS tokens of the last n blocks")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--val-metric-type", choices=core.METRIC_TYPES, default="top1", help="picks the best")
    parser.add_argument("--resize-size", type=int, default=256, help="eval transform: shorter side resized to")
    parser.add_argument("--crop-size", type=int, default=224, help="train and eval crop size")
    parser.add_argument("--seed", type=int, default=0, help="data order, augmentations and classifier init")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    # The protocol's batch: 128 per process, a global 1024 on the usual 8 GPUs (the shared default, 256,
    # suits feature extraction); the learning rates are scaled by the global batch either way.
    parser.set_defaults(batch_size=DEFAULT_BATCH_SIZE)
    return parser


def train_batches(
    backbone: nn.Module,
    dataset,
    args: argparse.Namespace,
    start_iter: int,
    n_max: int,
    autocast_dtype: torch.dtype | None,
    skipped: distributed.RunCount | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Packed features and labels of the training stream from iteration ``start_iter`` on: the data
    order and each sample's augmentation depend only on its position in the stream (``args.seed``).
    Unreadable images of the yielded batches are added to ``skipped.local``."""
    device = next(backbone.parameters()).device
    start = start_iter * args.batch_size * distributed.get_world_size()
    stream = PositionedSampler(len(dataset), args.batch_size, seed=args.seed, start=start)
    loader = make_data_loader(
        SeededSamples(dataset, args.seed), args.batch_size, args.num_workers, sampler=stream,
        seed=args.seed, drop_last=True, persistent_workers=False, collate_fn=collate_with_skips,
    )  # fmt: skip
    for images, labels, batch_skipped in loader:
        if (labels < 0).any():
            raise ValueError(
                f"the train dataset {args.train_dataset!r} has unlabelled samples; linear probing needs labels"
            )
        if skipped is not None:
            skipped.local += int(batch_skipped.sum())
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            packed = core.pack_features(backbone, images, n_max)
        yield packed.float(), labels.to(device)


class PackedFeatures(nn.Module):
    """Backbone -> flattened packed features, for :func:`dinov2.eval.features.extract_features`."""

    def __init__(self, backbone: nn.Module, n_max: int) -> None:
        super().__init__()
        self.backbone, self.n_max = backbone, n_max

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return core.pack_features(self.backbone, images, self.n_max).flatten(1)


def num_classes_of(dataset) -> int:
    count = getattr(dataset, "num_classes", None)
    if count:
        return int(count)
    return int(np.max(dataset.get_targets())) + 1


def encode_val_set(
    args, backbone: nn.Module, n_max: int, autocast_dtype, train_set=None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Packed (N, n_max + 1, D) features (CPU) and labels of the validation set, computed once, and
    the number of unreadable validation images (left out of N). Labels follow ``train_set``'s class
    indices where both name their classes (:func:`~dinov2.eval.features.align_class_indices`)."""
    transform = make_classification_eval_transform(resize_size=args.resize_size, crop_size=args.crop_size)
    dataset = make_eval_dataset(args.val_dataset, transform, role="val dataset")
    check_labelled(dataset, args.val_dataset, role="val dataset", purpose="linear probing")
    if train_set is not None:
        align_class_indices(train_set, dataset)
    result = extract_labelled_features(
        PackedFeatures(backbone, n_max), dataset, args.batch_size, args.num_workers,
        autocast_dtype=autocast_dtype, gather_on_cpu=True, progress=args.progress,
    )  # fmt: skip
    return result.features.reshape(len(result.labels), n_max + 1, -1), result.labels, result.num_skipped


def check_train_labels(args, dataset) -> None:
    """Refuse a train set with unlabelled samples (target < 0) before anything runs, from its
    ``get_targets()`` where it has one. Every rank reads the same targets and stops together; the
    check of each training batch (``train_batches``) would only stop the rank whose batch holds such a
    sample, possibly late in the run, and leave the other ranks waiting in the gradient all-reduce."""
    check_labelled(dataset, args.train_dataset, role="train dataset", purpose="linear probing")


def check_val_classes(args, val_labels: torch.Tensor, num_classes: int) -> None:
    """Refuse, before any training, a validation set with a class index the classifiers lack (the
    train set has ``num_classes``): it could not be scored, and would only fail at the first evaluation."""
    if len(val_labels) and int(val_labels.max()) >= num_classes:
        raise ValueError(
            f"the val dataset {args.val_dataset!r} has class index {int(val_labels.max())}, but the train dataset "
            f"{args.train_dataset!r} has {num_classes} classes (0 to {num_classes - 1}), so the classifiers have "
            "no output for it; use a train and val split with the same classes"
        )


def _grid(args, backbone: nn.Module, num_classes: int):
    depth = backbone.n_blocks
    if any(not 1 <= n <= depth for n in args.n_last_blocks):
        raise ValueError(f"--n-last-blocks {args.n_last_blocks} must lie in [1, {depth}] for this backbone")
    scale = args.batch_size * distributed.get_world_size() / 256.0
    heads, base_lrs = core.build_heads(backbone.embed_dim, num_classes, args.learning_rates, args.n_last_blocks,
                                       seed=args.seed)  # fmt: skip
    lrs = {name: lr * scale for name, lr in base_lrs.items()}
    heads = heads.to(next(backbone.parameters()).device)
    return heads, core.make_optimizer(heads, lrs), base_lrs, lrs


def _evaluate(heads, val, num_classes: int, metric: str, iteration: int) -> dict[str, dict[str, float]]:
    results = core.evaluate_heads(heads, val[0], val[1], num_classes)
    best = core.best_classifier(results, metric)
    logger.info("linear eval at iteration %d: best %s %s = %.2f", iteration, best, metric, results[best][metric])
    heads.train()
    return results


def _stream_settings(args, max_iter: int) -> dict[str, int]:
    """What fixes the training stream and the schedules: a checkpoint resumes only under the same."""
    return {"global_batch_size": args.batch_size * distributed.get_world_size(), "iterations": max_iter,
            "seed": args.seed}  # fmt: skip


def backbone_fingerprint(backbone: nn.Module) -> list[float]:
    """``[number of values, sum of absolute values, sum of squares]`` of the backbone's floating-point
    weights (sums of non-negative terms: no cancellation, so their rounding stays relative), stored
    with the linear checkpoint: a resumed run checks that it probes the backbone its classifiers were
    trained on (the same weights under another path pass; other weights under the same path, such as a
    training run's newer latest checkpoint, do not)."""
    tensors = [t.detach() for t in backbone.state_dict().values() if t.is_floating_point()]
    if not tensors:
        return [0.0, 0.0, 0.0]
    sums = torch.stack([torch.stack([t.float().abs().sum(), t.float().square().sum()]) for t in tensors])
    total = sums.cpu().double().sum(dim=0)  # float64 on the CPU: not every device has it
    return [float(sum(t.numel() for t in tensors)), *map(float, total.tolist())]


def _same_backbone(saved: list[float], current: list[float]) -> bool:
    """Whether two :func:`backbone_fingerprint` values describe the same weights (float32 partial sums:
    a relative tolerance covers another device's summation order)."""
    return len(saved) == len(current) and all(
        abs(a - b) <= 1e-5 * max(abs(a), abs(b), 1.0) for a, b in zip(saved, current, strict=True)
    )


class ResumeError(RuntimeError):
    """The ranks could not resume from the same linear checkpoint (the message says which rank and why)."""


def _resume(
    args, heads, optimizer, max_iter: int, fingerprint: list[float] | None = None,
    train_set: dict[str, int] | None = None,
) -> tuple[int, list, int]:  # fmt: skip
    """Start iteration, history and unreadable-training-image count of the run resumed from. A
    checkpoint of another global batch (``--batch-size`` x processes), length or seed is refused:
    its data position, learning rates and cosine schedule would not continue this run's. So is one
    whose classifiers were trained on another backbone (``fingerprint``: :func:`backbone_fingerprint`)
    or another train dataset (``train_set``: its number of samples, which fixes the data order, and
    of classes).

    Whether there is a checkpoint is rank 0's answer, and every rank must then read it at the same
    iteration: a rank whose view of a shared output directory is stale (no file yet, or an older
    one) would otherwise start at another iteration than rank 0, and the ranks would wait for each
    other in mismatched gradient all-reduces. A rank that cannot read it, or reads another iteration,
    stops every rank (:class:`ResumeError`)."""
    path = Path(args.output_dir) / CHECKPOINT_FILE
    if args.no_resume:
        return 0, [], 0
    if not distributed.rank_zero_says(path.is_file()):
        return 0, [], 0
    state = distributed.on_every_rank(lambda: core.load_checkpoint(path, heads, optimizer),
                                      f"resuming the linear classifiers from {path}", ResumeError)  # fmt: skip
    iteration = torch.tensor([int(state["iteration"])], device=distributed.collective_device())
    read = distributed.all_gather_cat(iteration).tolist()
    if len(set(read)) > 1:
        raise ResumeError(
            f"the ranks read {path} at different iterations ({', '.join(f'rank {r}: {i}' for r, i in enumerate(read))}): "
            "is the output directory on a file system every node shares, and up to date on every node?"
        )
    saved, current = state.get("stream"), _stream_settings(args, max_iter)
    if saved is not None and dict(saved) != current:
        changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in current.items() if saved.get(k) != v)
        raise ValueError(
            f"{path} was written by a run with other settings ({changed}): resume with the same --batch-size "
            "and number of processes, --epochs x --epoch-length and --seed, or pass --no-resume"
        )
    saved_backbone = state.get("backbone")  # None in checkpoints written before it was recorded
    if None not in (saved_backbone, fingerprint) and not _same_backbone(list(saved_backbone), fingerprint):
        raise ValueError(
            f"{path} holds classifiers trained on another backbone (its weights differ from those of "
            f"--pretrained-weights {args.pretrained_weights!r}): pass another --output-dir for this backbone, or "
            "--no-resume to train new classifiers here"
        )
    saved_set = state.get("train_set")
    if None not in (saved_set, train_set) and dict(saved_set) != train_set:
        raise ValueError(
            f"{path} holds classifiers trained on another train dataset ({saved_set['samples']} samples, "
            f"{saved_set['classes']} classes; --train-dataset {args.train_dataset!r} has {train_set['samples']} and "
            f"{train_set['classes']}): pass another --output-dir for this dataset, or --no-resume to train new "
            "classifiers here"
        )
    logger.info("Resumed linear classifiers from %s at iteration %d", path, state["iteration"])
    return state["iteration"], list(state.get("history", [])), int(state.get("num_skipped_train", 0))


def results_table(results: dict[str, dict[str, float]], metric: str, rows: int = 10) -> str:
    ranked = sorted(results, key=lambda name: -results[name][metric])[:rows]
    cells = [(name, results[name]["top1"], results[name]["top5"], results[name]["mean_per_class"]) for name in ranked]
    return format_table(cells, ("classifier", "top-1 %", "top-5 %", "mean per-class %"))


def _record(args, results, base_lrs, lrs, heads, max_iter, history, seconds, num_skipped) -> dict:
    metric = args.val_metric_type
    best = core.best_classifier(results, metric)
    head = heads[best]
    return {
        "task": "linear",
        "val_metric_type": metric,
        "best_classifier": {"name": best, "accuracy": results[best][metric], "n_last_blocks": head.n_blocks,
                            "use_avgpool": head.use_avgpool, "lr": lrs[best], "base_lr": base_lrs[best]},
        "classifiers": {name: {**r, "lr": lrs[name], "base_lr": base_lrs[name]} for name, r in results.items()},
        "iterations": max_iter, "epochs": args.epochs, "epoch_length": args.epoch_length,
        "batch_size": args.batch_size, "global_batch_size": args.batch_size * distributed.get_world_size(),
        "history": history, "num_skipped": num_skipped, "config_file": args.config_file, "pretrained_weights": args.pretrained_weights,
        "weights_read": getattr(args, "weights_read", args.pretrained_weights),
        "train_dataset": args.train_dataset, "val_dataset": args.val_dataset, "seconds": seconds,
    }  # fmt: skip


def _write_outputs(args, record: dict, heads: nn.ModuleDict) -> None:
    output = Path(args.output_dir)
    best = record["best_classifier"]["name"]
    atomic_torch_save(heads[best].hub_state_dict(), output / BEST_HEAD_FILE)
    write_json_atomic(output / RESULTS_FILE, record)
    table = results_table(record["classifiers"], args.val_metric_type)
    text = f"best ({args.val_metric_type}): {best}\n{table}\n"
    atomic_write(output / TABLE_FILE, lambda handle: handle.write(text.encode("utf-8")))
    print(table)
    logger.info("Linear results written to %s; best head (hub _lc format) %s", output / RESULTS_FILE,
                output / BEST_HEAD_FILE)  # fmt: skip


def run_linear_probe(args, backbone: nn.Module, autocast_dtype: torch.dtype | None) -> dict:
    """Train the grid, evaluate, write outputs (rank 0); returns the results record."""
    start = time.perf_counter()
    train_transform = make_classification_train_transform(crop_size=args.crop_size)
    train_set = make_eval_dataset(args.train_dataset, train_transform, role="train dataset")
    check_train_labels(args, train_set)
    num_classes = num_classes_of(train_set)
    n_max = max(args.n_last_blocks)
    heads, optimizer, base_lrs, lrs = _grid(args, backbone, num_classes)
    max_iter = args.epochs * args.epoch_length
    fingerprint, train_identity = backbone_fingerprint(backbone), {"samples": len(train_set), "classes": num_classes}
    start_iter, history, earlier_skipped = _resume(args, heads, optimizer, max_iter, fingerprint, train_identity)
    *val, val_skipped = encode_val_set(args, backbone, n_max, autocast_dtype, train_set)
    check_val_classes(args, val[1], num_classes)
    train_skipped = distributed.RunCount(earlier_skipped)  # unreadable images: counted, not dropped
    device = next(backbone.parameters()).device
    checkpoint_every = args.save_checkpoint_frequency * args.epoch_length

    def after_step(done: int) -> None:
        if args.eval_period_iterations and done % args.eval_period_iterations == 0 and done < max_iter:
            results = _evaluate(heads, val, num_classes, args.val_metric_type, done)
            best = core.best_classifier(results, args.val_metric_type)
            history.append({"iteration": done, "best": best, args.val_metric_type: results[best][args.val_metric_type]})
        if (checkpoint_every and done % checkpoint_every == 0) or done == max_iter:
            skipped_so_far = train_skipped.total(device)  # on every rank
            if distributed.is_main_process():
                state = core.checkpoint_state(heads, optimizer, done, history=history, num_skipped_train=skipped_so_far,
                                              stream=_stream_settings(args, max_iter), backbone=fingerprint,
                                              train_set=train_identity)  # fmt: skip
                atomic_torch_save(state, Path(args.output_dir) / CHECKPOINT_FILE)

    batches = train_batches(backbone, train_set, args, start_iter, n_max, autocast_dtype, train_skipped)
    core.train_heads(heads, optimizer, batches, max_iter, start_iter, after_step, log_period=max(1, max_iter // 20))
    results = _evaluate(heads, val, num_classes, args.val_metric_type, max_iter)
    num_skipped = {"train": train_skipped.total(device), "val": val_skipped}
    if num_skipped["train"]:
        logger.warning("%d unreadable training images were replaced by the next readable one of the train dataset",
                       num_skipped["train"])  # fmt: skip
    seconds = {"total": time.perf_counter() - start}
    record = _record(args, results, base_lrs, lrs, heads, max_iter, history, seconds, num_skipped)
    if distributed.is_main_process():
        _write_outputs(args, record, heads)
    return record


def check_args(args: argparse.Namespace) -> None:
    """Refuse, before the model is built, a run without training steps (``--epochs`` or
    ``--epoch-length`` below 1 would only score the classifiers' random initialisation) or a learning
    rate that is not positive."""
    if args.epochs < 1 or args.epoch_length < 1:
        raise ValueError(f"--epochs and --epoch-length must be >= 1, got {args.epochs} and {args.epoch_length}")
    if min(args.learning_rates) <= 0:
        raise ValueError(f"--learning-rates must be positive, got {args.learning_rates}")


def main(args: argparse.Namespace) -> dict:
    """Build the frozen backbone from the arguments and run the linear probe."""
    check_args(args)
    torch.manual_seed(args.seed)  # a reproducible random-initialisation baseline when no weights are given
    model, autocast_dtype, _ = setup_and_build_model(args)
    return run_linear_probe(args, model, autocast_dtype)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
