"""State-dict adapters: bring the checkpoint layouts users have to our backbone's layout.

Our backbones use the published DINOv2 key names. Other layouts in circulation:

- training checkpoints: ``{"teacher": {...}}`` (the original's ``teacher_checkpoint.pth``),
  ``{"model": {...}}`` with ``student.``/``teacher.`` prefixes, ``{"state_dict": {...}}``;
- ``backbone.`` prefixes next to ``dino_head.`` / ``ibot_head.`` keys;
- wrapper name segments: ``module.`` (DistributedDataParallel), ``_orig_mod.`` (torch.compile),
  ``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.`` (FSDP1, activation checkpointing);
- block-chunked keys ``blocks.{chunk}.{index}.`` from FSDP-era training (``block_chunks > 0``);
- a ``pos_embed`` stored for another image size (e.g. a 16 x 16 grid at 224 px into a 518 px model
  with 37 x 37): resampled to the model's grid with the model's own bicubic convention, and logged;
- Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` names, as the Hub's
  ``model.safetensors`` files store them (``attention.attention.query``, ``mlp.weights_in``, ...)
  or as transformers 5 modules name them (``attention.q_proj``, ``mlp.gate_proj``, ...), also
  under the ``dinov2.`` / ``dinov2_with_registers.`` prefix of the classification wrappers.

:func:`adapt_backbone_state_dict` normalises any of these to flat ``blocks.{index}.`` keys, then
re-chunks them if the target model is chunked and resamples ``pos_embed`` to its grid.
:func:`load_backbone_state_dict` loads the result and raises :class:`StateDictMismatchError`
listing every missing, unexpected or mis-shaped key: nothing is dropped silently. Keys outside
the backbone (heads) are only ever set aside when the checkpoint marks the backbone explicitly
with a ``backbone.`` prefix (or a Hugging Face wrapper's ``dinov2.`` prefix), and the report
lists them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from dinov2.distributed import is_sharded

logger = logging.getLogger("dinov2")

CONTAINER_KEYS = ("teacher", "model", "state_dict", "student")
# Name segments that wrappers insert anywhere in a key (DDP, torch.compile, FSDP1, checkpointing).
WRAPPER_SEGMENTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_WRAPPER_SEGMENT = re.compile(r"(?:^|(?<=\.))(?:" + "|".join(WRAPPER_SEGMENTS) + r")\.")
BRANCHES = ("teacher", "student")


def strip_wrapper_segments(name: str) -> str:
    """``name`` without the segments wrappers insert (``module.``, ``_orig_mod.``, FSDP1, checkpointing)."""
    return _WRAPPER_SEGMENT.sub("", name)


def strip_wrapper_keys(state: Mapping[str, object]) -> dict[str, object]:
    """``state`` with :func:`strip_wrapper_segments` applied to every key. Two keys that become one
    (``module.x`` beside ``x``) raise ``ValueError`` naming them: neither value may silently win."""
    stripped: dict[str, object] = {}
    sources: dict[str, str] = {}
    for key, value in state.items():
        name = strip_wrapper_segments(key)
        if name in sources:
            raise ValueError(
                f"keys {sources[name]!r} and {key!r} both become {name!r} once wrapper name segments "
                f"({', '.join(s + '.' for s in WRAPPER_SEGMENTS)}) are removed; the checkpoint holds two "
                "copies of one parameter"
            )
        sources[name] = key
        stripped[name] = value
    return stripped


_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.*)$")
_FLAT_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")


class StateDictMismatchError(RuntimeError):
    """A checkpoint does not fit a model: names the missing, unexpected and mis-shaped keys."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str], source: str = "") -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint{f' {source}' if source else ''} does not match the model:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                lines.append(f"  {title} keys: {shown}")
        super().__init__("\n".join(lines))


@dataclass
class AdaptReport:
    """What :func:`adapt_backbone_state_dict` did, for logs."""

    container: str | None = None
    stripped_prefixes: list[str] = field(default_factory=list)
    set_aside: list[str] = field(default_factory=list)
    unchunked: bool = False
    rechunked: bool = False
    pos_embed_grid: tuple[int, int] | None = None  # (checkpoint's, model's) grid side when resampled
    hugging_face: bool = False  # Hugging Face Dinov2 names renamed to the published ones


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _container_order(branch: str) -> tuple[str, ...]:
    """Container keys to try for ``branch``: its own, then the branch-neutral ones."""
    return (branch, *(k for k in CONTAINER_KEYS if k not in BRANCHES))


