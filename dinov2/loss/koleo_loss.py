"""KoLeo regulariser: spread features uniformly on the unit sphere.

Kozachenko-Leonenko entropy estimator (Sablayrolles et al., "Spreading vectors for similarity
search"): with ``x_i`` the L2-normalised features and ``d_i`` the distance from ``x_i`` to its
nearest other row, ``loss = -mean_i log(d_i + eps)``. Minimising it pushes nearest neighbours apart.
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
    """``-mean_i log(d_i + eps)`` with ``d_i = ||x_i - x_nn(i)||`` on L2-normalised rows (float32, autocast off).

    Duplicates: the distance is computed as ``sqrt(max(||x_i - x_nn||^2, eps^2))``, i.e. floored at
    ``eps``. A row whose nearest neighbour is an exact duplicate (or a row with no other row at all)
    contributes ``-log(2 eps)`` (about 17.7 for eps = 1e-8) and receives zero gradient through the
    floor, so both value and gradients stay finite. Above the floor the loss is the plain formula.

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
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), p=2, dim=-1, eps=eps)
            candidates, offset = self._candidates(x)
            neighbours = candidates[_nearest_other(x, candidates, offset)]
            sq_dist = (x - neighbours).pow(2).sum(dim=-1)
            dist = sq_dist.clamp(min=eps**2).sqrt()
            return -torch.log(dist + eps).mean()
