"""DINO image-level (class-token) self-distillation loss."""

from __future__ import annotations

import torch

from dinov2.loss.centering import CenteredTeacherLoss, sinkhorn_knopp
from dinov2.ops.cross_entropy import soft_cross_entropy


def _teacher_sum(teachers) -> torch.Tensor:
    """``sum_j t_j``: the tensor itself for one teacher, else one float32 accumulator (no temporaries)."""
    if not teachers:
        raise ValueError("DINOLoss needs at least one teacher target")
    if len(teachers) == 1:
        return teachers[0]
    total = teachers[0].to(torch.float32, copy=True)
    for teacher in teachers[1:]:
        total.add_(teacher)
    return total


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
        which costs O(S + T) instead of O(S * T) products. The cross-entropy is
        :func:`dinov2.ops.cross_entropy.soft_cross_entropy` (chunked over rows, computed in float32,
        exact for teacher rows summing to the number of teacher crops); it keeps no float32 copy of
        the student logits for backward.
        """
        teacher_sum = _teacher_sum(list(teacher_out_softmaxed_centered_list))
        total = 0
        for student_output in student_output_list:
            total = total + soft_cross_entropy(student_output, teacher_sum, self.student_temp).mean()
        return total
