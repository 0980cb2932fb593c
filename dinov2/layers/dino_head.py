"""The DINO / iBOT projection head: MLP -> L2-normalised bottleneck -> prototype scores."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool):
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """``nlayers``-layer GELU MLP to a ``bottleneck_dim`` vector, L2-normalised, then a bias-free
    weight-normalised linear layer to ``out_dim`` prototypes.

    The prototype layer uses :func:`torch.nn.utils.parametrizations.weight_norm`: its weight is
    ``g * v / ||v||`` per prototype, ``g`` starting at 1 (unit prototypes, cosine scores) and trained
    with ``v``, as the original's ``weight_g`` is (it is in the last-layer group, frozen with it for
    ``optim.freeze_last_layer_epochs``; DINO v1's ``norm_last_layer`` froze it, DINOv2 does not).
    State-dict keys are
    ``last_layer.parametrizations.weight.original0`` (g) and ``...original1`` (v); the original's
    ``last_layer.weight_g`` / ``weight_v`` keys are converted by
    :func:`dinov2.checkpoint.adapters.convert_weight_norm_keys`.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
