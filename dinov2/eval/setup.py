"""What every evaluation entry point shares: arguments, device, process group, the frozen backbone.

``build_eval_model`` turns a config (a training config or one of ``configs/eval/*.yaml``, which
name the released architectures) and a weights file into a frozen backbone in eval mode:

* ``{"teacher": {...}}`` training checkpoints, official ``dinov2_*_pretrain.pth`` backbones and
  ``.safetensors`` exports all load through :func:`dinov2.checkpoint.load_backbone_state_dict`,
  which raises :class:`~dinov2.checkpoint.StateDictMismatchError` (naming the keys) when the
  weights do not fit the architecture;
* no weights (``None`` or ``""``) keeps the random initialisation, with a warning: the baseline.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from dinov2 import distributed
from dinov2.checkpoint import load_backbone_state_dict, load_weights_file
from dinov2.models import build_model
from dinov2.utils.config import load_config

logger = logging.getLogger("dinov2")

_AUTOCAST_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


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
        help="training config (name under configs/train or path) or eval config (configs/eval/*.yaml) naming the arch",
    )
    parser.add_argument(
        "--pretrained-weights",
        default="",
        help="teacher checkpoint, official backbone .pth or .safetensors (path or URL); empty: random init",
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
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return device


def autocast_dtype_for(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA where supported, else fp16; ``None`` (full precision) on the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def init_distributed(device: torch.device) -> bool:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``); no-op otherwise.

    Returns whether a process group is active. NCCL on CUDA, gloo on the CPU.
    """
    if distributed.is_enabled():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def build_eval_model(
    config_file: str | None,
    pretrained_weights: str | None,
    opts: Sequence[str] = (),
    device: str | torch.device = "auto",
) -> tuple[nn.Module, DictConfig]:
    """The frozen backbone of ``config_file`` with ``pretrained_weights``, in eval mode on ``device``."""
    cfg = load_config(config_file or None, list(opts))
    model, _ = build_model(cfg.student, only_teacher=True, img_size=cfg.crops.global_crops_size)
    if pretrained_weights:
        checkpoint = load_weights_file(pretrained_weights)
        report = load_backbone_state_dict(model, checkpoint, source=str(pretrained_weights))
        logger.info("Loaded %s backbone weights from %s (%s)", cfg.student.arch, pretrained_weights, report)
    else:
        logger.warning("No --pretrained-weights given: evaluating a randomly initialised %s", cfg.student.arch)
    model.eval()
    model.requires_grad_(False)
    return model.to(resolve_device(device)), cfg


def _configured_autocast(cfg: DictConfig, device: torch.device) -> torch.dtype | None:
    """``compute_precision.autocast_dtype`` from the config; ``auto`` picks by device."""
    name = str(cfg.get("compute_precision", {}).get("autocast_dtype", "auto")).lower()
    if name == "auto" or device.type != "cuda":
        return autocast_dtype_for(device)
    if name not in _AUTOCAST_NAMES:
        raise ValueError(f"compute_precision.autocast_dtype must be auto, bf16, fp16 or fp32, got {name!r}")
    return _AUTOCAST_NAMES[name]


def setup_logging(level: int = logging.INFO) -> None:
    """Log the ``dinov2`` logger to stderr on rank 0 (warnings only elsewhere), once."""
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level if distributed.is_main_process() else logging.WARNING)
    logger.propagate = False


def setup_and_build_model(args: argparse.Namespace) -> tuple[nn.Module, torch.dtype | None, DictConfig]:
    """Entry-point setup: device, process group (torchrun), logging, output dir, frozen model.

    Returns ``(model, autocast_dtype, config)``.
    """
    device = resolve_device(getattr(args, "device", "auto"))
    init_distributed(device)
    setup_logging()
    output_dir = getattr(args, "output_dir", "")
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    model, cfg = build_eval_model(args.config_file, args.pretrained_weights, getattr(args, "opts", ()), device)
    autocast_dtype = _configured_autocast(cfg, device)
    logger.info("Evaluating on %s (autocast %s, world size %d)", device, autocast_dtype, distributed.get_world_size())
    return model, autocast_dtype, cfg
