"""iBOT masked-image-modelling (patch-token) self-distillation loss."""

from __future__ import annotations

import torch

from dinov2.distributed import all_reduce
from dinov2.loss.centering import CenteredTeacherLoss, sinkhorn_knopp
from dinov2.ops.cross_entropy import soft_cross_entropy


def _token_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    """``sum_k t[..., k] * log_softmax(s / temp)[..., k]`` (float32); shape of the inputs minus the last dim.

    The negated :func:`dinov2.ops.cross_entropy.soft_cross_entropy` (chunked, no float32 copy of the
    logits kept for backward)."""
    return -soft_cross_entropy(student, teacher, temp)


class iBOTPatchLoss(CenteredTeacherLoss):
    """Cross-entropy between teacher and student patch tokens at the masked positions.

    For image ``b`` with mask ``m_b`` (``n_b = sum m_b`` masked patches)::

        loss = - (1 / n_images) sum_b (1 / max(n_b, 1)) sum_{p: m_b[p]} sum_k t[b, p, k] log_softmax(s[b, p] / T_s)[k]

    so every image weighs the same however many patches it masks, and images without masked
    patches contribute zero (while still counting in ``n_images``). The EMA ``center`` buffer has
    shape (1, 1, patch_out_dim).
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, group=None):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum, group)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_output: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets for this rank's masked-patch logits (n_masked, K).

        ``B`` is ``n_masked_patches_tensor`` summed over all ranks; the sum is taken on a copy, so
        the caller's tensor is left untouched. Works without an initialised process group.
        """
        n_total = torch.as_tensor(n_masked_patches_tensor, device=teacher_output.device)
        n_total = all_reduce(n_total.detach().to(torch.float32).clone(), group=self.group)
        return sinkhorn_knopp(
            teacher_output, teacher_temp, n_iterations=n_iterations, n_samples=n_total, group=self.group
        )

    def forward(
        self, student_patch_tokens: torch.Tensor, teacher_patch_tokens: torch.Tensor, student_masks_flat: torch.Tensor
    ) -> torch.Tensor:
        """Loss on full token grids: tokens (B, N, K), masks (B, N) bool."""
        ce = _token_cross_entropy(student_patch_tokens, teacher_patch_tokens, self.student_temp)
        masks = student_masks_flat.to(ce.dtype)
        per_image = (ce * masks).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return -per_image.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: torch.Tensor,
        teacher_patch_tokens_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches=None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss on the masked tokens only: inputs (M, K), rows in the order of ``student_masks_flat[mask]``.

        Rows beyond ``n_masked_patches`` (padding) are dropped. ``masks_weight`` (one weight per
        masked token) defaults to ``1 / (number of masked patches of the token's image)``, which
        makes this equal to :meth:`forward` on the full grids.
        """
        ce = _token_cross_entropy(student_patch_tokens_masked, teacher_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            masks = student_masks_flat.bool()
            per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).to(ce.dtype)
            masks_weight = per_image.unsqueeze(-1).expand_as(masks)[masks]
        if n_masked_patches is not None:
            ce = ce[: int(n_masked_patches)]
        return -(ce * masks_weight).sum() / student_masks_flat.shape[0]
