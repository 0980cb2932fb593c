"""Accuracy from class scores, result files and small text tables, shared by the evaluations.

Top-k convention (used by k-NN, logistic regression and linear probing): each sample's classes are
ranked by score, highest first, with ties broken by class index (the lower index ranks first, as
``argmax`` does), so exactly ``k`` classes are chosen at top-``k``. A sample is correct at ``k``
when its true class is among them. A NaN score ranks above every number, so a NaN on another
class pushes the true class down, and a sample whose true class scores NaN is never correct: a
classifier that outputs NaN scores 0 %, and one whose scores are all equal predicts class 0 for
every sample (chance level on balanced data). With fewer than ``k`` classes every class is chosen.
For k-NN votes, where a class with no vote has score 0, pass ``require_positive=True`` so that a
class nobody voted for is never counted as predicted.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def true_class_rank(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The 0-based rank (N,) of each row's true class under the module's convention: the number of
    classes scoring higher, tied with a lower index, or NaN. A NaN true score gets the largest int64."""
    if scores.ndim != 2 or labels.shape != scores.shape[:1]:
        raise ValueError(f"need scores (N, C) and labels (N,), got {tuple(scores.shape)} and {tuple(labels.shape)}")
    labels = labels.to(scores.device).long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}), got [{labels.min()}, {labels.max()}]")
    true_score = scores.gather(1, labels[:, None])
    lower_index = torch.arange(scores.shape[1], device=scores.device)[None, :] < labels[:, None]
    ahead = (scores > true_score) | ((scores == true_score) & lower_index) | scores.isnan()
    rank = ahead.sum(dim=1)
    return rank.masked_fill(true_score[:, 0].isnan(), torch.iinfo(torch.int64).max)


def topk_hits(
    scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5), require_positive: bool = False
) -> dict[int, torch.Tensor]:
    """Per ``k``, a boolean (N,) tensor: is the row's true class among its top ``k`` classes."""
    rank = true_class_rank(scores, labels)
    if require_positive:
        true_score = scores.gather(1, labels.to(scores.device).long()[:, None])[:, 0]
        rank = rank.masked_fill(~(true_score > 0), torch.iinfo(torch.int64).max)
    return {int(k): rank < int(k) for k in ks}


def topk_correct(
    scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5), require_positive: bool = False
) -> dict[int, int]:
    """Number of rows of ``scores`` (N, C) whose ``labels`` (N,) are within the top ``k``, per ``k``."""
    return {k: int(hits.sum()) for k, hits in topk_hits(scores, labels, ks, require_positive).items()}


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5), require_positive: bool = False
) -> dict[int, float]:
    """Top-k accuracy in percent (0-100) for each ``k``; see the module docstring for ties."""
    n = labels.shape[0]
    if n == 0:
        raise ValueError("cannot compute an accuracy over zero samples")
    return {k: 100.0 * c / n for k, c in topk_correct(scores, labels, ks, require_positive).items()}


def mean_per_class_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The top-1 accuracy (percent) of each class present in ``labels``, averaged over those classes
    (the metric of fine-grained benchmarks such as Pets, Flowers or Aircraft); same tie convention."""
    if labels.shape[0] == 0:
        raise ValueError("cannot compute an accuracy over zero samples")
    hits = topk_hits(scores, labels, (1,))[1]
    labels = labels.to(hits.device).long()
    total = torch.bincount(labels)
    correct = torch.bincount(labels[hits], minlength=len(total))
    present = total > 0
    return 100.0 * float((correct[present].double() / total[present].double()).mean())


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor) or callable(getattr(value, "tolist", None)):  # also numpy arrays, scalars
        return _jsonable(value.tolist())
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as indented JSON to ``path`` via a temporary file, fsync and a rename (never
    half-written; :func:`dinov2.checkpoint.training.atomic_write`)."""
    from dinov2.checkpoint.training import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    return path


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str], floatfmt: str = ".2f") -> str:
    """A plain-text table: a header, a rule and one line per row; floats formatted with ``floatfmt``."""

    def cell(value: Any) -> str:
        return format(value, floatfmt) if isinstance(value, float) else str(value)

    lines = [[str(h) for h in headers]] + [[cell(v) for v in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    out = ["  ".join(text.rjust(width) for text, width in zip(line, widths)) for line in lines]
    out.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(out)


def run_record(task: str, args: Any, data: Mapping[str, Any], seconds: Mapping[str, float], **results: Any) -> dict:
    """The results JSON of an evaluation entry point: ``task``, its ``results``, the sizes of the
    train/val features in ``data`` and its ``num_skipped`` (unreadable images left out, per split),
    the inputs named on the command line (with ``weights_read``: the checkpoint ``step_N`` that a
    run directory given as ``--pretrained-weights`` resolved to) and the timings."""
    return {
        "task": task,
        **results,
        "num_train": len(data["train_labels"]),
        "num_val": len(data["val_labels"]),
        "num_skipped": dict(data.get("num_skipped", {})),
        "config_file": args.config_file,
        "pretrained_weights": args.pretrained_weights,
        "weights_read": getattr(args, "weights_read", args.pretrained_weights),
        "train_dataset": args.train_dataset,
        "val_dataset": args.val_dataset,
        "seconds": dict(seconds),
    }
