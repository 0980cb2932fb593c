"""Teacher-target normalisation shared by the DINO and iBOT losses.

Two ways turn teacher logits ``z`` (rows = samples, columns = K prototypes) into targets:

* centering + sharpening: ``p = softmax((z - c) / T)`` where ``c`` is an exponential moving
  average of the batch mean of ``z`` (``c <- m c + (1 - m) mean(z)``), reduced over all ranks;
* Sinkhorn-Knopp: the matrix ``Q = exp(z / T)`` is alternately rescaled so that every prototype
  receives the same total mass over the global batch and every sample's row sums to 1.

All maths runs in float32, whatever the input dtype. Collectives use the helpers of
:mod:`dinov2.distributed`, so everything also works in one process without a process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dinov2.distributed import all_reduce, get_world_size


def _reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """In-place MAX all-reduce (identity in a single process)."""
    op = dist.ReduceOp.MAX if dist.is_available() else None
    return all_reduce(tensor, op=op, group=group)


def _logit_shift(logits: torch.Tensor, per_prototype: bool, group=None) -> torch.Tensor:
    """Global maximum of the logits over all ranks: per prototype (shape (K,)) or overall (shape (1,)).

    An empty local batch contributes -inf, so ranks without samples still join the collective.
    """
    if logits.shape[0] == 0:
        shift = logits.new_full((logits.shape[1],), float("-inf"))
    else:
        shift = logits.amax(dim=0)
    if not per_prototype:
        shift = shift.amax(dim=0, keepdim=True)
    return _reduce_max(shift, group=group)


@torch.no_grad()
def sinkhorn_knopp(
    teacher_output: torch.Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples=None,
    group=None,
) -> torch.Tensor:
    """Sinkhorn-Knopp targets for ``teacher_output`` of shape (B_local, K); returns (B_local, K) float32.

    With ``Q = exp(z / T).T`` (K x B_local) and ``B`` the number of samples over all ranks
    (``n_samples``, already summed over ranks, else ``B_local * world_size``)::

        Q /= sum(Q)                                     # all-reduced
        repeat n_iterations:
            Q /= Q.sum(dim=1) ; Q /= K                  # prototype rows (all-reduced) -> mass 1/K
            Q /= Q.sum(dim=0) ; Q /= B                  # sample columns -> mass 1/B
        return (Q * B).T                                # each row sums to 1

    so at convergence every prototype holds total mass ``B / K`` over the global batch.

    Overflow guard: before ``exp`` the global (all-rank, MAX-reduced) maximum of each prototype's
    logits is subtracted. Scaling a prototype row of ``Q`` by a constant cancels exactly in the
    first row normalisation (and a global constant in the first total normalisation), so the result
    is unchanged in exact arithmetic while ``exp`` can neither overflow nor zero a whole row. With
    ``n_iterations == 0`` only the overall maximum is subtracted, which cancels in ``Q /= sum(Q)``.
    """
    logits = teacher_output.to(torch.float32, copy=True).div_(teacher_temp)
    n_prototypes = logits.shape[-1]
    shift = _logit_shift(logits, per_prototype=n_iterations > 0, group=group)
    q = logits.sub_(shift).exp_().t()  # in place: one (B_local x K) float32 buffer in all
    if n_samples is None:
        n_samples = logits.shape[0] * get_world_size(group)
    if torch.is_tensor(n_samples):
        n_samples = n_samples.to(device=q.device, dtype=torch.float32)

    total = all_reduce(q.sum(), group=group)
    q /= total
    for _ in range(n_iterations):
        rows = all_reduce(q.sum(dim=1, keepdim=True), group=group)
        q /= rows
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


@torch.no_grad()
def softmax_center(teacher_output: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """``softmax((z - c) / T)`` over the last dim, in float32.

    ``center`` has shape (1, ..., 1, K); it is broadcast as a K-vector so the output keeps the
    shape of ``teacher_output``. Computed in place in a single float32 buffer of that shape (the
    softmax as ``exp(x - max) / sum``), so the teacher targets cost one (rows x K) float32 tensor.
    """
    probs = teacher_output.to(torch.float32, copy=True)
    probs.sub_(center.reshape(center.shape[-1]).float()).div_(teacher_temp)
    probs.sub_(probs.amax(dim=-1, keepdim=True)).exp_()
    return probs.div_(probs.sum(dim=-1, keepdim=True))


class CenterEMA:
    """EMA update of a center buffer with a deferred (asynchronous) all-reduce.

    ``start`` sums the teacher logits over all rows locally, packs the row count as an extra
    entry and launches one async all-reduce; ``apply`` waits for it and sets::

        mean   = (sum of rows over all ranks) / (number of rows over all ranks)
        center = m * center + (1 - m) * mean

    With equal row counts per rank this is ``all_reduce(sum) / (n_local * world_size)``; with
    unequal counts (iBOT's masked tokens) it is the exact token mean of the concatenated batch.
    A batch without any row anywhere leaves the center unchanged. The owner calls ``apply``
    lazily, right before the center is next read, so the communication overlaps with compute.
    """

    def __init__(self, momentum: float, group=None):
        self.momentum = momentum
        self.group = group
        self._pending: list[tuple[torch.Tensor, object]] = []

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    @torch.no_grad()
    def start(self, center: torch.Tensor, teacher_output: torch.Tensor, accumulate: bool = False) -> None:
        """Launch the reduction for ``teacher_output``. Any pending update is applied to ``center``
        first, unless ``accumulate``: then these rows join the pending ones, and one EMA step over the
        mean of all of them follows at the next :meth:`apply` (gradient accumulation: the micro-batches
        of one optimiser step update the center once, as one larger batch would)."""
        if not accumulate:
            self.apply(center)
        rows = teacher_output.detach().float().reshape(-1, teacher_output.shape[-1])
        count = rows.new_full((1,), rows.shape[0])
        stats = torch.cat([rows.sum(dim=0), count])
        self._pending.append((stats, all_reduce(stats, group=self.group, async_op=True)))

    @torch.no_grad()
    def apply(self, center: torch.Tensor) -> None:
        """Finish the pending reductions (if any) and update ``center`` in place."""
        if not self._pending:
            return
        for _, work in self._pending:
            if work is not None:
                work.wait()
        stats = torch.stack([s for s, _ in self._pending]).sum(dim=0)
        self._pending = []
        count = stats[-1]
        mean = (stats[:-1] / count.clamp(min=1)).reshape(center.shape).to(center.dtype)
        updated = center * self.momentum + mean * (1 - self.momentum)
        center.copy_(torch.where(count > 0, updated, center))


class CenteredTeacherLoss(nn.Module):
    """Shared state of the DINO and iBOT losses: temperatures, the process group and the EMA
    ``center`` buffer (shape ``center_shape``) used by softmax-centering."""

    def __init__(self, center_shape: tuple[int, ...], student_temp: float, center_momentum: float, group=None):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.group = group
        self.register_buffer("center", torch.zeros(*center_shape))
        self._center_ema = CenterEMA(center_momentum, group=group)

    def apply_center_update(self) -> None:
        """Wait for a pending :meth:`update_center` reduction and fold it into ``center``."""
        self._center_ema.apply(self.center)

    @torch.no_grad()
    def softmax_center_teacher(
        self, teacher_output: torch.Tensor, teacher_temp: float, accumulate: bool = False
    ) -> torch.Tensor:
        """``softmax((z - center) / T_t)`` in float32 (output shape = input shape), after any pending
        update unless ``accumulate`` (a later micro-batch of the same optimiser step keeps the center)."""
        if not accumulate:
            self.apply_center_update()
        return softmax_center(teacher_output, self.center, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor, accumulate: bool = False) -> None:
        """Start the EMA update of ``center`` towards the mean of the teacher logits (every row of any
        leading shape is one sample or token; the mean is over all rows of all ranks). The cross-rank
        reduction runs asynchronously and is applied before the center is next used."""
        self._center_ema.start(self.center, teacher_output, accumulate=accumulate)
