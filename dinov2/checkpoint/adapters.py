"""State-dict adapters: bring the checkpoint layouts users have to our backbone's layout.

Our backbones use the published DINOv2 key names. Other layouts in circulation:

- training checkpoints: ``{"teacher": {...}}`` (the original's ``teacher_checkpoint.pth``),
  ``{"model": {...}}`` with ``student.``/``teacher.`` prefixes, ``{"state_dict": {...}}``;
- ``backbone.`` prefixes next to ``dino_head.`` / ``ibot_head.`` keys;
- wrapper name segments: ``module.`` (DistributedDataParallel), ``_orig_mod.`` (torch.compile),
  ``_fsdp_wrapped_module.`` / ``_checkpoint_wrapped_module.`` (FSDP1, activation checkpointing);
- block-chunked keys ``blocks.{chunk}.{index}.`` from FSDP-era training (``block_chunks > 0``).

:func:`adapt_backbone_state_dict` normalises any of these to flat ``blocks.{index}.`` keys, then
re-chunks them if the target model is chunked. :func:`load_backbone_state_dict` loads the result
and raises :class:`StateDictMismatchError` listing every missing, unexpected or mis-shaped key:
nothing is dropped silently. Keys outside the backbone (heads) are only ever set aside when the
checkpoint marks the backbone explicitly with a ``backbone.`` prefix, and the report lists them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from dinov2.distributed import is_sharded

CONTAINER_KEYS = ("teacher", "model", "state_dict", "student")
# Name segments that wrappers insert anywhere in a key (DDP, torch.compile, FSDP1, checkpointing).
WRAPPER_SEGMENTS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
_WRAPPER_SEGMENT = re.compile(r"(?:^|(?<=\.))(?:" + "|".join(WRAPPER_SEGMENTS) + r")\.")
BRANCHES = ("teacher", "student")


def strip_wrapper_segments(name: str) -> str:
    """``name`` without the segments wrappers insert (``module.``, ``_orig_mod.``, FSDP1, checkpointing)."""
    return _WRAPPER_SEGMENT.sub("", name)


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


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap_container(checkpoint: Mapping, report: AdaptReport) -> dict[str, torch.Tensor]:
    if _is_tensor_dict(checkpoint):
        return dict(checkpoint)
    for key in CONTAINER_KEYS:
        if key in checkpoint and _is_tensor_dict(checkpoint[key]):
            report.container = key
            return dict(checkpoint[key])
    raise ValueError(
        "Not a state dict: expected a mapping of parameter names to tensors, or one stored under "
        f"{', '.join(repr(k) for k in CONTAINER_KEYS)}; top-level keys are {sorted(map(str, checkpoint))[:10]}"
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
    ``student`` when the checkpoint holds both.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
    report = AdaptReport()
    state = _unwrap_container(checkpoint, report)
    stripped = {strip_wrapper_segments(k): v for k, v in state.items()}
    if len(stripped) != len(state):
        raise ValueError("removing wrapper prefixes (module., _orig_mod., ...) made keys collide")
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
    state = _unchunk(state, report)
    size = _chunk_size(model) if model is not None else None
    if size:
        state = _chunk(state, size)
        report.rechunked = True
    return state, report


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
    check_state_dict(model, state, source)
    if is_sharded(model):  # FSDP2: each rank keeps its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=True))
    else:
        model.load_state_dict(state, strict=True)
    return report