def _unwrap_container(checkpoint: Mapping, branch: str, report: AdaptReport) -> dict[str, torch.Tensor]:
    """The state dict in ``checkpoint``: itself, ``checkpoint[branch]``, or a branch-neutral
    container (``model``, ``state_dict``, whose keys may carry branch prefixes). A container of the
    other branch only is an error, never a silent substitute."""
    if _is_tensor_dict(checkpoint):
        return dict(checkpoint)
    top_level = sorted(map(str, checkpoint))[:10]
    for key in _container_order(branch):
        if key in checkpoint and _is_tensor_dict(checkpoint[key]):
            report.container = key
            return dict(checkpoint[key])
    others = [b for b in BRANCHES if b != branch and b in checkpoint and _is_tensor_dict(checkpoint[b])]
    if others:
        raise ValueError(
            f"branch={branch!r} was requested but the checkpoint holds only a {others[0]!r} state dict "
            f"(top-level keys: {top_level}); pass branch={others[0]!r} to load it"
        )
    detail = f"top-level keys are {top_level}"
    if isinstance(checkpoint, Mapping) and any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        # tensors next to a counter or a config: name what is in the way
        others = [f"{k!r} ({type(v).__name__})" for k, v in checkpoint.items() if not isinstance(v, torch.Tensor)]
        detail = f"entries that are not tensors: {', '.join(others[:10])}"
    raise ValueError(
        "Not a state dict: expected a mapping of parameter names to tensors, or one stored under "
        f"{', '.join(repr(k) for k in CONTAINER_KEYS)}; {detail}"
    )


def _select_prefix(state: dict, prefix: str, report: AdaptReport) -> dict:
    """Keep the keys under ``prefix`` (stripped); record the others as set aside."""
    kept = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    report.set_aside.extend(k for k in state if not k.startswith(prefix))
    report.stripped_prefixes.append(prefix)
    return kept


def _unchunk(state: dict, report: AdaptReport) -> dict:
    out = {}
    for key, value in state.items():
        match = _CHUNKED_BLOCK.match(key)
        if match:
            report.unchunked = True
            key = f"blocks.{match.group(2)}.{match.group(3)}"
        out[key] = value
    return out


def _chunk(state: dict, chunk_size: int) -> dict:
    out = {}
    for key, value in state.items():
        match = _FLAT_BLOCK.match(key)
        if match:
            index = int(match.group(1))
            key = f"blocks.{index // chunk_size}.{index}.{match.group(2)}"
        out[key] = value
    return out


def _chunk_size(model: nn.Module) -> int | None:
    if not getattr(model, "chunked_blocks", False):
        return None
    first_chunk = model.blocks[0]
    return sum(not isinstance(b, nn.Identity) for b in first_chunk)


