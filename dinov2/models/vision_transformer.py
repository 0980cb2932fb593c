"""The DINOv2 Vision Transformer and its architecture registry.

Parameter names and shapes follow the published DINOv2 backbones exactly, so an official
``dinov2_vit*14[_reg]_pretrain.pth`` loads with ``strict=True`` (see :mod:`dinov2.hub`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from dinov2.layers import Block, Mlp, PatchEmbed, SwiGLUFFN, SwiGLUFFNFused
from dinov2.layers.layer_scale import LayerScale
from dinov2.ops.attention import check_backend

FFN_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFN,
    "swiglufused": SwiGLUFFNFused,
}


def resample_pos_embed(
    pos_embed: torch.Tensor, num_prefix: int, grid: tuple[int, int], offset: float = 0.1, antialias: bool = False
) -> torch.Tensor:
    """``pos_embed`` (1, num_prefix + side * side, D) with its square patch grid resampled to
    ``grid`` = (rows, columns): (1, num_prefix + rows * columns, D) in float32; the ``num_prefix``
    leading (CLS) positions are kept. Bicubic; with ``offset`` the target is given as the scale
    factor ``(grid + offset) / side`` (the released models' convention), with offset 0 as the size.
    The model's forward (:meth:`DinoVisionTransformer.interpolate_pos_encoding`) and the checkpoint
    adapters (:mod:`dinov2.checkpoint.adapters`) both resample through this function."""
    stored = pos_embed.shape[1] - num_prefix
    side = math.isqrt(stored)
    if side * side != stored:
        raise ValueError(f"position embeddings hold {stored} patch positions, not a square grid")
    grid_h, grid_w = grid
    pos_embed = pos_embed.float()
    prefix, patch_pos = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    patch_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if offset:
        size_kwargs = {"scale_factor": ((grid_h + offset) / side, (grid_w + offset) / side)}
    else:
        size_kwargs = {"size": (grid_h, grid_w)}
    patch_pos = F.interpolate(patch_pos, mode="bicubic", antialias=antialias, **size_kwargs)
    if tuple(patch_pos.shape[-2:]) != (grid_h, grid_w):
        raise RuntimeError(f"position interpolation produced {tuple(patch_pos.shape[-2:])}, not {(grid_h, grid_w)}")
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
    return torch.cat((prefix, patch_pos), dim=1)


class BlockChunk(nn.Module):
    """A run of consecutive blocks, padded in front with ``nn.Identity`` so that parameter keys
    read ``blocks.{chunk}.{global_index}.`` as in the original's FSDP-wrapped checkpoints.

    A plain module with numbered children rather than an ``nn.ModuleList``: the keys are the same,
    and FSDP2's ``fully_shard`` in some torch releases (2.11) refuses any ``ModuleList`` or
    ``ModuleDict``, even one that defines ``forward``."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        for index, block in enumerate(blocks):
            self.add_module(str(index), block)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> nn.Module:
        return list(self._modules.values())[index]

    def forward(self, x):
        for block in self:
            x = block(x)
        return x


def _as_index(value) -> int | None:
    """``value`` as a Python int when it is one integer (int, numpy integer, 0-d integer tensor), else None."""
    if isinstance(value, torch.Tensor) and value.ndim > 0:
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def init_weights_vit_timm(module: nn.Module) -> None:
    """ViT initialisation for linear layers: truncated normal (std 0.02), zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = Block,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: str = "auto",
    ) -> None:
        """
        Args (as in the published DINOv2 code, plus ``attn_backend``):
            img_size: training resolution; sets the stored position-embedding grid.
            patch_size: patch side in pixels (14 for the released models).
            init_values: LayerScale initial value; ``None`` or 0 disables LayerScale.
            drop_path_rate: stochastic-depth rate; linearly increasing over depth unless
                ``drop_path_uniform``.
            ffn_layer: ``mlp`` | ``swiglu`` | ``swiglufused`` (same parameters; the last is the fused kernel).
            block_chunks: 0 for a flat ``blocks.N.`` list, else the number of chunks.
            num_register_tokens: extra learnable tokens after CLS ("registers").
            interpolate_antialias / interpolate_offset: position-embedding resampling settings
                (the released registers models use ``True`` / ``0.0``, the others ``False`` / ``0.1``).
            attn_backend: ``math`` | ``sdpa`` | ``varlen`` | ``xformers`` | ``auto`` (see dinov2.ops.attention).
        """
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"Unknown ffn_layer {ffn_layer!r}; valid: {', '.join(FFN_LAYERS)}")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches
        rows, cols = getattr(self.patch_embed, "patches_resolution", (math.isqrt(num_patches),) * 2)
        if rows != cols or rows * cols != num_patches:  # resample_pos_embed reads the stored grid as square
            raise ValueError(f"img_size {img_size}: the position embeddings are stored for a square patch grid")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )

        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear 0 -> rate
        blocks = [
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=rates[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=FFN_LAYERS[ffn_layer],
                init_values=init_values,
                attn_backend=attn_backend,
            )
            for i in range(depth)
        ]
        self.chunked_blocks = block_chunks > 0
        if self.chunked_blocks:
            if depth % block_chunks:
                raise ValueError(f"depth {depth} is not divisible by block_chunks {block_chunks}")
            size = depth // block_chunks
            self.blocks = nn.ModuleList(
                BlockChunk([nn.Identity()] * start + blocks[start : start + size]) for start in range(0, depth, size)
            )
        else:
            self.blocks = nn.ModuleList(blocks)

        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    # ------------------------------------------------------------------ construction helpers
    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            init_weights_vit_timm(module)
            if isinstance(module, LayerScale):
                module.reset_parameters()

    def iter_blocks(self) -> Iterator[nn.Module]:
        """The transformer blocks in order, whether or not they are chunked."""
        for item in self.blocks:
            if isinstance(item, BlockChunk):
                yield from (b for b in item if not isinstance(b, nn.Identity))
            else:
                yield item

    def set_attn_backend(self, backend: str) -> None:
        """Switch every attention layer to ``backend`` (no parameter changes); an unknown name is
        refused here, not at the next forward."""
        check_backend(backend)
        for block in self.iter_blocks():
            block.attn.backend = backend

    # ------------------------------------------------------------------ tokens
    def interpolate_pos_encoding(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Position embeddings (CLS + patch grid) for an image of ``height`` x ``width`` pixels:
        the stored grid as is when it fits, else :func:`resample_pos_embed` with this model's
        ``interpolate_offset`` and ``interpolate_antialias``.

        Returned in the stored parameter's dtype, not ``x``'s: adding it to the tokens lets type
        promotion pick the residual stream's dtype (float32 under bf16 autocast, as in the
        original; bfloat16 for a model converted with ``.to(torch.bfloat16)``). ``x`` is kept for
        the original's signature."""
        side = math.isqrt(self.pos_embed.shape[1] - self.num_tokens)
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        if (grid_h, grid_w) == (side, side):
            return self.pos_embed
        pos_embed = resample_pos_embed(
            self.pos_embed, self.num_tokens, (grid_h, grid_w), self.interpolate_offset, self.interpolate_antialias
        )
        return pos_embed.to(self.pos_embed.dtype)

    def prepare_tokens_with_masks(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens (masked ones replaced by ``mask_token``), CLS, positions, then registers.

        The CLS and register tokens and the position embeddings enter in their own (parameter)
        dtype, so under autocast, where the patch embedding yields bfloat16, concatenation and
        addition promote the residual stream to float32 as in the original. Only the mask token
        is cast, to the patch tokens' dtype, as in the original: it stands in for patch tokens."""
        height, width = x.shape[-2:]
        x = self.patch_embed(x)  # checks the input is (B, C, H, W)
        batch = x.shape[0]
        if masks is not None:
            if masks.shape != x.shape[:2]:
                raise ValueError(
                    f"masks must have shape (batch, num_patches) = {tuple(x.shape[:2])}, got {tuple(masks.shape)}"
                )
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1)
            x = torch.cat((x[:, :1], registers, x[:, 1:]), dim=1)
        return x

    def _output_dict(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        x_norm = self.norm(x)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:first_patch],
            "x_norm_patchtokens": x_norm[:, first_patch:],
            "x_prenorm": x,
            "masks": masks,
        }

    # ------------------------------------------------------------------ forward passes
    def forward_features_list(
        self, x_list: Sequence[torch.Tensor], masks_list: Sequence[torch.Tensor | None] | None = None
    ) -> list[dict[str, torch.Tensor | None]]:
        """Run groups of images of different sizes (e.g. global and local crops) in one nested
        pass: every block sees all groups' tokens at once. Returns one output dict per group."""
        masks_list = list(masks_list) if masks_list is not None else [None] * len(x_list)
        if len(masks_list) != len(x_list):
            raise ValueError(f"got {len(x_list)} image groups but {len(masks_list)} masks")
        xs = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        for block in self.blocks:  # blocks or chunks: each may be its own FSDP2 unit
            xs = block(xs)
        return [self._output_dict(x, m) for x, m in zip(xs, masks_list)]

    def forward_features(self, x, masks: torch.Tensor | None = None):
        """Dict of ``x_norm_clstoken`` (B, D), ``x_norm_regtokens`` (B, R, D), ``x_norm_patchtokens``
        (B, N, D), ``x_prenorm`` (B, 1+R+N, D) and ``masks``. A list input goes to
        :meth:`forward_features_list`."""
        if isinstance(x, list):
            return self.forward_features_list(x, masks)
        x_tokens = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            x_tokens = block(x_tokens)
        return self._output_dict(x_tokens, masks)

    def _block_indices(self, n: int | Sequence[int]) -> list[int]:
        total = self.n_blocks
        count = _as_index(n)  # an int, numpy integer or 0-d integer tensor: the last ``n`` blocks
        if count is not None:
            if not 1 <= count <= total:
                raise ValueError(f"n={count} must be between 1 and the depth ({total})")
            return list(range(total - count, total))
        try:
            given = [operator.index(i) for i in n]
        except TypeError:
            raise TypeError(f"n must be an int or a sequence of block indices, got {n!r}") from None
        indices = sorted({i + total if i < 0 else i for i in given})
        if not indices or indices[0] < 0 or indices[-1] >= total:
            raise ValueError(f"block indices {given} out of range for a depth of {total}")
        if len(indices) != len(given):  # one output per block: [1, 1] or [-1, depth - 1] would give fewer
            raise ValueError(f"block indices {given} name a block more than once (depth {total})")
        return indices

    def _get_intermediate_layers(self, x: torch.Tensor, n: int | Sequence[int]) -> list[torch.Tensor]:
        """The wanted blocks' outputs, caught by forward hooks while ``self.blocks`` runs unit by unit:
        a chunk runs whole through its own forward (it may be an FSDP2 unit, or compiled), never block
        by block; units past the last wanted block do not run."""
        wanted = self._block_indices(n)
        blocks = list(self.iter_blocks())
        caught: dict[int, torch.Tensor] = {}

        def catcher(index: int):
            def hook(_module, _inputs, output):
                caught[index] = output

            return hook

        handles = [blocks[i].register_forward_hook(catcher(i)) for i in wanted]
        try:
            x = self.prepare_tokens_with_masks(x)
            for unit in self.blocks:
                x = unit(x)
                if wanted[-1] in caught:
                    break
        finally:
            for handle in handles:
                handle.remove()
        return [caught[i] for i in wanted]

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ):
        """Outputs of the last ``n`` blocks (``n`` an int) or of the blocks at indices ``n``
        (a list, each block at most once; negative indices count from the end), in block order.

        Returns a tuple of patch-token tensors (B, N, D), or (B, D, h, w) with ``reshape``; with
        ``return_class_token`` a tuple of ``(patch_tokens, class_token)`` pairs. ``norm`` applies
        the final LayerNorm to each output. Register tokens are never included.
        """
        outputs = self._get_intermediate_layers(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            grid = (height // self.patch_size, width // self.patch_size)
            outputs = [out.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def forward(self, *args, is_training: bool = False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        return self.head(ret["x_norm_clstoken"])


# ---------------------------------------------------------------------- architecture registry
def _vit(shape: dict, patch_size: int, num_register_tokens: int, kwargs: dict) -> DinoVisionTransformer:
    """The architecture ``shape`` (embed_dim, depth, num_heads, mlp_ratio); ``kwargs`` may override any
    of them (small ablations: e.g. ``vit_tiny(depth=6)``) and set the other constructor arguments."""
    return DinoVisionTransformer(patch_size=patch_size, num_register_tokens=num_register_tokens, **{**shape, **kwargs})


def vit_tiny(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-Ti (DeiT-Tiny shape): width 192, 12 blocks, 3 heads; for laptops and quick experiments."""
    shape = {"embed_dim": 192, "depth": 12, "num_heads": 3, "mlp_ratio": 4}
    return _vit(shape, patch_size, num_register_tokens, kwargs)


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    shape = {"embed_dim": 384, "depth": 12, "num_heads": 6, "mlp_ratio": 4}
    return _vit(shape, patch_size, num_register_tokens, kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    shape = {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4}
    return _vit(shape, patch_size, num_register_tokens, kwargs)


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    shape = {"embed_dim": 1024, "depth": 24, "num_heads": 16, "mlp_ratio": 4}
    return _vit(shape, patch_size, num_register_tokens, kwargs)


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-g as in DINOv2: width 1536, 40 blocks, 24 heads (64 dims each); use with SwiGLU."""
    shape = {"embed_dim": 1536, "depth": 40, "num_heads": 24, "mlp_ratio": 4}
    return _vit(shape, patch_size, num_register_tokens, kwargs)


ARCHS: dict[str, Callable[..., DinoVisionTransformer]] = {
    "vit_tiny": vit_tiny,
    "vit_small": vit_small,
    "vit_base": vit_base,
    "vit_large": vit_large,
    "vit_giant2": vit_giant2,
}
