"""Distillation of a large pretrained model into a smaller one (DINOv2 paper, section 5).

The training loop of pretraining with these exceptions: a larger pretrained model is a frozen
teacher, the student has no masking and no stochastic depth, the iBOT loss is applied to every
patch token of the two global crops, and a spare EMA of the student, which does not influence
training, is the final model.

Modules (the names the loop, the checkpoints and the exports rely on):

    student         backbone + dino_head + ibot_head   trained by the distillation losses only
    teacher         the same, the spare EMA of student updated by update_teacher(m); exported and
                    evaluated (online k-NN) like the pretraining teacher, the model a run produces
    frozen_teacher  backbone + dino_head + ibot_head of a pretraining checkpoint; eval mode, no
                    gradients, never updated; sharded with compute_precision.teacher's policies;
                    left out of training checkpoints and reloaded from distillation.teacher_checkpoint
                    (a teacher trained with ibot.separate_head: false has no ibot_head: its
                    dino_head scores the patch tokens, as in its own pretraining)

Data flow of one step:

    batch -> _teacher_targets: frozen teacher on the 2 global crops (no grad) -> its DINO head on the
             CLS tokens (views swapped), its iBOT head on ALL patch tokens -> centring
          -> _student_outputs: student on [global crops (no masks), local crops (if any)] in one nested pass
             -> DINO head on every CLS token, iBOT head on every global-crop patch token
          -> _losses: DINO (local and global crops), KoLeo, iBOT over all patches
          -> {"loss": total, per-term values}
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from dinov2.checkpoint import load_backbone_state_dict, load_weights_file
from dinov2.distributed import local_tensor
from dinov2.layers.block import Block
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.models import build_model
from dinov2.models.init import seeded_init_
from dinov2.train.distill_teacher import (
    load_teacher_,
    load_teacher_config,
    read_teacher_state,
    resolve_teacher_source,
    state_fingerprint,
    teacher_location,
    teacher_patch_head,
    teacher_prototypes,
)
from dinov2.train.ssl_meta_arch import (
    CENTERINGS,
    N_GLOBAL_CROPS,
    build_head,
    center_teacher_scores,
    check_loss_weights,
    dino_crop_losses,
    ema_update_,
    koleo_term,
    student_crop_groups,
    teacher_as_student,
    weighted_total,
)

logger = logging.getLogger("dinov2")

FROZEN_TEACHER = "frozen_teacher"


class TeacherChangedError(RuntimeError):
    """A resumed distillation run found other teacher weights than the ones it started with."""


def _student_section(cfg: Any) -> dict[str, Any]:
    """``cfg.student`` with ``drop_path_rate`` forced to 0: the paper removes stochastic depth."""
    section = {key: cfg.student[key] for key in cfg.student}
    if float(section.get("drop_path_rate") or 0.0) > 0:
        logger.warning(
            "distillation trains the student without stochastic depth: student.drop_path_rate=%s is ignored",
            section["drop_path_rate"],
        )
    section["drop_path_rate"] = 0.0
    return section


def _teacher_section(teacher_cfg: Any, cfg: Any) -> dict[str, Any]:
    """The teacher's backbone settings, with this run's attention kernel (weights do not depend on it)."""
    section = {key: teacher_cfg.student[key] for key in teacher_cfg.student}
    section["attn_backend"] = cfg.student.attn_backend
    return section


def _check_config(cfg: Any, teacher_cfg: Any, origin: str) -> None:
    """``origin``: where ``teacher_cfg`` came from (named in the errors about the teacher)."""
    if cfg.train.centering not in CENTERINGS:
        raise ValueError(f"train.centering={cfg.train.centering!r}; valid: {', '.join(CENTERINGS)}")
    check_loss_weights(cfg)
    if float(cfg.ibot.mask_sample_probability) > 0:
        logger.warning(
            "distillation trains the student without masking: the batch's iBOT masks "
            "(ibot.mask_sample_probability=%s) are drawn but ignored; set it to 0 to skip drawing them",
            cfg.ibot.mask_sample_probability,
        )
    if cfg.ibot.loss_weight > 0 and not cfg.ibot.separate_head:
        raise ValueError(
            "distillation needs ibot.separate_head: true (the student's iBOT head learns the teacher's patch targets)"
        )
    if int(teacher_cfg.student.patch_size) != int(cfg.student.patch_size):
        raise ValueError(
            f"teacher patch size {teacher_cfg.student.patch_size} (from {origin}) != student.patch_size "
            f"{cfg.student.patch_size}: the iBOT loss pairs teacher and student patch tokens one to one"
        )
    for section in ("dino", "ibot"):
        if cfg[section].loss_weight <= 0:
            continue  # no such term: the student's head is not built
        ours, theirs = int(cfg[section].head_n_prototypes), teacher_prototypes(teacher_cfg, section)
        head = teacher_patch_head(teacher_cfg) if section == "ibot" else "dino_head"
        if ours != theirs:
            raise ValueError(
                f"{section}.head_n_prototypes={ours} but the teacher's {section} targets come from its {head}, which "
                f"has {theirs} prototypes (per {origin}); the student's heads predict the teacher's prototypes: set "
                f"{section}.head_n_prototypes={theirs}"
            )


class DistillMetaArch(nn.Module):
    # For dinov2.distributed.parallelize: (attribute, compute_precision section).
    parallel_roles = (("student", "student"), ("teacher", "teacher"), (FROZEN_TEACHER, "teacher"))

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher_source = resolve_teacher_source(teacher_location(cfg))
        teacher_cfg, self.teacher_origin = load_teacher_config(cfg, self.teacher_source)
        _check_config(cfg, teacher_cfg, self.teacher_origin)
        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.teacher_patch_head = teacher_patch_head(teacher_cfg)  # scores the teacher's patch tokens
        wanted = {"dino_head": self.do_dino, "ibot_head": self.do_ibot}
        frozen_wanted = {"dino_head": self.do_dino, "ibot_head": False}
        frozen_wanted[self.teacher_patch_head] |= self.do_ibot

        student_backbone, ema_backbone, embed_dim = build_model(
            _student_section(cfg), img_size=cfg.crops.global_crops_size
        )
        student, ema = {"backbone": student_backbone}, {"backbone": ema_backbone}
        # The teacher keeps the image size it was trained at (its position-embedding grid); the
        # backbone resamples the embeddings to the crops it is given.
        frozen_backbone, teacher_dim = build_model(
            _teacher_section(teacher_cfg, cfg), only_teacher=True, img_size=teacher_cfg.crops.global_crops_size
        )
        frozen = {"backbone": frozen_backbone}
        for name, section in (("dino_head", "dino"), ("ibot_head", "ibot")):
            if wanted[name]:
                student[name], ema[name] = build_head(cfg[section], embed_dim), build_head(cfg[section], embed_dim)
            if frozen_wanted[name]:
                frozen[name] = build_head(teacher_cfg[section], teacher_dim)
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(ema)  # the spare EMA of the student (see the module docstring)
        self.frozen_teacher = nn.ModuleDict(frozen)
        self.teacher.requires_grad_(False)
        self.frozen_teacher.requires_grad_(False)
        # No masking: the student's mask token gets no gradient, so it is not trained (nor given
        # optimizer state); it stays at its initial zero and keeps the published layout.
        self.student.backbone.mask_token.requires_grad_(False)
        self.embed_dim = embed_dim
        if any(b.sample_drop_ratio > 0 for b in self.student.modules() if isinstance(b, Block)):
            raise AssertionError("the distillation student must have no stochastic depth")

        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.koleo_loss = KoLeoLoss()
        self.ibot_patch_loss = iBOTPatchLoss(cfg.ibot.head_n_prototypes)
        # [values, sum, sum of squares] of the teacher this run started from; saved with checkpoints.
        self.register_buffer("teacher_fingerprint", torch.zeros(3, dtype=torch.float64))
        self._loaded_fingerprint: torch.Tensor | None = None
        self._fingerprint_checked = False
        if not self.is_meta:  # on the meta device the builder initialises after sharding
            self.init_weights(int(cfg.train.seed))

    @property
    def is_meta(self) -> bool:
        return next(self.student.parameters()).is_meta

    # ------------------------------------------------------------------ weights and checkpoints
    def _trained_part(self) -> nn.ModuleDict:
        """Student, EMA and loss centres, under their own names."""
        return nn.ModuleDict(
            {"student": self.student, "teacher": self.teacher, "dino_loss": self.dino_loss,
             "koleo_loss": self.koleo_loss, "ibot_patch_loss": self.ibot_patch_loss}
        )  # fmt: skip

    def checkpointed(self) -> nn.Module:
        """What training checkpoints hold (see dinov2.checkpoint.sharded.checkpointed_part): everything
        but the frozen teacher, under the same names; it is reloaded from its file on resume."""
        part = nn.Module()
        for name, child in self._trained_part().items():
            part.add_module(name, child)
        part.register_buffer("teacher_fingerprint", self.teacher_fingerprint)
        return part

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded student (the EMA starts equal to it) and zero centres, the same sharded or not;
        ``student.pretrained_weights`` (if set) into the student and EMA backbones; the frozen
        teacher from ``distillation.teacher_checkpoint``."""
        seeded_init_(self._trained_part(), seed, key_fn=teacher_as_student)
        if self.cfg.student.pretrained_weights:
            location = str(self.cfg.student.pretrained_weights)
            report = load_backbone_state_dict(self.student.backbone, load_weights_file(location), source=location)
            logger.info("student backbone initialised from %s (%s)", location, report)
            for p_t, p_s in zip(self.teacher.backbone.parameters(), self.student.backbone.parameters(), strict=True):
                local_tensor(p_t).copy_(local_tensor(p_s))
        seeded_init_(self.frozen_teacher, seed)  # every value is then overwritten by the checkpoint's
        state = read_teacher_state(self.teacher_source)
        load_teacher_(self.frozen_teacher, state, str(self.teacher_source.path), self.teacher_origin)
        self._loaded_fingerprint = state_fingerprint(state)
        self.teacher_fingerprint.copy_(self._loaded_fingerprint)

    def check_after_resume(self) -> None:
        """Once, after a resume (the trainer calls it) or at the first step: a resumed run must have
        reloaded the teacher it started with, also when nothing is left to train."""
        if self._fingerprint_checked or self._loaded_fingerprint is None:
            return
        saved = self.teacher_fingerprint.detach().cpu()
        if not torch.allclose(saved, self._loaded_fingerprint, rtol=1e-9, atol=0.0):
            raise TeacherChangedError(
                f"the teacher at {self.teacher_source.path} differs from the one this run started with "
                f"(fingerprint {self._loaded_fingerprint.tolist()} vs saved {saved.tolist()}); "
                "resume with the same distillation.teacher_checkpoint"
            )
        self._fingerprint_checked = True

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the EMA is only evaluated
        self.frozen_teacher.eval()  # never stochastic depth or dropout
        return self

    # ------------------------------------------------------------------ frozen teacher
    @torch.no_grad()
    def _teacher_targets(self, batch: dict, teacher_temp: float, accumulate: bool) -> dict[str, torch.Tensor]:
        out = self.frozen_teacher.backbone(batch["collated_global_crops"], is_training=True)
        centering, targets = self.cfg.train.centering, {}
        if self.do_dino:
            first, second = out["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
            scores = self.frozen_teacher.dino_head(torch.cat((second, first)))  # swapped views
            dino = center_teacher_scores(centering, self.dino_loss, scores, teacher_temp, accumulate)
            targets["dino"] = dino.view(N_GLOBAL_CROPS, -1, dino.shape[-1])
        if self.do_ibot:
            patches = out["x_norm_patchtokens"].flatten(0, 1)  # every patch token of both global crops
            scores = self.frozen_teacher[self.teacher_patch_head](patches)
            n_tokens = torch.tensor([len(patches)], device=patches.device)
            targets["ibot"] = center_teacher_scores(
                centering, self.ibot_patch_loss, scores, teacher_temp, accumulate, n_masked_patches_tensor=n_tokens
            )
        return targets

    # ------------------------------------------------------------------ student
    def _student_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        crops, masks = student_crop_groups(batch, self.cfg.crops.local_crops_number, None)  # no masks
        global_out, *local_out = self.student.backbone(crops, masks=masks, is_training=True)
        global_cls = global_out["x_norm_clstoken"]
        outputs = {"global_cls": global_cls}
        if self.do_dino:
            cls_tokens = [out["x_norm_clstoken"] for out in local_out] + [global_cls]
            scores = self.student.dino_head(torch.cat(cls_tokens)).split([len(t) for t in cls_tokens])
            outputs["local_scores"] = scores[0] if local_out else None
            outputs["global_scores"] = scores[-1]
        if self.do_ibot:
            tokens = global_out["x_norm_patchtokens"]  # (2B, N, D), unmasked
            outputs["ibot_scores"] = self.student.ibot_head(tokens.flatten(0, 1)).unflatten(0, tokens.shape[:2])
        return outputs

    # ------------------------------------------------------------------ losses
    def _losses(self, student: dict, targets: dict) -> dict[str, torch.Tensor]:
        losses = {}
        if self.do_dino:
            n_local = self.cfg.crops.local_crops_number
            losses.update(
                dino_crop_losses(
                    self.dino_loss, student["local_scores"], student["global_scores"], targets["dino"], n_local
                )
            )
        if self.do_koleo:
            losses["koleo_loss"] = koleo_term(self.koleo_loss, student["global_cls"])
        if self.do_ibot:
            scores = student["ibot_scores"]  # (2B, N, K): the mean over every patch of every global crop
            every_patch = torch.ones(scores.shape[:2], dtype=torch.bool, device=scores.device)
            losses["ibot_loss"] = self.ibot_patch_loss(scores, targets["ibot"].view(scores.shape), every_patch)
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``w_dino * (dino_local + dino_global) + w_koleo * koleo + w_ibot * ibot``."""
        return weighted_total(self.cfg, losses)

    def forward(self, batch: dict, teacher_temp: float, accumulate: bool = False) -> dict[str, torch.Tensor]:
        """Losses for one collated batch: ``{"loss": total, term: value}``. The batch's iBOT masks
        (if the collate drew any) are not used. ``accumulate`` as in :meth:`SSLMetaArch.forward`."""
        self.check_after_resume()
        targets = self._teacher_targets(batch, teacher_temp, accumulate)
        losses = self._losses(self._student_outputs(batch), targets)
        return {"loss": self.total_loss(losses), **losses}

    def apply_center_updates(self) -> None:
        """Fold pending center updates into the centers (before saving them; otherwise lazy)."""
        self.dino_loss.apply_center_update()
        self.ibot_patch_loss.apply_center_update()

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """The spare EMA: ``teacher = m * teacher + (1 - m) * student`` (local shards when sharded).
        The frozen teacher is never touched."""
        ema_update_(self.teacher, self.student, momentum)
