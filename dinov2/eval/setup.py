"""What every evaluation entry point shares: arguments, device, process group, the frozen backbone.

``build_eval_model`` turns a config (a training config or one of ``configs/eval/*.yaml``, which
name the released architectures) and a weights file into a frozen backbone in eval mode:

* sharded training checkpoint directories (their teacher backbone), ``{"teacher": {...}}`` files,
  official ``dinov2_*_pretrain.pth`` backbones and ``.safetensors`` exports all load through
  :func:`dinov2.checkpoint.load_backbone_state_dict`, which raises
  :class:`~dinov2.checkpoint.StateDictMismatchError` (naming the keys) when the weights do not fit
  the architecture;
* no weights (``None`` or ``""``) keeps the random initialisation, with a warning: the baseline.

Without a config, weights that belong to a training run (``OUT``, ``OUT/checkpoints[/step_N]``,
``OUT/eval/training_N[/file]``) take the architecture from that run's ``OUT/config.yaml``
(:func:`run_config_of`), as ``distillation.teacher_checkpoint`` does.

``build_eval_model`` is not a collective: a run directory is resolved to the latest checkpoint this
process sees. Under several ranks the entry points (:func:`setup_and_build_model`) first take rank
0's pick on every rank (:func:`agreed_pretrained_weights`), as training's ``train.init_from`` does.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn

from dinov2 import distributed
from dinov2.checkpoint import load_backbone_state_dict, load_weights_file
from dinov2.checkpoint.consolidate import run_config_of
from dinov2.checkpoint.training import TEACHER_CHECKPOINT
from dinov2.models import build_model
from dinov2.utils import device as device_utils
from dinov2.utils.config import load_config
from dinov2.utils.logging import setup_logging

logger = logging.getLogger("dinov2")


def get_args_parser(
    description: str | None = None,
    add_help: bool = True,
    parents: Sequence[argparse.ArgumentParser] | None = None,
) -> argparse.ArgumentParser:
    """The arguments shared by ``knn.py``, ``linear.py``, ``log_regression.py``, ...

    Trailing ``key=value`` words (``opts``) override the config, e.g. ``student.attn_backend=math``.
    """
    parser = argparse.ArgumentParser(description=description, parents=list(parents or []), add_help=add_help)
    parser.add_argument(
        "--config-file",
        "--config",
        dest="config_file",
        default="",
        help="training config (name under configs/train or path) or eval config (configs/eval/*.yaml) naming the arch; "
        "empty: the config.yaml of the run the weights belong to, else the default config",
    )
    parser.add_argument(
        "--pretrained-weights",
        default="",
        help="training run or checkpoint dir, eval/training_N export (dir or file), backbone .pth or .safetensors "
        "(path or URL); empty: random init",
    )
    parser.add_argument("--output-dir", default=".", help="where results (JSON) and logs are written")
    parser.add_argument("--train-dataset", default="ImageNet:split=TRAIN", help="dataset string, see make_dataset")
    parser.add_argument("--val-dataset", default="ImageNet:split=VAL", help="dataset string, see make_dataset")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass and process")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="data loader workers")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU) | cpu | cuda | cuda:N")
    parser.add_argument("opts", nargs="*", default=[], help="config overrides, key=value (after the options)")
    return parser


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: this process's CUDA device (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    return device_utils.resolve_device(name)


def autocast_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA where supported, else fp16; ``None`` (full precision) on the CPU."""
    return device_utils.resolve_autocast_dtype("auto", torch.device(device))


class BackboneLoadError(RuntimeError):
    """Another rank could not build the backbone or read its weights (the message names it and its error)."""


def _checkpoint_search_path(location: str | os.PathLike) -> Path | None:
    """The directory in which ``location`` names a sharded training checkpoint (``OUT/checkpoints/step_N``
    itself, ``OUT/checkpoints`` or ``OUT``, see :func:`~dinov2.checkpoint.consolidate.resolve_checkpoint`),
    or None for a URL, a file, a missing path or an export directory (``OUT/eval/training_N``)."""
    from dinov2.checkpoint.io import expand_user, is_url

    if is_url(str(location)):
        return None
    path = expand_user(location)
    if not path.is_dir() or (path / TEACHER_CHECKPOINT).is_file():
        return None
    return path


def agreed_pretrained_weights(location: str | os.PathLike | None) -> str | None:
    """``location`` as every rank is to read it: a training run or checkpoints directory (``OUT``,
    ``OUT/checkpoints``) becomes the checkpoint ``OUT/checkpoints/step_N`` that rank 0 finds latest
    there, on every rank (:func:`~dinov2.checkpoint.sharded.agreed_checkpoint`); anything else is
    returned as given. A collective where a process group exists: every rank must call it.

    Each rank resolving the directory itself could read another step where the run still saves (or
    prunes) its checkpoints, or a node lists the shared file system stale: the ranks would then
    evaluate different weights, or one would stop alone. Here rank 0 chooses; a rank that does not
    see that checkpoint whole stops every rank with
    :class:`~dinov2.checkpoint.sharded.CheckpointNotVisibleError` naming it, and so does a
    directory that holds no checkpoint (rank 0's ``FileNotFoundError``)."""
    if not location:
        return location
    from dinov2.checkpoint.consolidate import resolve_checkpoint
    from dinov2.checkpoint.sharded import agreed_checkpoint

    def find() -> Path | None:
        if distributed.get_rank() != 0:
            return None
        path = _checkpoint_search_path(location)
        return None if path is None else resolve_checkpoint(path)

    chosen = agreed_checkpoint(find, f"resolving --pretrained-weights {str(location)!r}")
    return str(location) if chosen is None else str(chosen)


