"""Seeded per-parameter initialisation, the same whether a model is whole or sharded.

Every parameter's (and buffer's) initial value depends only on the run's seed and the tensor's
name, never on the order in which modules were built or on the process that holds it. A model
built on the meta device and sharded with FSDP2 can therefore materialise each shard locally:
:func:`seeded_init_` computes one full tensor at a time on the target device, keeps this rank's
shard and drops the rest, so no rank ever holds more than one whole parameter besides its shards.
The result equals the unsharded model initialised with the same seed.

The rules follow the DINOv2 recipe: linear layers truncated-normal (std 0.02) with zero biases,
``pos_embed`` truncated-normal (0.02), class and register tokens normal (1e-6), the mask token
zero, LayerScale at its ``init_values``, norms at one/zero, batch-norm running statistics as
PyTorch starts them (mean zero, variance one, no batches tracked), the patch-embedding
convolution as PyTorch initialises it, and the weight-normalised prototype layer of a DINO head
with unit magnitudes and PyTorch's default linear initialisation for its directions.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrize import ParametrizationList

from dinov2.distributed import is_dtensor, local_tensor
from dinov2.layers.layer_scale import LayerScale
from dinov2.models.vision_transformer import DinoVisionTransformer

Rule = Callable[[torch.Tensor, torch.Generator], None]


def _trunc_normal(std: float) -> Rule:
    return lambda t, g: nn.init.trunc_normal_(t, std=std, a=-2.0, b=2.0, generator=g)


def _normal(std: float) -> Rule:
    return lambda t, g: nn.init.normal_(t, std=std, generator=g)


def _constant(value: float) -> Rule:
    return lambda t, g: nn.init.constant_(t, value)


def _kaiming_default(t: torch.Tensor, g: torch.Generator) -> None:
    """PyTorch's default for ``nn.Linear``/``nn.Conv2d`` weights."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)


def _fan_in_uniform(weight_shape: torch.Size) -> Rule:
    """PyTorch's default for ``nn.Linear``/``nn.Conv2d`` biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    fan_in = math.prod(weight_shape[1:])
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return lambda t, g: nn.init.uniform_(t, -bound, bound, generator=g)


_VIT_ROOT: dict[str, Rule] = {
    "pos_embed": _trunc_normal(0.02),
    "cls_token": _normal(1e-6),
    "register_tokens": _normal(1e-6),
    "mask_token": _constant(0.0),
}


def _rule(owner: nn.Module, name: str, qualified: str) -> Rule:
    """How to initialise tensor ``name`` owned (directly) by ``owner``; ``qualified`` for errors."""
    if isinstance(owner, DinoVisionTransformer) and name in _VIT_ROOT:
        return _VIT_ROOT[name]
    if isinstance(owner, ParametrizationList):  # weight-normalised prototypes: original0 = g, original1 = v
        return _constant(1.0) if name == "original0" else _kaiming_default
    if isinstance(owner, nn.Linear):
        return _trunc_normal(0.02) if name == "weight" else _constant(0.0)
    if isinstance(owner, nn.Conv2d):
        return _kaiming_default if name == "weight" else _fan_in_uniform(owner.weight.shape)
    if isinstance(owner, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d)):
        # scale and running variance start at one; shift, running mean and batch count at zero
        return _constant(1.0) if name in ("weight", "running_var") else _constant(0.0)
    if isinstance(owner, LayerScale):
        return _constant(float(owner.init_values))
    if name in ("center", "running_mean", "num_batches_tracked"):  # loss centres and statistics start at zero
        return _constant(0.0)
    if name == "running_var":
        return _constant(1.0)
    raise TypeError(f"no initialisation rule for {qualified!r} ({type(owner).__name__}.{name})")


def _tensor_seed(seed: int, key: str) -> int:
    return int(np.random.SeedSequence([int(seed), zlib.crc32(key.encode())]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _shard_of(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut to the local shard of ``like`` (a DTensor), or ``full`` for a plain tensor."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None).to_local()


@torch.no_grad()
def seeded_init_(model: nn.Module, seed: int, key_fn: Callable[[str], str] = lambda name: name) -> None:
    """Initialise every parameter and buffer of ``model`` in place from ``(seed, key_fn(name))``.

    ``key_fn`` maps a tensor's qualified name to the name its value is drawn for; two tensors with
    the same key get the same value (the SSL meta-architecture maps ``teacher.*`` to ``student.*``).
    Sharded (DTensor) tensors receive their local shard of the full value.
    """
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in own:
            qualified = f"{module_name}.{name}" if module_name else name
            rule = _rule(module, name, qualified)
            local = local_tensor(tensor)
            generator = torch.Generator(device=local.device).manual_seed(_tensor_seed(seed, key_fn(qualified)))
            full = torch.empty(tensor.shape, dtype=torch.float32, device=local.device)
            rule(full, generator)
            local.copy_(_shard_of(full, tensor).to(local.dtype))
