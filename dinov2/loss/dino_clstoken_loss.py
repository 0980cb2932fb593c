"""DINO image-level (class-token) self-distillation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dinov2.loss.centering import CenteredTeacherLoss, sinkhorn_knopp


class DINOLoss(CenteredTeacherLoss):
    """Cross-entropy between teacher targets and student predictions over crop pairs.

    For student crops ``s_i`` and teacher targets ``t_j`` (probabilities, one row per image)::

        loss = - sum_i sum_j mean_b sum_k t_j[b, k] * log_softmax(s_i[b] / T_s)[k]

    i.e. a sum over all (student, teacher) pairs, each averaged over the batch. The caller decides
    which pairs enter (e.g. global student crops against the other global teacher crop) and how the
    total is normalised. Teacher targets come from :meth:`softmax_center_teacher` (centering with
    an EMA ``center`` buffer of shape (1, out_dim)) or :meth:`sinkhorn_knopp_teacher`.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, group=None):
        super().__init__((1, out_dim), student_temp, center_momentum, group)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """Sinkhorn-Knopp targets over the global batch (all ranks of ``group``)."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations, group=self.group)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list) -> torch.Tensor:
        """Sum over (student, teacher) pairs of the batch-mean cross-entropy.

        The teacher sum is taken once: ``sum_j mean_b(t_j . lsm_i) == mean_b((sum_j t_j) . lsm_i)``,
        which costs O(S + T) instead of O(S * T) products.
        """
        teacher_sum = sum(t.float() for t in teacher_out_softmaxed_centered_list)
        total = 0
        for student_output in student_output_list:
            lsm = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
            total = total - (teacher_sum * lsm).sum(dim=-1).mean()
        return total
