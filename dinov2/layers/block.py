"""Pre-norm transformer block that runs one tensor or a list of token groups in one pass.

A list input (e.g. ``[global_crops (B, 1+256, D), local_crops (8B, 1+36, D)]``) is processed
"nested": the tokens of all groups are concatenated for the norms, ``qkv``, ``proj`` and MLP
matmuls, and attention stays within each sequence (:func:`dinov2.ops.nested_attention`).

Stochastic depth: for a drop rate above 0.1 in training, each residual branch is computed only
on a random subset of each group's samples and added back with ``index_add`` and the exact
inverse keep fraction (:mod:`dinov2.ops.residual`; xFormers' in-place ``scaled_index_add`` on CUDA
when installed and the block is not checkpointed), so the dropped samples cost nothing. For
smaller rates a per-sample :class:`DropPath` mask is cheaper than the gather/scatter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from dinov2.layers.attention import Attention
from dinov2.layers.drop_path import DropPath
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp
from dinov2.ops.residual import index_add_residual, sample_keep_subset
from dinov2.ops.xformers import xformers_available

# Above this drop rate the subset path saves more than its gather/scatter costs.
SUBSET_DROP_PATH_THRESHOLD = 0.1

GroupShapes = list[tuple[int, int]]

ACTIVATION_CHECKPOINTING = ("off", "full", "selective")


def _save_matmuls_policy() -> Callable:
    """Selective checkpointing: keep the outputs of matmuls and attention kernels (costly to
    recompute), recompute everything else (norms, activations, residual adds) in backward."""
    aten = torch.ops.aten
    names = (
        "mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
        # what SDPA on jagged tensors (varlen) and xFormers' CUTLASS kernel call on CUDA
        "_flash_attention_forward", "_efficient_attention_forward",
    )  # fmt: skip
    saved = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    # xFormers' flash kernels are custom ops of their own namespaces, registered when xFormers imports
    # (xformers_available() imports it once, lazily; False at once where it is not installed).
    for namespace in ("xformers_flash", "xformers_flash3") if xformers_available() else ():
        with contextlib.suppress(AttributeError, RuntimeError):
            saved.add(getattr(torch.ops, namespace).flash_fwd.default)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _concat_tokens(xs: list[torch.Tensor]) -> torch.Tensor:
    flat = [x.reshape(-1, x.shape[-1]) for x in xs]
    return flat[0] if len(flat) == 1 else torch.cat(flat, dim=0)


def _split_tokens(flat: torch.Tensor, shapes: GroupShapes) -> list[torch.Tensor]:
    parts = torch.split(flat, [b * n for b, n in shapes], dim=0)
    return [p.view(b, n, flat.shape[-1]) for p, (b, n) in zip(parts, shapes)]


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = Attention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
        attn_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
            backend=attn_backend,
        )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, bias=ffn_bias
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path
        # Activation checkpointing (off | full | selective), set by dinov2.distributed.parallelize.
        # Applied inside forward, so an FSDP2 unit around this block gathers its parameters once for
        # both the backward and the recomputation it triggers.
        self.checkpointing = "off"

    # The two residual branches, on flat (T, D) tokens.
    def _attn_branch(self, flat: torch.Tensor, shapes: GroupShapes) -> torch.Tensor:
        return self.ls1(self.attn.forward_nested(self.norm1(flat), shapes))

    def _ffn_branch(self, flat: torch.Tensor, shapes: GroupShapes) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(flat)))

    def _add_residual(self, xs: list[torch.Tensor], branch, drop_path: nn.Module) -> list[torch.Tensor]:
        shapes = [(x.shape[0], x.shape[1]) for x in xs]
        residuals = _split_tokens(branch(_concat_tokens(xs), shapes), shapes)
        return [x + drop_path(r) for x, r in zip(xs, residuals)]

    def _add_residual_on_subsets(self, xs: list[torch.Tensor], branch, inplace: bool = False) -> list[torch.Tensor]:
        subsets = [sample_keep_subset(x.shape[0], self.sample_drop_ratio, x.device) for x in xs]
        kept = [x[indices] for x, (indices, _) in zip(xs, subsets)]
        shapes = [(x.shape[0], x.shape[1]) for x in kept]
        residuals = _split_tokens(branch(_concat_tokens(kept), shapes), shapes)
        return [
            index_add_residual(x, indices, r, scale, inplace=inplace)
            for x, r, (indices, scale) in zip(xs, residuals, subsets)
        ]

    def forward_list(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.training and self.sample_drop_ratio > SUBSET_DROP_PATH_THRESHOLD:
            # The block's inputs are never written (under FSDP2 they come out of a custom autograd
            # function, which forbids that): the attention branch is added out of place, and the MLP
            # branch in place on that fresh result, unless checkpointing will re-run this forward.
            xs = self._add_residual_on_subsets(xs, self._attn_branch, inplace=False)
            return self._add_residual_on_subsets(xs, self._ffn_branch, inplace=self.checkpointing == "off")
        xs = self._add_residual(xs, self._attn_branch, self.drop_path1)
        return self._add_residual(xs, self._ffn_branch, self.drop_path2)

    def _checkpointed(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.checkpointing == "full":
            return checkpoint(self.forward_list, xs, use_reentrant=False)
        if self.checkpointing == "selective":
            context = partial(create_selective_checkpoint_contexts, _save_matmuls_policy())
            return checkpoint(self.forward_list, xs, use_reentrant=False, context_fn=context)
        raise ValueError(
            f"activation checkpointing {self.checkpointing!r}; valid: {', '.join(ACTIVATION_CHECKPOINTING)}"
        )

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        xs = x if isinstance(x, list) else [x]
        if self.checkpointing != "off" and torch.is_grad_enabled():
            out = self._checkpointed(xs)
        else:
            out = self.forward_list(xs)
        return out if isinstance(x, list) else out[0]


# Published name of the block that accepts lists; every Block here does.
NestedTensorBlock = Block
