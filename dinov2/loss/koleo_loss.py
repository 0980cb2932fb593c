"""KoLeo regulariser: spread features uniformly on the unit sphere.

Kozachenko-Leonenko entropy estimator (Sablayrolles et al., "Spreading vectors for similarity
search"): with ``x_i`` the L2-normalised features and ``d_i`` the distance from ``x_i`` to its
nearest other row (computed as ``||x_i - x_j + eps||``, as the original), ``loss = -mean_i log(d_i + eps)``. Minimising it pushes nearest neighbours apart.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.distributed import all_gather_cat, get_rank, get_world_size


def _nearest_other(x: torch.Tensor, candidates: torch.Tensor, offset: int) -> torch.Tensor:
    """Index in ``candidates`` of each row's nearest neighbour by dot product, excluding the row itself
    (local row ``i`` is ``candidates[offset + i]``). Unit vectors: max dot product = min distance."""
    with torch.no_grad():
        dots = x @ candidates.t()
        own = torch.arange(x.shape[0], device=x.device) + offset
        dots[torch.arange(x.shape[0], device=x.device), own] = float("-inf")
        return dots.argmax(dim=1)


class KoLeoLoss(nn.Module):
    """``-mean_i log(d_i + eps)`` on L2-normalised rows (float32, float64 for float64 input; autocast off).

    ``d_i = ||x_i - x_nn(i) + eps||`` (eps added to every component of the difference), the distance
    of ``torch.nn.PairwiseDistance(eps=eps)`` that the original code uses, so values and gradients
    are the original's; where features nearly coincide (distances ~1e-4 at the recipe's start) this
    differs measurably from ``||x_i - x_nn(i)||``.

    Duplicates: a row whose nearest neighbour is within ``eps`` (an exact duplicate, or a row with no
    other row at all) keeps the original's value, ``d_i = eps sqrt(D)`` (``-log(eps (sqrt(D) + 1))``,
    about 15.4 for D = 384), but gets no gradient through ``d_i``: the original's is about
    ``1 / eps`` there (finite, but it swamps every other gradient).

    With ``gather_across_ranks`` the neighbours are searched over the rows of all ranks (all
    gathered; every rank must hold the same number of rows); only the local rows get a loss term,
    and each row's own copy is excluded by its global index. Gradients flow through local
    neighbours only (remote rows are constants here; their own rank trains them).
    """

    def __init__(self, gather_across_ranks: bool = False, group=None):
        super().__init__()
        self.gather_across_ranks = gather_across_ranks
        self.group = group

    def _candidates(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Rows searched for neighbours and the offset of the local rows among them."""
        if not self.gather_across_ranks or get_world_size(self.group) == 1:
            return x, 0
        gathered = all_gather_cat(x.detach(), group=self.group)
        start = get_rank(self.group) * x.shape[0]
        end = start + x.shape[0]
        # Put the differentiable local rows back in place of their detached copies.
        return torch.cat([gathered[:start], x, gathered[end:]], dim=0), start

    def forward(self, student_output: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        """``student_output``: (B, D) features of this rank. Returns a scalar float32 loss."""
        dtype = torch.promote_types(student_output.dtype, torch.float32)
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.to(dtype), p=2, dim=-1, eps=eps)
            candidates, offset = self._candidates(x)
            diff = x - candidates[_nearest_other(x, candidates, offset)]
            dist = (diff + eps).norm(dim=-1)  # torch.nn.PairwiseDistance(eps=eps), the original's distance
            duplicate = diff.detach().norm(dim=-1) <= eps
            dist = torch.where(duplicate, dist.detach(), dist)
            return -torch.log(dist + eps).mean()
