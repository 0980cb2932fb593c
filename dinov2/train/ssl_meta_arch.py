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
from dinov2.utils.config import select

logger = logging.getLogger("dinov2")

N_GLOBAL_CROPS = 2
CENTERINGS = ("centering", "sinkhorn_knopp")


# ----------------------------------------------------------------------------- shared pieces
# Module-level so that the distillation meta-architecture (distill_meta_arch.py) composes the same
# heads, centring, loss terms and EMA instead of branching inside SSLMetaArch.
def build_head(cfg_section: Any, in_dim: int) -> DINOHead:
    """A DINO/iBOT head from a config section (``dino`` or ``ibot``) on ``in_dim`` features."""
    return DINOHead(
        in_dim=in_dim,
        out_dim=cfg_section.head_n_prototypes,
        hidden_dim=cfg_section.head_hidden_dim,
        bottleneck_dim=cfg_section.head_bottleneck_dim,
        nlayers=cfg_section.head_nlayers,
    )


def teacher_as_student(name: str) -> str:
    """Seeded-init key of a tensor: ``teacher.*`` draws the value of ``student.*`` (they start equal)."""
    return "student." + name.removeprefix("teacher.") if name.startswith("teacher.") else name


def center_teacher_scores(
    centering: str, loss, logits: torch.Tensor, teacher_temp: float, accumulate: bool, **sinkhorn_kwargs
) -> torch.Tensor:
    """Teacher targets from head scores: Sinkhorn-Knopp, or softmax-centering (then the loss's
    centre EMA update is started; ``accumulate``: a later micro-batch of the same step)."""
    if centering == "sinkhorn_knopp":
        return loss.sinkhorn_knopp_teacher(logits, teacher_temp=teacher_temp, **sinkhorn_kwargs)
    targets = loss.softmax_center_teacher(logits, teacher_temp=teacher_temp, accumulate=accumulate)
    loss.update_center(logits, accumulate=accumulate)
    return targets


def student_crop_groups(batch: dict, n_local: int, global_masks: torch.Tensor | None) -> tuple[list, list]:
    """The student's crop groups and their masks for one nested backbone pass: the global crops
    (with ``global_masks``), then the local crops, left out when there are none
    (``crops.local_crops_number=0``: the collate gives an empty tensor)."""
    crops, masks = [batch["collated_global_crops"]], [global_masks]
    if n_local > 0:
        crops.append(batch["collated_local_crops"])
        masks.append(None)
    return crops, masks