def adapt_backbone_state_dict(
    checkpoint: Mapping, model: nn.Module | None = None, branch: str = "teacher"
) -> tuple[dict[str, torch.Tensor], AdaptReport]:
    """Normalise ``checkpoint`` to the backbone key layout of ``model`` (flat if ``model`` is None).

    ``branch`` picks ``teacher`` (default, the model DINOv2 evaluates and releases) or
    ``student`` when the checkpoint holds both; a checkpoint that holds only the other branch
    raises ``ValueError``.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    report = AdaptReport()
    state = _unwrap_container(checkpoint, branch, report)
    stripped = strip_wrapper_keys(state)
    if stripped.keys() != state.keys():
        report.stripped_prefixes.extend(sorted({m for k in state for m in _WRAPPER_SEGMENT.findall(k)}))
    state = stripped
    if any(k.startswith(f"{b}.") for k in state for b in BRANCHES):
        if not any(k.startswith(f"{branch}.") for k in state):
            raise ValueError(
                f"checkpoint has no '{branch}.' keys (it holds: {sorted({k.split('.')[0] for k in state})})"
            )
        state = _select_prefix(state, f"{branch}.", report)
    if any(k.startswith("backbone.") for k in state):
        state = _select_prefix(state, "backbone.", report)
    state = _from_hugging_face(state, report)
    state = _unchunk(state, report)
    size = _chunk_size(model) if model is not None else None
    if size:
        state = _chunk(state, size)
        report.rechunked = True
    if model is not None:
        _fit_pos_embed(state, model, report)
    return state, report


def branch_state_dict(checkpoint: Mapping, branch: str = "teacher") -> dict[str, torch.Tensor]:
    """The tensors of one branch of a training-side file, keys relative to the branch (``backbone.*``,
    ``dino_head.*``, ``ibot_head.*``), wrapper segments stripped, old weight-norm names converted.

    The file may be an export (``{"teacher": {...}}``), a whole model's state dict (``{"model":
    {teacher.*, student.*}}``, ``{"state_dict": ...}``, or flat with or without branch prefixes);
    entries that are not tensors (an iteration counter...) are left out.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    state = checkpoint[branch] if isinstance(checkpoint.get(branch), Mapping) else checkpoint
    for container in ("model", "state_dict"):
        if state is checkpoint and isinstance(checkpoint.get(container), Mapping):
            state = checkpoint[container]
    state = strip_wrapper_keys({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    if any(k.startswith(f"{branch}.") for k in state):  # that branch's part, never the other's
        state = {k[len(branch) + 1 :]: v for k, v in state.items() if k.startswith(f"{branch}.")}
    return convert_weight_norm_keys(state)


def adapt_head_state_dict(checkpoint: Mapping, head: str, branch: str = "teacher") -> dict[str, torch.Tensor]:
    """The tensors of the projection head ``head`` (``dino_head``, ``ibot_head``) of ``branch`` in
    ``checkpoint`` (see :func:`branch_state_dict`), keys relative to the head; empty when the file
    has none (a backbone-only file)."""
    prefix = f"{head}."
    return {k[len(prefix) :]: v for k, v in branch_state_dict(checkpoint, branch).items() if k.startswith(prefix)}


# ---------------------------------------------------------------------- Hugging Face names
# Wrapper prefixes of transformers' task models (e.g. Dinov2ForImageClassification).
HF_WRAPPER_PREFIXES = ("dinov2.", "dinov2_with_registers.")
_HF_ROOT = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
# Inside encoder.layer.N.: one-to-one renames (Hub files and transformers 5 modules).
_HF_LAYER_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1": "ls1",
    "layer_scale2": "ls2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",  # SwiGLU, Hub files: [gate; up] as one matrix, as ours
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
}
# Inside encoder.layer.N.: pieces concatenated along dim 0 into one of our tensors, in this order.
_HF_LAYER_CONCATS = {
    "attn.qkv": (
        ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
    ),
    "mlp.w12": (("mlp.gate_proj", "mlp.up_proj"),),  # SwiGLU, transformers 5: hidden = silu(gate) * up
}
_HF_LEAVES = {"weight": "weight", "bias": "bias", "lambda1": "gamma"}
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$")


def _is_hugging_face(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("embeddings.patch_embeddings.", "encoder.layer.")) for k in state)


def _strip_hf_wrapper(state: dict, report: AdaptReport) -> dict:
    """Keep the backbone of a transformers task model (``dinov2.*``), setting its heads aside."""
    for prefix in HF_WRAPPER_PREFIXES:
        inner = {k[len(prefix) :] for k in state if k.startswith(prefix)}
        if _is_hugging_face(inner):
            return _select_prefix(state, prefix, report)
    return state


def _hf_target(key: str) -> str | None:
    """Our name for the one-to-one renamed HF ``key``, or None."""
    match = _HF_LAYER.match(key)
    if match is None:
        return _HF_ROOT.get(key)
    index, module, leaf = match.groups()
    ours = _HF_LAYER_RENAMES.get(module)
    return f"blocks.{index}.{ours}.{_HF_LEAVES[leaf]}" if ours else None


def _concat_hf_pieces(state: dict, out: dict, index: str) -> None:
    """Concatenate split q/k/v (and gate/up) tensors of layer ``index`` into ``out``, removing them
    from ``state``. A partial set is an error naming the pieces that are there."""
    for target, layouts in _HF_LAYER_CONCATS.items():
        for layout in layouts:
            for leaf in ("weight", "bias"):
                names = [f"encoder.layer.{index}.{piece}.{leaf}" for piece in layout]
                present = [n for n in names if n in state]
                if not present:
                    continue
                if len(present) != len(names):
                    raise ValueError(f"Hugging Face checkpoint has {present} but not all of {names}")
                ours = f"blocks.{index}.{target}.{leaf}"
                if ours in out:
                    raise ValueError(f"Hugging Face checkpoint: {names} and another set both map to {ours!r}")
                out[ours] = torch.cat([state.pop(n) for n in names], dim=0)


