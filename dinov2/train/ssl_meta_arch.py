"""The DINOv2 teacher-student objective for one batch.

Data flow (one arrow per method below):

    batch -> _teacher_targets: teacher backbone on the 2 global crops (no grad) -> teacher heads
          -> centring (softmax-centering or Sinkhorn-Knopp) -> DINO targets (views swapped) and
             iBOT targets for the masked patches
          -> _student_outputs: student backbone on [masked global crops, local crops] in one nested
             pass -> DINO head on every CLS token in one pass, iBOT head on the masked patch tokens
          -> _losses: DINO (local and global crops), KoLeo, iBOT
          -> {"loss": total, per-term values}

The training loop owns backward, clipping, the optimiser step and :meth:`update_teacher`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from dinov2.checkpoint import load_backbone_state_dict, load_weights_file
from dinov2.distributed import local_tensor
from dinov2.layers import DINOHead
from dinov2.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2.models import build_model_from_cfg
from dinov2.models.init import seeded_init_

logger = logging.getLogger("dinov2")

N_GLOBAL_CROPS = 2
CENTERINGS = ("centering", "sinkhorn_knopp")


def _head(cfg_section: Any, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim=in_dim,
        out_dim=cfg_section.head_n_prototypes,
        hidden_dim=cfg_section.head_hidden_dim,
        bottleneck_dim=cfg_section.head_bottleneck_dim,
        nlayers=cfg_section.head_nlayers,
    )


def _teacher_as_student(name: str) -> str:
    return "student." + name.removeprefix("teacher.") if name.startswith("teacher.") else name


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        if cfg.train.centering not in CENTERINGS:
            raise ValueError(f"train.centering={cfg.train.centering!r}; valid: {', '.join(CENTERINGS)}")
        self.cfg = cfg
        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)
        if self.do_ibot and not self.ibot_separate_head and not self.do_dino:
            raise ValueError("ibot.separate_head=false shares the DINO head, which needs dino.loss_weight > 0")

        student_backbone, teacher_backbone, embed_dim = build_model_from_cfg(cfg)
        self.embed_dim = embed_dim
        student, teacher = {"backbone": student_backbone}, {"backbone": teacher_backbone}
        if self.do_dino:
            student["dino_head"], teacher["dino_head"] = _head(cfg.dino, embed_dim), _head(cfg.dino, embed_dim)
        if self.do_ibot and self.ibot_separate_head:
            student["ibot_head"], teacher["ibot_head"] = _head(cfg.ibot, embed_dim), _head(cfg.ibot, embed_dim)
        self.student = nn.ModuleDict(student)
        self.teacher = nn.ModuleDict(teacher)

        self.teacher.requires_grad_(False)
        if not self.is_meta:  # on the meta device the builder initialises after sharding
            self.load_pretrained()
            self.teacher.load_state_dict(self.student.state_dict())

        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes)
        self.koleo_loss = KoLeoLoss()
        ibot_prototypes = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.ibot_patch_loss = iBOTPatchLoss(ibot_prototypes)

    @property
    def is_meta(self) -> bool:
        return next(self.student.parameters()).is_meta

    def load_pretrained(self) -> None:
        """Load ``student.pretrained_weights`` (if set) into the student backbone (plain or sharded);
        the caller copies the student into the teacher."""
        if not self.cfg.student.pretrained_weights:
            return
        location = str(self.cfg.student.pretrained_weights)
        report = load_backbone_state_dict(self.student.backbone, load_weights_file(location), source=location)
        logger.info("student backbone initialised from %s (%s)", location, report)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Seeded initialisation (:func:`dinov2.models.init.seeded_init_`), the same sharded or not:
        the teacher gets the student's values, then the pretrained backbone (if any) is loaded into both."""
        seeded_init_(self, seed, key_fn=_teacher_as_student)
        if self.cfg.student.pretrained_weights:
            self.load_pretrained()
            for p_t, p_s in zip(self.teacher.backbone.parameters(), self.student.backbone.parameters(), strict=True):
                local_tensor(p_t).copy_(local_tensor(p_s))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never uses stochastic depth or dropout
        return self

    # ------------------------------------------------------------------ teacher
    def _center(
        self, loss, logits: torch.Tensor, teacher_temp: float, accumulate: bool, **sinkhorn_kwargs
    ) -> torch.Tensor:
        if self.cfg.train.centering == "sinkhorn_knopp":
            return loss.sinkhorn_knopp_teacher(logits, teacher_temp=teacher_temp, **sinkhorn_kwargs)
        targets = loss.softmax_center_teacher(logits, teacher_temp=teacher_temp, accumulate=accumulate)
        loss.update_center(logits, accumulate=accumulate)
        return targets

    def apply_center_updates(self) -> None:
        """Fold pending center updates into the centers (before saving them; otherwise lazy)."""
        self.dino_loss.apply_center_update()
        self.ibot_patch_loss.apply_center_update()

    @torch.no_grad()
    def _teacher_targets(self, batch: dict, teacher_temp: float, accumulate: bool = False) -> dict[str, torch.Tensor]:
        out = self.teacher.backbone(batch["collated_global_crops"], is_training=True)
        first, second = out["x_norm_clstoken"].chunk(N_GLOBAL_CROPS)
        cls_tokens = torch.cat((second, first))  # swapped: student view 1 learns from teacher view 2
        masked = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices_list"])

        targets = {}
        if self.do_ibot and not self.ibot_separate_head:
            scores = self.teacher.dino_head(torch.cat((cls_tokens, masked)))
            cls_scores, patch_scores = scores[: len(cls_tokens)], scores[len(cls_tokens) :]
        else:
            cls_scores = self.teacher.dino_head(cls_tokens) if self.do_dino else None
            patch_scores = self.teacher.ibot_head(masked) if self.do_ibot else None
        if self.do_dino:
            dino = self._center(self.dino_loss, cls_scores, teacher_temp, accumulate)
            targets["dino"] = dino.view(N_GLOBAL_CROPS, -1, dino.shape[-1])
        if self.do_ibot:
            targets["ibot"] = self._center(
                self.ibot_patch_loss,
                patch_scores,
                teacher_temp,
                accumulate,
                n_masked_patches_tensor=batch["n_masked_patches"],
            )
        return targets

    # ------------------------------------------------------------------ student
    def _student_outputs(self, batch: dict) -> dict[str, torch.Tensor]:
        global_out, local_out = self.student.backbone(
            [batch["collated_global_crops"], batch["collated_local_crops"]],
            masks=[batch["collated_masks"], None],
            is_training=True,
        )
        local_cls, global_cls = local_out["x_norm_clstoken"], global_out["x_norm_clstoken"]
        outputs = {"global_cls": global_cls}
        head_inputs = [local_cls, global_cls]
        if self.do_ibot:
            masked = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices_list"])
            if self.ibot_separate_head:
                outputs["ibot_scores"] = self.student.ibot_head(masked)
            else:
                head_inputs.append(masked)
        if self.do_dino:
            sizes = [len(t) for t in head_inputs]
            scores = self.student.dino_head(torch.cat(head_inputs)).split(sizes)
            outputs["local_scores"], outputs["global_scores"] = scores[0], scores[1]
            if self.do_ibot and not self.ibot_separate_head:
                outputs["ibot_scores"] = scores[2]
        return outputs

    # ------------------------------------------------------------------ losses
    def _losses(self, student: dict, targets: dict, batch: dict) -> dict[str, torch.Tensor]:
        n_local = self.cfg.crops.local_crops_number
        # One term per (student crop, teacher crop) pair of different views.
        n_terms = N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1) + N_GLOBAL_CROPS * n_local
        losses = {}
        if self.do_dino:
            teacher = list(targets["dino"])
            if n_local > 0:
                local = self.dino_loss(list(student["local_scores"].chunk(n_local)), teacher)
                losses["dino_local_crops_loss"] = local / n_terms
            # Global crops in one call: row i of the student is matched with the swapped teacher row i,
            # i.e. two pair terms averaged together, hence the factor N_GLOBAL_CROPS.
            paired = self.dino_loss([student["global_scores"]], [targets["dino"].flatten(0, 1)])
            losses["dino_global_crops_loss"] = paired * N_GLOBAL_CROPS / n_terms
        if self.do_koleo:
            losses["koleo_loss"] = sum(self.koleo_loss(c) for c in student["global_cls"].chunk(N_GLOBAL_CROPS))
        if self.do_ibot:
            losses["ibot_loss"] = self.ibot_patch_loss.forward_masked(
                student["ibot_scores"],
                targets["ibot"],
                student_masks_flat=batch["collated_masks"],
                n_masked_patches=batch["mask_indices_list"].shape[0],
                masks_weight=batch["masks_weight"],
            )
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``w_dino * (dino_local + dino_global) + w_koleo * koleo + w_ibot * ibot``."""
        weights = {
            "dino_local_crops_loss": self.cfg.dino.loss_weight,
            "dino_global_crops_loss": self.cfg.dino.loss_weight,
            "koleo_loss": self.cfg.dino.koleo_loss_weight,
            "ibot_loss": self.cfg.ibot.loss_weight,
        }
        return sum(weights[name] * value for name, value in losses.items())

    def forward(self, batch: dict, teacher_temp: float, accumulate: bool = False) -> dict[str, torch.Tensor]:
        """Losses for one collated batch (see dinov2.data.collate): ``{"loss": total, term: value}``.

        ``accumulate``: this batch is a later micro-batch of the same optimiser step (gradient
        accumulation); softmax-centering then uses the same centers as the step's first micro-batch
        and the center update covers all of them, as for one larger batch."""
        targets = self._teacher_targets(batch, teacher_temp, accumulate)
        losses = self._losses(self._student_outputs(batch), targets, batch)
        return {"loss": self.total_loss(losses), **losses}

    # ------------------------------------------------------------------ teacher EMA
    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = m * teacher + (1 - m) * student`` for every parameter (local shards when sharded)."""
        teacher_params, student_params = [], []
        for name in self.student:
            for p_t, p_s in zip(self.teacher[name].parameters(), self.student[name].parameters(), strict=True):
                teacher_params.append(local_tensor(p_t))
                student_params.append(local_tensor(p_s).to(p_t.dtype))
        torch._foreach_mul_(teacher_params, momentum)
        torch._foreach_add_(teacher_params, student_params, alpha=1.0 - momentum)