def dino_crop_losses(
    dino_loss: DINOLoss, local_scores: torch.Tensor | None, global_scores: torch.Tensor, targets: torch.Tensor,
    n_local: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """``dino_local_crops_loss`` and ``dino_global_crops_loss``: student crop scores against the
    teacher targets ``(N_GLOBAL_CROPS, B, K)`` (rows already swapped between the two views), one
    term per (student crop, teacher crop) pair of different views, each divided by the pair count."""
    n_terms = N_GLOBAL_CROPS * (N_GLOBAL_CROPS - 1) + N_GLOBAL_CROPS * n_local
    losses = {}
    if n_local > 0:
        losses["dino_local_crops_loss"] = dino_loss(list(local_scores.chunk(n_local)), list(targets)) / n_terms
    # Global crops in one call: row i of the student is matched with the swapped teacher row i,
    # i.e. two pair terms averaged together, hence the factor N_GLOBAL_CROPS.
    paired = dino_loss([global_scores], [targets.flatten(0, 1)])
    losses["dino_global_crops_loss"] = paired * N_GLOBAL_CROPS / n_terms
    return losses


def koleo_term(koleo_loss: KoLeoLoss, global_cls: torch.Tensor) -> torch.Tensor:
    """KoLeo on each global crop's student CLS features separately, summed."""
    return sum(koleo_loss(c) for c in global_cls.chunk(N_GLOBAL_CROPS))


LOSS_WEIGHT_KEYS = ("dino.loss_weight", "dino.koleo_loss_weight", "ibot.loss_weight")


def check_loss_weights(cfg: Any) -> None:
    """Every loss weight is a number >= 0 (0 turns its term off), and at least one term is on."""
    weights = {key: select(cfg, key) for key in LOSS_WEIGHT_KEYS}
    for key, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
            raise ValueError(f"{key} must be a number >= 0 (0 turns the term off), got {value!r}")
    if not any(value > 0 for value in weights.values()):
        raise ValueError(f"every loss term is off ({', '.join(f'{k}=0' for k in weights)}): nothing to train")


def check_ibot_masking(cfg: Any) -> None:
    """With iBOT on, the collate must mask at least one global crop per batch: it masks
    ``int(2 * train.batch_size_per_gpu * ibot.mask_sample_probability)`` of them, up to
    ``max(ibot.mask_ratio_min_max)`` of their patches. Otherwise the iBOT term is 0 at every step
    (the original asserts a positive probability and ratio)."""
    probability, ratios = cfg.ibot.mask_sample_probability, list(cfg.ibot.mask_ratio_min_max)
    n_crops = N_GLOBAL_CROPS * int(cfg.train.batch_size_per_gpu)
    off = "; to train without iBOT set ibot.loss_weight=0"
    if not probability > 0:
        raise ValueError(f"ibot.loss_weight > 0 but ibot.mask_sample_probability={probability}: no crop is masked{off}")
    if not max(ratios) > 0:
        raise ValueError(f"ibot.loss_weight > 0 but ibot.mask_ratio_min_max={ratios}: no patch is masked{off}")
    if int(n_crops * probability) == 0:
        raise ValueError(
            f"ibot.loss_weight > 0 but ibot.mask_sample_probability={probability} masks 0 of the {n_crops} global "
            f"crops of a batch (train.batch_size_per_gpu={cfg.train.batch_size_per_gpu}; the count is rounded "
            f"down): the iBOT term would be 0 at every step. Raise the probability or the batch{off}"
        )


def weighted_total(cfg: Any, losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """``w_dino * (dino_local + dino_global) + w_koleo * koleo + w_ibot * ibot``."""
    weights = {
        "dino_local_crops_loss": cfg.dino.loss_weight,
        "dino_global_crops_loss": cfg.dino.loss_weight,
        "koleo_loss": cfg.dino.koleo_loss_weight,
        "ibot_loss": cfg.ibot.loss_weight,
    }
    return sum(weights[name] * value for name, value in losses.items())


@torch.no_grad()
def ema_update_(target: nn.ModuleDict, source: nn.ModuleDict, momentum: float) -> None:
    """``target = m * target + (1 - m) * source`` for every parameter of every module of ``source``
    (local shards when sharded; ``target[name]`` must have the same parameters, sharded alike)."""
    target_params, source_params = [], []
    for name in source:
        for p_t, p_s in zip(target[name].parameters(), source[name].parameters(), strict=True):
            target_params.append(local_tensor(p_t))
            source_params.append(local_tensor(p_s).to(p_t.dtype))
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, source_params, alpha=1.0 - momentum)


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: Any) -> None:
        super().__init__()
        if cfg.train.centering not in CENTERINGS:
            raise ValueError(f"train.centering={cfg.train.centering!r}; valid: {', '.join(CENTERINGS)}")
        check_loss_weights(cfg)
        self.cfg = cfg
        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = bool(cfg.ibot.separate_head)
        if self.do_ibot and not self.ibot_separate_head and not self.do_dino:
            raise ValueError("ibot.separate_head=false shares the DINO head, which needs dino.loss_weight > 0")
        if self.do_ibot:
            check_ibot_masking(cfg)
        elif float(cfg.ibot.mask_sample_probability) > 0:
            logger.warning(
                "ibot.loss_weight=0 but ibot.mask_sample_probability=%s: the collate still masks that share of the "
                "global crops and the student sees them masked (as in the original), so the DINO and KoLeo terms are "
                "trained on masked crops; set ibot.mask_sample_probability=0 for unmasked ones",
                cfg.ibot.mask_sample_probability,
            )

        student_backbone, teacher_backbone, embed_dim = build_model_from_cfg(cfg)
        self.embed_dim = embed_dim
        student, teacher = {"backbone": student_backbone}, {"backbone": teacher_backbone}
        heads = {
            "dino_head": (self.do_dino, cfg.dino),
            "ibot_head": (self.do_ibot and self.ibot_separate_head, cfg.ibot),
        }
        for name, (wanted, section) in heads.items():
            if wanted:
                student[name], teacher[name] = build_head(section, embed_dim), build_head(section, embed_dim)
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
        seeded_init_(self, seed, key_fn=teacher_as_student)
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
        return center_teacher_scores(
            self.cfg.train.centering, loss, logits, teacher_temp, accumulate, **sinkhorn_kwargs
        )

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
        crops, masks = student_crop_groups(batch, self.cfg.crops.local_crops_number, batch["collated_masks"])
        global_out, *local_out = self.student.backbone(crops, masks=masks, is_training=True)
        global_cls = global_out["x_norm_clstoken"]
        outputs = {"global_cls": global_cls}
        head_inputs = [out["x_norm_clstoken"] for out in local_out] + [global_cls]
        if self.do_ibot:
            masked = global_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, batch["mask_indices_list"])
            if self.ibot_separate_head:
                outputs["ibot_scores"] = self.student.ibot_head(masked)
            else:
                head_inputs.append(masked)
        if self.do_dino:
            sizes = [len(t) for t in head_inputs]
            scores = self.student.dino_head(torch.cat(head_inputs)).split(sizes)
            n_local_groups = len(local_out)  # 0 or 1
            outputs["local_scores"] = scores[0] if n_local_groups else None
            outputs["global_scores"] = scores[n_local_groups]
            if self.do_ibot and not self.ibot_separate_head:
                outputs["ibot_scores"] = scores[n_local_groups + 1]
        return outputs

    # ------------------------------------------------------------------ losses
    def _losses(self, student: dict, targets: dict, batch: dict) -> dict[str, torch.Tensor]:
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
        return weighted_total(self.cfg, losses)

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
        ema_update_(self.teacher, self.student, momentum)
