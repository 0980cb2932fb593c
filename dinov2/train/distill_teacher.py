"""The frozen teacher of distillation: where its weights and its architecture come from.

``distillation.teacher_checkpoint`` names one of

* a pretraining run directory: its latest complete ``checkpoints/step_N``;
* a DCP training checkpoint ``.../checkpoints/step_N`` (it has ``.metadata``): the tensors under
  ``model.teacher.`` (backbone, DINO head, iBOT head) are read whole, without a process group;
* an export ``eval/training_N/teacher_checkpoint.pth`` (``{"teacher": {backbone.*, dino_head.*,
  ibot_head.*}}``, also the original code's format, old weight-norm key names accepted), or the
  ``eval/training_N`` directory holding it;
* a file holding a whole meta-architecture's state dict (``{"model": {...}}``, ``{"state_dict":
  {...}}`` or flat), whose ``teacher.*`` tensors are the teacher.

A backbone-only file (``teacher_backbone.safetensors``, a consolidated backbone, the released hub
weights) has no heads, and the distillation targets are the teacher's head outputs: it is refused
with a message saying what to pass instead.

The teacher's architecture and head shapes are the ``student``, ``dino``, ``ibot`` and ``crops``
sections of its own training config: ``distillation.teacher_config`` (a config name or path) when
set, else the ``config.yaml`` of the run the checkpoint belongs to. A teacher trained with
``ibot.separate_head: false`` has no iBOT head: its DINO head gave its own iBOT targets, and it
gives the distillation's (:func:`teacher_patch_head`).

Every process reads the whole teacher state (CPU) and loads its shard of it. The frozen teacher is
not part of the training checkpoints; it is read again from here when a run resumes, and
:func:`state_fingerprint` lets the meta-architecture check that it is still the same.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from dinov2.checkpoint import (
    load_backbone_state_dict,
    load_module_state_dict,
    load_weights_file,
)
from dinov2.checkpoint.adapters import branch_state_dict
from dinov2.checkpoint.consolidate import RUN_CONFIG, resolve_checkpoint, run_config_of
from dinov2.checkpoint.sharded import agreed_checkpoint, load_full_tensors
from dinov2.checkpoint.training import TEACHER_CHECKPOINT
from dinov2.utils.config import default_config_with, is_required_unset, load_config, select

logger = logging.getLogger("dinov2")

HEADS = ("dino_head", "ibot_head")


@dataclass(frozen=True)
class TeacherSource:
    """``kind``: ``"dcp"`` (a training checkpoint directory) or ``"file"`` (a weights file);
    ``run_dir``: the run the checkpoint belongs to, when it can be told from the path."""

    kind: str
    path: Path
    run_dir: Path | None


def _run_of(path: Path) -> Path | None:
    """The training run ``path`` (a checkpoint or an export of it) belongs to, if it has its
    ``config.yaml`` (:func:`~dinov2.checkpoint.consolidate.run_config_of`)."""
    run_config = run_config_of(path)
    return None if run_config is None else run_config.parent


def teacher_location(cfg: Any) -> Any:
    """``distillation.teacher_checkpoint``; None when unset (also when a config requires it: ``???``)."""
    if is_required_unset(cfg, "distillation.teacher_checkpoint"):
        return None
    return cfg.distillation.teacher_checkpoint


def resolve_teacher_source(location: Any) -> TeacherSource:
    """Where ``distillation.teacher_checkpoint`` points (see the module docstring)."""
    if not location:
        raise ValueError(
            "distillation.teacher_checkpoint is not set: pass the pretraining run directory, one of its "
            "checkpoints/step_N directories or an eval/training_N/teacher_checkpoint.pth, e.g. "
            "distillation.teacher_checkpoint=runs/vitg14"
        )
    path = Path(str(location)).expanduser()
    if path.is_file():
        return TeacherSource("file", path, _run_of(path))
    if not path.is_dir():
        raise FileNotFoundError(f"distillation.teacher_checkpoint {path} does not exist")
    if (path / TEACHER_CHECKPOINT).is_file():
        return TeacherSource("file", path / TEACHER_CHECKPOINT, _run_of(path / TEACHER_CHECKPOINT))
    try:
        # itself, or the latest under it or its checkpoints/: rank 0's pick on every rank (one reading the
        # directory stale, or the teacher run still saving, would load another teacher)
        checkpoint = agreed_checkpoint(
            lambda: resolve_checkpoint(path), f"resolving distillation.teacher_checkpoint={path}"
        )
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"distillation.teacher_checkpoint: {exc}, nor a {TEACHER_CHECKPOINT}") from exc
    return TeacherSource("dcp", checkpoint, _run_of(checkpoint))


def load_teacher_config(cfg: Any, source: TeacherSource) -> tuple[Any, str]:
    """The teacher's training config: ``distillation.teacher_config``, else its run's ``config.yaml``;
    with where it came from, for error messages."""
    named = select(cfg, "distillation.teacher_config", None)
    if named:
        return load_config(str(named)), f"distillation.teacher_config={named}"
    if source.run_dir is not None and (source.run_dir / RUN_CONFIG).is_file():
        # Written by the pretraining run itself: merged onto the defaults without the schema check,
        # so that a run saved by an older version of the code still reads.
        run_config = source.run_dir / RUN_CONFIG
        return default_config_with(OmegaConf.load(run_config)), str(run_config)
    if source.kind == "file":
        read_teacher_state(source)  # a backbone-only file: refused for what it is, not for its lack of config
    raise FileNotFoundError(
        f"cannot tell the teacher's architecture: no {RUN_CONFIG} of a training run next to {source.path}; "
        "set distillation.teacher_config=<the teacher's training config name or path> (e.g. vitg14)"
    )


def teacher_patch_head(teacher_cfg: Any) -> str:
    """The teacher head that scores patch tokens: ``ibot_head``, or ``dino_head`` for a teacher
    trained with ``ibot.separate_head: false`` (one head for both losses, as in its pretraining)."""
    return "ibot_head" if bool(teacher_cfg.ibot.separate_head) else "dino_head"


def teacher_prototypes(teacher_cfg: Any, section: str) -> int:
    """The number of prototypes of the teacher's targets for the ``dino`` or ``ibot`` loss."""
    if section == "ibot" and teacher_patch_head(teacher_cfg) == "dino_head":
        section = "dino"
    return int(teacher_cfg[section].head_n_prototypes)