def read_pretrained_weights(location: str | os.PathLike) -> dict:
    """The tensors of ``--pretrained-weights``: a weights file (path or URL, :func:`load_weights_file`),
    or a sharded training checkpoint directory (``OUT/checkpoints/step_N``, or ``OUT`` or
    ``OUT/checkpoints`` for the run's latest), whose teacher backbone is read whole (weights only),
    or an export directory ``OUT/eval/training_N`` (its ``teacher_checkpoint.pth``)."""
    from dinov2.checkpoint.io import expand_user

    path = _checkpoint_search_path(location)
    if path is None:  # a file or URL, or an export directory OUT/eval/training_N (the only directory left)
        directory = expand_user(location)
        return load_weights_file(directory / TEACHER_CHECKPOINT if directory.is_dir() else location)
    from dinov2.checkpoint.consolidate import resolve_checkpoint
    from dinov2.checkpoint.sharded import load_full_tensors

    checkpoint = resolve_checkpoint(path)
    logger.info("Reading the teacher backbone of training checkpoint %s", checkpoint)
    try:
        return load_full_tensors(checkpoint, "model.teacher.backbone.")
    except KeyError as error:
        raise ValueError(f"training checkpoint {checkpoint} holds no teacher backbone: {error}") from error


def resolve_config_file(config_file: str | None, pretrained_weights: str | None) -> str | None:
    """``config_file``, or when it is empty the ``config.yaml`` of the run the weights come from
    (logged), else None (the default config)."""
    if config_file:
        return config_file
    run_config = run_config_of(pretrained_weights)
    if run_config is None:
        return None
    logger.info(
        "No --config-file given: the architecture of %s is read from its run's %s", pretrained_weights, run_config
    )
    return str(run_config)


def build_eval_model(
    config_file: str | None,
    pretrained_weights: str | None,
    opts: Sequence[str] = (),
    device: str | torch.device = "auto",
) -> tuple[nn.Module, DictConfig]:
    """The frozen backbone of ``config_file`` with ``pretrained_weights``, in eval mode on ``device``.
    An empty ``config_file`` means the run's ``config.yaml`` for weights of a training run
    (:func:`resolve_config_file`), else the default config. Runs in this process alone (no
    collective): under several ranks pass ``agreed_pretrained_weights(location)``, which every rank
    must call, so that a run directory means the same checkpoint on every rank."""
    cfg = load_config(resolve_config_file(config_file, pretrained_weights), list(opts))
    model, _ = build_model(cfg.student, only_teacher=True, img_size=cfg.crops.global_crops_size)
    if pretrained_weights:
        checkpoint = read_pretrained_weights(pretrained_weights)
        report = load_backbone_state_dict(model, checkpoint, source=str(pretrained_weights))
        logger.info("Loaded %s backbone weights from %s (%s)", cfg.student.arch, pretrained_weights, report)
    else:
        start = cfg.student.get("pretrained_weights") or ""
        logger.warning(
            "No --pretrained-weights given: evaluating a randomly initialised %s%s",
            cfg.student.arch,
            f" (the config's student.pretrained_weights={start!r} is where a training run starts, not what an "
            "evaluation reads: pass it as --pretrained-weights to evaluate those weights)"
            if start
            else "",
        )
    model.eval()
    model.requires_grad_(False)
    return model.to(resolve_device(device)), cfg


def setup_and_build_model(args: argparse.Namespace) -> tuple[nn.Module, torch.dtype | None, DictConfig]:
    """Entry-point setup: device, process group (torchrun), logging (console and ``OUTPUT/log.txt``),
    the frozen model, TF32 on CUDA as ``compute_precision.tf32`` says, autocast from
    ``compute_precision.autocast_dtype``. Every rank must call it: weights given as a training run's
    directory are rank 0's pick of its checkpoints (:func:`agreed_pretrained_weights`), and a rank
    that fails to build the model stops every rank (the others with :class:`BackboneLoadError`).

    Returns ``(model, autocast_dtype, config)``.
    """
    device = resolve_device(getattr(args, "device", "auto"))
    distributed.init_from_env(device)
    output_dir = getattr(args, "output_dir", "") or None
    setup_logging(output_dir, rank=distributed.get_rank())
    # recorded as the results' config_file: the run's config.yaml when that is where the architecture came from
    args.config_file = resolve_config_file(args.config_file, args.pretrained_weights) or ""
    # a run directory: rank 0's latest checkpoint on every rank; a rank that cannot build the model or
    # read its weights stops every rank, instead of leaving them waiting in the first feature gather
    weights = agreed_pretrained_weights(args.pretrained_weights)
    args.weights_read = weights or ""  # recorded in the results: the step a run directory resolved to
    model, cfg = distributed.on_every_rank(
        lambda: build_eval_model(args.config_file, weights, getattr(args, "opts", ()), device),
        f"building the backbone (--pretrained-weights {args.pretrained_weights!r})", BackboneLoadError,
    )  # fmt: skip
    device_utils.enable_tf32(device, bool(cfg.compute_precision.tf32))
    autocast_dtype = device_utils.resolve_autocast_dtype(cfg.compute_precision.autocast_dtype, device)
    logger.info("Evaluating on %s (autocast %s, world size %d)", device, autocast_dtype, distributed.get_world_size())
    return model, autocast_dtype, cfg