def _from_hugging_face(state: dict, report: AdaptReport) -> dict:
    """Hugging Face Dinov2 names -> the published layout; other keys keep their names (so the
    strict check reports any left over)."""
    state = _strip_hf_wrapper(state, report)
    if not _is_hugging_face(state):
        return state
    state = dict(state)
    out: dict[str, torch.Tensor] = {}
    for index in sorted({m.group(1) for k in state if (m := _HF_LAYER.match(k))}, key=int):
        _concat_hf_pieces(state, out, index)
    for key, value in state.items():
        target = _hf_target(key) or key
        if target in out:
            raise ValueError(f"Hugging Face checkpoint: {key!r} and another key both map to {target!r}")
        out[target] = value
    report.hugging_face = True
    logger.info("Hugging Face Dinov2 key names renamed to the published DINOv2 layout")
    return out


def _grid_side(tokens: int) -> int | None:
    side = math.isqrt(max(tokens, 0))
    return side if side > 0 and side * side == tokens else None


def _fit_pos_embed(state: dict, model: nn.Module, report: AdaptReport) -> None:
    """Resample ``state["pos_embed"]`` in place to ``model``'s position grid when only the grid
    differs: same width, same patch embedding (a grid that differs because the patch size does is
    left for the strict check to report), square grids on both sides."""
    from dinov2.models.vision_transformer import resample_pos_embed

    target = getattr(model, "pos_embed", None)
    source = state.get("pos_embed")
    if not isinstance(target, torch.Tensor) or source is None or source.shape == target.shape:
        return
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    stored_proj = state.get("patch_embed.proj.weight")
    if proj is None or stored_proj is None or stored_proj.shape != proj.weight.shape:
        return
    prefix = int(getattr(model, "num_tokens", 1))
    old, new = _grid_side(source.shape[1] - prefix), _grid_side(target.shape[1] - prefix)
    if old is None or new is None or source.ndim != 3 or (source.shape[0], source.shape[2]) != (1, target.shape[2]):
        return
    offset, antialias = float(model.interpolate_offset), bool(model.interpolate_antialias)
    state["pos_embed"] = resample_pos_embed(source, prefix, (new, new), offset, antialias).to(source.dtype)
    report.pos_embed_grid = (old, new)
    logger.info(
        "pos_embed resampled from a %dx%d to a %dx%d patch grid (bicubic, interpolate_offset %g, antialias %s)",
        old, old, new, new, offset, antialias,
    )  # fmt: skip


# The original heads used the deprecated torch.nn.utils.weight_norm; ours use parametrizations.
_WEIGHT_NORM_KEYS = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}


def convert_weight_norm_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``*.weight_g`` / ``*.weight_v`` (old weight-norm API) to the parametrization keys."""
    out = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in _WEIGHT_NORM_KEYS:
            key = f"{prefix}.{_WEIGHT_NORM_KEYS[leaf]}" if prefix else _WEIGHT_NORM_KEYS[leaf]
        out[key] = value
    return out


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Raise :class:`StateDictMismatchError` unless ``state`` has exactly ``model``'s keys and shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise StateDictMismatchError(missing, unexpected, mismatched, source)


def load_backbone_state_dict(
    model: nn.Module, checkpoint: Mapping, branch: str = "teacher", source: str = ""
) -> AdaptReport:
    """Adapt ``checkpoint`` to ``model`` and load it strictly. Returns what was adapted."""
    state, report = adapt_backbone_state_dict(checkpoint, model, branch=branch)
    load_module_state_dict(model, state, source)
    return report


def load_module_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "") -> None:
    """Load whole tensors into ``module`` strictly (:func:`check_state_dict` first), plain or
    FSDP2-sharded (each rank keeps its shard of every tensor)."""
    check_state_dict(module, state, source)
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        module.load_state_dict(state, strict=True)
