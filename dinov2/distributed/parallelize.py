"""Parallelism for the SSL meta-architecture, applied in one place and in one order:
activation checkpointing -> per-block compile -> FSDP2 sharding.

:func:`parallelize` shards each of the student's and the teacher's ``backbone``, ``dino_head`` and
``ibot_head`` with ``fully_shard``: every transformer block (or block chunk, with
``student.block_chunks > 0``) is its own FSDP2 unit, then the module's root. The config's
``compute_precision.{student,teacher}.{module}`` sections choose per module

* ``sharding_strategy``: ``FULL_SHARD`` (parameters resharded after forward, gathered again for
  backward), ``SHARD_GRAD_OP`` (kept gathered from forward to backward: more memory, one gather
  less) or ``NO_SHARD`` (replicated on every rank: a (world, 1) mesh, gradients all-reduced);
* ``mixed_precision``: ``param_dtype`` (compute), ``reduce_dtype`` (gradient reduction) and
  ``buffer_dtype`` (accepted for compatibility; FSDP2 leaves buffers in their own dtype, fp32 here).

The teacher has no backward pass, so its parameters are always resharded after forward (the EMA
then updates the shards the next forward gathers). A student module and its teacher must both be
sharded or both be ``NO_SHARD``, so that their local shards line up for the EMA. A meta-architecture
lists further ModuleDicts in ``parallel_roles`` with the section whose policies they follow: the
distillation model's ``frozen_teacher`` follows ``compute_precision.teacher``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from dinov2.layers.block import ACTIVATION_CHECKPOINTING, Block

logger = logging.getLogger("dinov2")

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
# (attribute of the meta-architecture, compute_precision section) of each ModuleDict to parallelise; a
# meta-architecture may name others in ``parallel_roles`` (distillation adds its frozen teacher).
DEFAULT_ROLES = (("student", "student"), ("teacher", "teacher"))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MODULES = ("backbone", "dino_head", "ibot_head")


def _dtype(value: Any, key: str) -> torch.dtype:
    name = str(value).lower().replace("bfloat16", "bf16").replace("float32", "fp32").replace("float16", "fp16")
    if name not in DTYPES:
        raise ValueError(f"{key}={value!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def use_mixed_precision(cfg: Any, device: torch.device) -> bool:
    """``compute_precision.fsdp_mixed_precision``: ``auto`` applies the sharding policies' dtypes on
    accelerators and keeps fp32 on CPU; ``true``/``false`` force them on/off."""
    setting = str(cfg.compute_precision.fsdp_mixed_precision).lower()
    if setting not in ("auto", "true", "false"):
        raise ValueError(f"compute_precision.fsdp_mixed_precision={setting!r}; valid: auto, true, false")
    return device.type != "cpu" if setting == "auto" else setting == "true"


def module_policy(cfg: Any, role: str, name: str, mixed_precision: bool) -> dict[str, Any]:
    """``{"strategy", "param_dtype", "reduce_dtype"}`` for ``compute_precision.<role>.<name>``."""
    key = f"compute_precision.{role}.{name}"
    section = cfg.compute_precision[role][name]
    strategy = str(section.sharding_strategy).upper()
    if strategy not in SHARDING_STRATEGIES:
        raise ValueError(
            f"{key}.sharding_strategy={section.sharding_strategy!r}; valid: {', '.join(SHARDING_STRATEGIES)}"
        )
    mp = section.mixed_precision
    dtypes = {f: _dtype(mp[f], f"{key}.mixed_precision.{f}") for f in ("param_dtype", "reduce_dtype", "buffer_dtype")}
    if not mixed_precision:
        dtypes = dict.fromkeys(dtypes, torch.float32)
    return {"strategy": strategy, "param_dtype": dtypes["param_dtype"], "reduce_dtype": dtypes["reduce_dtype"]}


def any_fp16(cfg: Any, mixed_precision: bool) -> bool:
    """Whether a student module computes in fp16 under FSDP2 (then the loss needs a gradient scaler)."""
    return mixed_precision and any(
        module_policy(cfg, "student", n, True)["param_dtype"] == torch.float16 for n in MODULES
    )


# ----------------------------------------------------------------------------- checkpointing, compile
def apply_activation_checkpointing(backbone: nn.Module, mode: str) -> int:
    """Set ``mode`` (off | full | selective) on every transformer block; returns how many."""
    mode = "off" if mode in (False, None) else str(mode).lower()  # YAML reads a bare off as false
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"train.activation_checkpointing={mode!r}; valid: {', '.join(ACTIVATION_CHECKPOINTING)}")
    blocks = [m for m in backbone.modules() if isinstance(m, Block)]
    for block in blocks:
        block.checkpointing = mode
    return len(blocks)


def resolve_attention_backends(backbone: nn.Module, device: torch.device) -> list[str]:
    """Replace ``auto`` on every attention layer by the backend it resolves to on ``device``, once,
    at build time: the choice (and xFormers' probe) then never runs inside a forward that
    ``torch.compile`` traces. Returns the backends the layers now have, without repeats."""
    from dinov2.ops.attention import resolve_backend

    chosen: list[str] = []
    for block in backbone.iter_blocks():
        if block.attn.backend == "auto":  # the nested choice: training calls are nested
            block.attn.backend = resolve_backend("auto", device, nested=True)
        if block.attn.backend not in chosen:
            chosen.append(block.attn.backend)
    return chosen


def apply_compile(backbone: nn.Module, setting: Any) -> int:
    """``train.compile``: false, true (inductor) or a torch.compile backend name; each block (or
    chunk) is compiled in place, so parameter names do not change. Returns how many were compiled."""
    if setting in (False, None, "false", "False", ""):
        return 0
    backend = "inductor" if setting in (True, "true", "True") else str(setting)
    units = list(backbone.blocks)
    for unit in units:
        unit.compile(backend=backend)
    return len(units)


# ------------------------------------------------------------------------------------------ FSDP2
def _meshes(device: torch.device):
    from torch.distributed.device_mesh import init_device_mesh

    from dinov2.distributed import get_world_size

    world = get_world_size()
    shard = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    replicate = init_device_mesh(device.type, (world, 1), mesh_dim_names=("replicate", "shard"))
    return {"sharded": shard, "replicated": replicate}


def shard_module(module: nn.Module, policy: dict[str, Any], meshes: dict, teacher: bool) -> None:
    """``fully_shard`` on each block (or chunk) of a backbone, then on ``module`` itself."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    replicated = policy["strategy"] == "NO_SHARD"
    kwargs = {
        "mesh": meshes["replicated" if replicated else "sharded"],
        "reshard_after_forward": teacher or policy["strategy"] == "FULL_SHARD",
        "mp_policy": MixedPrecisionPolicy(param_dtype=policy["param_dtype"], reduce_dtype=policy["reduce_dtype"]),
    }
    for unit in getattr(module, "blocks", []):
        fully_shard(unit, **kwargs)
    fully_shard(module, **kwargs)
    if hasattr(module, "get_intermediate_layers"):  # a backbone's other entry point (linear probes)
        register_fsdp_forward_method(module, "get_intermediate_layers")


def check_sharding_plan(cfg: Any) -> None:
    """A student module and its teacher must agree on being sharded or replicated (NO_SHARD)."""
    for name in MODULES:
        student = module_policy(cfg, "student", name, False)["strategy"] == "NO_SHARD"
        teacher = module_policy(cfg, "teacher", name, False)["strategy"] == "NO_SHARD"
        if student != teacher:
            raise ValueError(
                f"compute_precision.student.{name} and compute_precision.teacher.{name} must both be sharded "
                "or both NO_SHARD: the teacher EMA pairs their local shards"
            )


def check_checkpointing_backend(mode: str, backends, device: torch.device) -> None:
    """Off CUDA, PyTorch's jagged attention (``varlen``) takes a math path that saves strided nested
    tensors for backward, which activation checkpointing cannot handle; fail before training."""
    if mode != "off" and device.type != "cuda" and "varlen" in backends:
        raise ValueError(
            f"student.attn_backend=varlen with train.activation_checkpointing={mode} does not run on "
            f"{device.type}: PyTorch's variable-length attention there saves nested tensors that "
            "checkpointing cannot recompute; use student.attn_backend=sdpa (or auto) on this device"
        )


def parallelize(model: nn.Module, cfg: Any, device: torch.device) -> dict[str, Any]:
    """Apply activation checkpointing, compile and (with more than one process) FSDP2 to the
    meta-architecture ``model`` in place; returns a summary for the log. Call it before the
    parameters are materialised (meta device) or after; FSDP2 shards whatever it finds."""
    from dinov2.distributed import get_world_size

    roles = tuple(getattr(model, "parallel_roles", DEFAULT_ROLES))
    summary: dict[str, Any] = {"activation_checkpointing": str(cfg.train.activation_checkpointing)}
    for attribute, _ in roles:
        apply_activation_checkpointing(getattr(model, attribute).backbone, cfg.train.activation_checkpointing)
        backends = resolve_attention_backends(getattr(model, attribute).backbone, device)
        check_checkpointing_backend(str(cfg.train.activation_checkpointing), backends, device)
        summary[f"{attribute}.attn_backend"] = "/".join(backends)
    summary["compiled_units"] = sum(apply_compile(getattr(model, a).backbone, cfg.train.compile) for a, _ in roles)
    if get_world_size() == 1:
        summary["fsdp"] = False
        return summary
    check_sharding_plan(cfg)
    mixed = use_mixed_precision(cfg, device)
    meshes = _meshes(device)
    for attribute, role in roles:
        modules = getattr(model, attribute)
        for name in MODULES:
            if name in modules:
                policy = module_policy(cfg, role, name, mixed)
                shard_module(modules[name], policy, meshes, teacher=role == "teacher")
                summary[f"{attribute}.{name}"] = (
                    f"{policy['strategy']} {policy['param_dtype']}/{policy['reduce_dtype']}"
                )
    summary["fsdp"] = True
    return summary