def read_teacher_state(source: TeacherSource) -> dict[str, torch.Tensor]:
    """The teacher's tensors on CPU, keys ``backbone.*``, ``dino_head.*``, ``ibot_head.*``."""
    if source.kind == "dcp":
        return load_full_tensors(source.path, "model.teacher.")
    state = branch_state_dict(load_weights_file(source.path), "teacher")
    if not any(k.startswith(tuple(f"{h}." for h in HEADS)) for k in state):
        raise ValueError(
            f"{source.path} holds a backbone without the DINO/iBOT heads; distillation targets are the teacher's "
            f"head outputs. Pass the pretraining run directory, one of its checkpoints/step_N directories, or "
            f"its eval/training_N/{TEACHER_CHECKPOINT} (backbone + heads)"
        )
    return state


@torch.no_grad()
def load_teacher_(frozen: nn.ModuleDict, state: dict[str, torch.Tensor], source: str, architecture: str = "") -> None:
    """Load ``state`` (see :func:`read_teacher_state`) strictly into the frozen teacher's backbone
    (any block-chunk layout) and heads; ``architecture``: where the frozen teacher's shapes came from
    (:func:`load_teacher_config`), named when the checkpoint does not fit them."""
    built = f" (the frozen teacher as {architecture} describes it)" if architecture else ""
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise ValueError(f"{source} holds no teacher backbone ('backbone.' keys)")
    report = load_backbone_state_dict(frozen.backbone, backbone, source=f"{source}{built}")
    for name in HEADS:
        if name not in frozen:
            continue
        head = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(f"{name}.")}
        if not head:
            raise ValueError(
                f"{source} holds no teacher {name}, which {architecture or 'the teacher config'} says it has: "
                "the teacher must have been trained with it (dino.loss_weight > 0 for the DINO head, "
                "ibot.separate_head: true for the iBOT head)"
            )
        load_module_state_dict(frozen[name], head, f"{source} ({name}){built}")
    logger.info(
        "frozen teacher loaded from %s (%s; heads: %s)", source, report, ", ".join(n for n in HEADS if n in frozen)
    )


def state_fingerprint(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[number of values, sum, sum of squares]`` in float64 over ``state`` (sorted keys): a cheap
    check that a resumed run reloads the teacher it started with."""
    total = torch.zeros(3, dtype=torch.float64)
    for key in sorted(state):
        values = state[key].detach().to("cpu", torch.float64)
        total += torch.stack(
            [torch.tensor(float(values.numel()), dtype=torch.float64), values.sum(), values.square().sum()]
        )
    return total
