"""``train.init_from``: start a new run from the weights of an earlier one.

This is how the high-resolution phase (configs/train/*_highres518.yaml) starts from a pretraining
run: the student, the teacher (backbones and heads) and the loss centres are loaded; the optimizer
state, the schedules, the iteration counter and the data stream start fresh, as in any new run.

``train.init_from`` may name

- a DCP training checkpoint ``step_NNNNNNN/``, a ``checkpoints/`` directory or a run's output
  directory (its newest checkpoint): every module is read whole (:func:`load_full_tensors`, no
  process group needed) and loaded into the plain or FSDP2-sharded model;
- a file holding a whole meta-architecture's state dict (``student.*`` and ``teacher.*`` keys,
  ``dino_loss.center``, ``ibot_patch_loss.center``; flat or under ``model`` / ``state_dict``, as the
  original code's training checkpoint of a one-GPU run holds it): loaded as a training checkpoint
  is, each branch from its own tensors, and the loss centres. The original's checkpoints of a run
  on several GPUs (``model_N.rank_R.pth``, FSDP ``LOCAL_STATE_DICT``) hold each rank's flattened
  shards as ``ShardedTensor`` objects, not whole tensors: they are refused, naming the run's export
  (``eval/training_N/teacher_checkpoint.pth``) to start from instead;
- any other weights file (a consolidated ``.pth`` / ``.safetensors``, an exported
  ``teacher_checkpoint.pth``, released weights; a path or a URL): student = teacher = that backbone,
  and the same for the heads the file holds (an export holds the teacher's DINO and iBOT heads;
  backbone-only files none); the other heads and the loss centres keep their fresh initialisation
  (logged).

The centres are carried over whatever ``train.centering`` is: only softmax-centering reads them,
and a Sinkhorn-Knopp run never updates them (they stay at the zeros a fresh run starts from), so
loading them changes something only when both runs centre with softmax-centering (logged).

A ``pos_embed`` stored for another image size is resampled to the model's grid by the adapters
(:mod:`dinov2.checkpoint.adapters`). A run that already has checkpoints in its own output
directory resumes from them and ignores ``train.init_from``.
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinov2.checkpoint import (
    adapt_backbone_state_dict,
    adapt_head_state_dict,
    agreed_latest_checkpoint,
    load_backbone_state_dict,
    load_module_state_dict,
    load_weights_file,
)
from dinov2.checkpoint.adapters import branch_state_dict, strip_wrapper_keys
from dinov2.checkpoint.consolidate import resolve_checkpoint
from dinov2.checkpoint.io import is_url
from dinov2.checkpoint.sharded import agreed_checkpoint, load_full_tensors
from dinov2.utils.config import ConfigError, is_required_unset

logger = logging.getLogger("dinov2")

KEY = "train.init_from"
BRANCHES = ("student", "teacher")
LOSSES_WITH_CENTRES = ("dino_loss", "ibot_patch_loss")


@dataclass(frozen=True)
class InitSource:
    """What ``train.init_from`` resolved to: a training checkpoint directory or a backbone file."""

    location: str
    kind: str  # "checkpoint" | "backbone"


def _required_unset(cfg: Any) -> bool:
    return is_required_unset(cfg, KEY)


def _setting(cfg: Any) -> str | None:
    """The value of ``train.init_from``; raises naming the key when a config requires it (``???``)."""
    if _required_unset(cfg):
        raise ConfigError(
            f"{KEY} is required by this config: pass {KEY}=PATH (a pretraining run's output directory, "
            "one of its checkpoints/step_N directories, or a backbone weights file)"
        )
    value = cfg.train.get("init_from") if hasattr(cfg.train, "get") else getattr(cfg.train, "init_from", None)
    return str(value) if value not in (None, "") else None


def resolve_init_source(cfg: Any, checkpoint_dir: str | Path, resume: bool) -> InitSource | None:
    """What the new run starts from: None when ``train.init_from`` is null, or when the run resumes
    from a checkpoint of its own in ``checkpoint_dir`` (then ``train.init_from`` is ignored). Raises
    naming the key when it is required but not given, or when its path holds nothing to load."""
    checkpoint_dir = Path(checkpoint_dir)
    if resume and agreed_latest_checkpoint(checkpoint_dir) is not None:
        _refuse_own_checkpoints(cfg, checkpoint_dir)
        logger.info("%s ignored: resuming from this run's own checkpoints in %s", KEY, checkpoint_dir)
        return None
    value = _setting(cfg)
    if value is None:
        return None
    _refuse_own_checkpoints(cfg, checkpoint_dir)  # also with --no-resume, before the directory is touched
    if is_url(value):
        return InitSource(value, "backbone")
    path = Path(value).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{KEY}={value!r}: no such file or directory")
    if path.is_file():
        if not resume:
            _refuse_file_set_aside(value, path, checkpoint_dir.parent)
        return InitSource(str(path), "backbone")
    try:  # rank 0's pick on every rank: the source run may still save (and prune), or a node list it stale
        return InitSource(str(agreed_checkpoint(lambda: resolve_checkpoint(path), f"resolving {KEY}={value!r}")),
                          "checkpoint")  # fmt: skip
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{KEY}={value!r}: {exc}") from exc


def _refuse_own_checkpoints(cfg: Any, checkpoint_dir: Path) -> None:
    """Raise when ``train.init_from`` points at this very run's checkpoints (the usual slip: the
    high-res phase started without a new ``--output-dir``, which would resume pretraining, or with
    ``--no-resume``, which would set those checkpoints aside before loading them)."""
    value = None if _required_unset(cfg) else _setting(cfg)
    if value is None:
        return
    target = Path(value).expanduser()
    if target.is_dir() and not is_url(value):
        try:
            resolved = resolve_checkpoint(target).resolve()
        except FileNotFoundError:
            resolved = None
        if resolved is not None and resolved.is_relative_to(checkpoint_dir.resolve()):
            raise ValueError(
                f"{KEY}={value!r} is this run's own checkpoint ({resolved}): a run started from another "
                "run's weights needs a new --output-dir"
            )


def _refuse_file_set_aside(value: str, path: Path, output_dir: Path) -> None:
    """``--no-resume`` moves the earlier run's outputs (``eval/`` exports among them) into
    ``replaced_*/`` before the weights are loaded: a file among them would be gone by then."""
    from dinov2.train.train import RUN_OUTPUTS

    # Through the path as written (a symlink among the outputs moves with them) or where it points.
    given, target = Path(os.path.abspath(path)), path.resolve()
    for name in RUN_OUTPUTS:
        moved = output_dir / name
        if given.is_relative_to(os.path.abspath(moved)) or target.is_relative_to(moved.resolve()):
            raise ValueError(
                f"{KEY}={value!r} is inside this run's {name}/, which --no-resume moves aside before the weights "
                "are loaded: copy the file elsewhere first, or use a new --output-dir"
            )


@torch.no_grad()
def load_init_source(model: nn.Module, source: InitSource) -> None:
    """Load ``source`` into the (materialised, initialised, possibly sharded) meta-architecture."""
    if source.kind == "backbone":
        _load_backbone_file(model, source.location)
    elif source.kind == "checkpoint":
        _load_training_checkpoint(model, Path(source.location))
    else:
        raise ValueError(f"unknown init source kind {source.kind!r}")


def _read(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    try:
        return load_full_tensors(path, prefix)
    except KeyError as exc:
        raise KeyError(f"{KEY}: checkpoint {path} holds no {prefix.removeprefix('model.')[:-1]} ({exc})") from exc


def _load_training_checkpoint(model: nn.Module, path: Path) -> None:
    """Each module of both branches and the loss centres, read whole one module at a time."""
    _load_branches_and_centres(model, lambda prefix: _read(path, f"model.{prefix}"), str(path))


def _load_branches_and_centres(model: nn.Module, read: Callable[[str], dict], source: str) -> None:
    """``read(prefix)``: the tensors under ``prefix`` (``student.backbone.``, ..., ``dino_loss.``),
    keys without it; an empty dict (a whole-model file without that head or centre) keeps the
    module's fresh initialisation, which is logged."""
    fresh = []
    for branch in BRANCHES:
        for name, module in getattr(model, branch).items():
            prefix = f"{branch}.{name}."
            state = read(prefix)
            if not state and name == "backbone":  # heads may stay fresh; a backbone may not
                raise ValueError(f"{KEY}: {source} holds no {prefix[:-1]} weights (no key under {prefix!r})")
            if not state:
                fresh.append(prefix[:-1])
                continue
            if name == "backbone":
                report = load_backbone_state_dict(module, state, source=f"{source} ({prefix[:-1]})")
                if report.pos_embed_grid is not None:
                    old, new = report.pos_embed_grid
                    logger.info("%s: %s.backbone pos_embed %dx%d -> %dx%d", KEY, branch, old, old, new, new)
            else:
                load_module_state_dict(module, state, source=f"{source} ({prefix[:-1]})")
            del state
    loaded = []
    for name in LOSSES_WITH_CENTRES:
        state = read(f"{name}.")
        if not state:
            fresh.append(f"{name}.center")
            continue
        load_module_state_dict(getattr(model, name), state, source=f"{source} ({name})")
        loaded.append(name)
    logger.info(
        "%s=%s: student and teacher (backbones and heads) and loss centres loaded; optimizer, schedules, "
        "iteration counter and data stream start fresh%s",
        KEY,
        source,
        f" (not in the file, fresh: {', '.join(fresh)})" if fresh else "",
    )
    _log_centres(model, loaded)


