"""Optimizer parameter groups for DINOv2 training: layer-wise lr decay and weight-decay masks.

Each trainable parameter gets an ``lr_multiplier`` (``lr_decay_rate ** (num_layers + 1 - layer_id)``,
layer 0 being the patch embedding and tokens, block ``i`` layer ``i + 1``, everything else the
top layer), a ``wd_multiplier`` and an ``is_last_layer`` flag (the heads' prototype layer, whose lr
follows its own schedule). :func:`fuse_params_groups` then merges parameters with equal settings.

Weight decay skips biases, norm parameters and LayerScale gammas, as in the original DINOv2 code,
which decays the learnable tokens (``cls_token``, ``pos_embed``, ``mask_token``,
``register_tokens``); ``decay_tokens=False`` (config ``optim.decay_tokens``) exempts them too, as
timm-style ViT recipes do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from dinov2.checkpoint.adapters import strip_wrapper_segments

EMBEDDING_NAMES = frozenset({"patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens"})
TOKEN_NAMES = frozenset({"pos_embed", "cls_token", "mask_token", "register_tokens"})
FUSE_KEYS = ("lr_multiplier", "wd_multiplier", "is_last_layer")


def _clean_segments(name: str) -> list[str]:
    """Name segments without wrapper segments (FSDP, torch.compile, checkpointing, DDP)."""
    return strip_wrapper_segments(name).split(".")


def _backbone_segments(name: str) -> list[str]:
    """Clean segments relative to the backbone: everything up to a ``backbone`` segment dropped."""
    segments = _clean_segments(name)
    if "backbone" in segments:
        segments = segments[segments.index("backbone") + 1 :]
    return segments


def get_vit_layer_id(name: str, num_layers: int, chunked_blocks: bool = False) -> int:
    """Layer index of a parameter: 0 for embeddings and tokens, ``i + 1`` for block ``i`` (named
    ``blocks.i.`` or, chunked, ``blocks.c.i.``), ``num_layers + 1`` for anything else."""
    segments = _backbone_segments(name)
    if not segments:
        return num_layers + 1
    if segments[0] in EMBEDDING_NAMES:
        return 0
    index_pos = 2 if chunked_blocks else 1
    if segments[0] == "blocks" and len(segments) > index_pos and segments[index_pos].isdigit():
        return int(segments[index_pos]) + 1
    return num_layers + 1


def get_vit_lr_decay_rate(name: str, lr_decay_rate: float, num_layers: int, chunked_blocks: bool = False) -> float:
    """Layer-wise lr multiplier ``lr_decay_rate ** (num_layers + 1 - layer_id)`` for a parameter."""
    return lr_decay_rate ** (num_layers + 1 - get_vit_layer_id(name, num_layers, chunked_blocks))


def _is_no_weight_decay(name: str, decay_tokens: bool = True) -> bool:
    """True for biases, norm parameters, LayerScale gammas, and (``decay_tokens=False``) the learnable tokens."""
    segments = _clean_segments(name)
    leaf = segments[-1]
    if leaf == "bias" or leaf == "gamma" or (leaf in TOKEN_NAMES and not decay_tokens):
        return True
    return any("norm" in s for s in segments[:-1])


def _find_depth(model: nn.Module) -> tuple[int, bool]:
    """(n_blocks, chunked_blocks) of the first submodule that has them; (0, False) for a head."""
    for module in model.modules():
        if hasattr(module, "n_blocks"):
            return int(module.n_blocks), bool(getattr(module, "chunked_blocks", False))
    return 0, False


def get_params_groups_with_decay(
    model: nn.Module, lr_decay_rate: float = 1.0, patch_embed_lr_mult: float = 1.0, decay_tokens: bool = True
) -> list[dict[str, Any]]:
    """One group per trainable parameter of ``model`` (a backbone, a head, or a ModuleDict holding
    a ``backbone``), with ``params``, ``name``, ``lr_multiplier``, ``wd_multiplier`` and
    ``is_last_layer``. Parameters with ``requires_grad=False`` are skipped. ``decay_tokens=False``
    exempts the learnable tokens from weight decay (the original decays them)."""
    num_layers, chunked = _find_depth(model)
    groups = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lr_mult = get_vit_lr_decay_rate(name, lr_decay_rate, num_layers, chunked)
        backbone_segments = _backbone_segments(name)
        if backbone_segments and backbone_segments[0] == "patch_embed":
            lr_mult *= patch_embed_lr_mult
        groups.append(
            {
                "params": param,
                "name": name,
                "lr_multiplier": lr_mult,
                "wd_multiplier": 0.0 if _is_no_weight_decay(name, decay_tokens) else 1.0,
                "is_last_layer": "last_layer" in _clean_segments(name),
            }
        )
    return groups


def fuse_params_groups(groups: Iterable[Mapping[str, Any]], keys: tuple[str, ...] = FUSE_KEYS) -> list[dict[str, Any]]:
    """Merge per-parameter groups with equal values for ``keys`` into one group each, in order of
    first appearance. Each fused group has ``params`` (a list), the ``keys`` and ``names``."""
    fused: dict[tuple, dict[str, Any]] = {}
    for group in groups:
        signature = tuple(group[k] for k in keys)
        if signature not in fused:
            fused[signature] = {"params": [], "names": [], **{k: group[k] for k in keys}}
        params = group["params"]
        params = [params] if isinstance(params, nn.Parameter) else list(params)
        fused[signature]["params"].extend(params)
        fused[signature]["names"].append(group.get("name", f"<{len(params)} params>"))
    return list(fused.values())


def build_optimizer_param_groups(
    modules: Mapping[str, nn.Module],
    layerwise_decay: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    decay_tokens: bool = True,
) -> list[dict[str, Any]]:
    """Fused param groups for ``torch.optim.AdamW`` over the student's modules (e.g. ``backbone``,
    ``dino_head``, ``ibot_head``): layer-wise decay for modules with blocks, 1.0 for heads.
    The extra keys (multipliers, ``is_last_layer``, ``names``) stay in each group for
    :func:`dinov2.train.schedules.apply_optim_scheduler`. A parameter shared between modules is
    listed once."""
    seen: set[int] = set()
    groups = []
    for key, module in modules.items():
        decay = layerwise_decay if _find_depth(module)[0] > 0 else 1.0
        for group in get_params_groups_with_decay(module, decay, patch_embed_lr_mult, decay_tokens):
            if id(group["params"]) in seen:
                continue
            seen.add(id(group["params"]))
            group["name"] = f"{key}.{group['name']}"
            groups.append(group)
    return fuse_params_groups(groups)


def param_settings(optimizer: torch.optim.Optimizer) -> dict[int, tuple[str, tuple]]:
    """``{id(param): (name, (lr_multiplier, wd_multiplier, is_last_layer))}`` over the groups of an
    optimizer built from :func:`build_optimizer_param_groups` (names as listed there)."""
    settings = {}
    for group in optimizer.param_groups:
        names = group.get("names") or ["?"] * len(group["params"])
        values = tuple(group.get(key) for key in FUSE_KEYS)
        for name, param in zip(names, group["params"]):
            settings[id(param)] = (name, values)
    return settings


def changed_param_settings(config: Mapping[int, tuple[str, tuple]], loaded: torch.optim.Optimizer) -> list[str]:
    """The parameters whose settings in ``loaded`` (an optimizer whose state a checkpoint replaced, its
    groups included) differ from ``config`` (:func:`param_settings` before loading), one line each."""
    lines = []
    for param_id, (_, values) in param_settings(loaded).items():
        name, wanted = config.get(param_id, ("?", values))
        if values != wanted:
            lines.append(f"{name} {dict(zip(FUSE_KEYS, values))} (config: {dict(zip(FUSE_KEYS, wanted))})")
    return lines
