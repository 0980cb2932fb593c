"""Seeded initialisation (:func:`dinov2.models.init.seeded_init_`) of batch-norm statistics."""

from __future__ import annotations

import torch
from torch import nn

from dinov2.layers import DINOHead
from dinov2.models.init import seeded_init_


def _batch_norms(module: nn.Module) -> list[nn.BatchNorm1d]:
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm1d)]


def test_batch_norm_statistics_start_as_pytorch_starts_them():
    head = DINOHead(16, 32, use_bn=True, nlayers=3, hidden_dim=24, bottleneck_dim=8)
    norms = _batch_norms(head)
    assert len(norms) == 2
    with torch.no_grad():  # statistics as a few training steps would leave them
        for bn in norms:
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.num_batches_tracked.fill_(7)
    seeded_init_(head, seed=0)
    fresh = nn.BatchNorm1d(24)  # PyTorch's own starting state, the reference
    for bn in norms:
        torch.testing.assert_close(bn.running_mean, fresh.running_mean, rtol=0, atol=0)
        torch.testing.assert_close(bn.running_var, fresh.running_var, rtol=0, atol=0)
        assert bn.num_batches_tracked.item() == 0 and bn.num_batches_tracked.dtype == torch.long
        torch.testing.assert_close(bn.weight.detach(), torch.ones(24), rtol=0, atol=0)
        torch.testing.assert_close(bn.bias.detach(), torch.zeros(24), rtol=0, atol=0)


def test_batch_norm_in_eval_mode_is_the_affine_identity_after_seeded_init():
    """With mean 0 and variance 1 an eval-mode batch norm with unit scale only divides by sqrt(1 + eps)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5))
    seeded_init_(model, seed=3)
    model.eval()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        linear = model[0](x)
        torch.testing.assert_close(model(x), linear / (1 + model[1].eps) ** 0.5)