def _log_centres(model: nn.Module, loaded: list[str]) -> None:
    """Say what the loaded centres do in this run: only softmax-centering reads them."""
    centering = getattr(getattr(getattr(model, "cfg", None), "train", None), "centering", None)
    if not loaded or centering is None:
        return
    if centering != "centering":
        logger.info("%s: the loss centres are loaded but unused: this run centres with %s", KEY, centering)
    elif all(not getattr(model, name).center.any() for name in loaded):
        logger.info(
            "%s: the loaded loss centres are zero (the source run did not use softmax-centering): this run's "
            "softmax-centering starts from zero, as a fresh run would",
            KEY,
        )


def _whole_model_state(raw: Mapping) -> dict[str, torch.Tensor] | None:
    """The tensors of a file holding a whole meta-architecture's state dict (``student.*`` and
    ``teacher.*`` keys; flat or under ``model`` / ``state_dict``), wrapper segments stripped; None
    for any other file (an export ``{"teacher": ...}``, a backbone)."""
    if not isinstance(raw, Mapping):
        return None  # the backbone path names what the file holds instead
    state = raw
    for container in ("model", "state_dict"):
        if isinstance(raw.get(container), Mapping):
            state = raw[container]
            break
    tensors = strip_wrapper_keys({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    if all(any(k.startswith(f"{branch}.") for k in tensors) for branch in BRANCHES):
        return tensors
    return None


def _load_whole_model_file(model: nn.Module, state: dict[str, torch.Tensor], location: str) -> None:
    """Each branch from its own tensors (heads with old weight-norm names accepted), and the centres."""
    branches = {branch: branch_state_dict(state, branch) for branch in BRANCHES}

    def read(prefix: str) -> dict[str, torch.Tensor]:
        branch, _, rest = prefix.partition(".")
        tensors = branches[branch] if branch in branches else state
        key = rest if branch in branches else prefix
        return {k[len(key) :]: v for k, v in tensors.items() if k.startswith(key)}

    _load_branches_and_centres(model, read, location)


def _read_weights_file(location: str) -> Any:
    """:func:`load_weights_file`, with the original's per-rank FSDP checkpoints named for what they are."""
    try:
        return load_weights_file(location)
    except pickle.UnpicklingError as exc:
        if "ShardedTensor" not in str(exc):
            raise
        raise ValueError(
            f"{KEY}={location!r} holds FSDP ShardedTensors: a training checkpoint of the original implementation "
            "saved on several GPUs (model_N.rank_R.pth, FSDP LOCAL_STATE_DICT) stores each rank's flattened shards, "
            "not whole tensors, and cannot be loaded here (do not load it with weights_only=False either). Start "
            "from that run's export eval/training_N/teacher_checkpoint.pth (teacher backbone and heads) instead"
        ) from exc


def _load_backbone_file(model: nn.Module, location: str) -> None:
    """A whole meta-architecture's state dict: as a training checkpoint. Any other file: student =
    teacher = the file's backbone, and the same for each head the file holds (an exported ``teacher_checkpoint.pth`` holds the teacher's DINO and iBOT
    heads); the other heads and the loss centres stay fresh."""
    raw = _read_weights_file(location)
    whole = _whole_model_state(raw)
    if whole is not None:
        _load_whole_model_file(model, whole, location)
        return
    state, report = adapt_backbone_state_dict(raw, model.student.backbone)
    for branch in BRANCHES:
        load_module_state_dict(getattr(model, branch).backbone, state, source=location)
    loaded, fresh = [], []
    for name in (n for n in model.student if n != "backbone"):
        head = adapt_head_state_dict(raw, name)
        if not head:
            fresh.append(name)
            continue
        for branch in BRANCHES:
            load_module_state_dict(getattr(model, branch)[name], head, source=f"{location} ({name})")
        loaded.append(name)
    logger.info(
        "%s=%s is a weights file (%s): student and teacher backbones%s loaded from it; %s keep their fresh "
        "initialisation (train.seed); optimizer, schedules, iteration counter and data stream start fresh",
        KEY,
        location,
        report,
        "".join(f" and {n}" for n in loaded),
        " and ".join([*fresh, "the loss centres"]),
    )
