"""Image to patch tokens."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import nn


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """``(v, v)`` for one integer (Python or NumPy), ``(h, w)`` for a pair (a sequence, or a 1-D NumPy
    array or tensor, which are no ``Sequence``); anything else is a TypeError."""
    if getattr(value, "ndim", None) == 1 and callable(getattr(value, "tolist", None)):
        value = value.tolist()
    try:
        if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2:
            return operator.index(value[0]), operator.index(value[1])
        size = operator.index(value)
    except TypeError:
        raise TypeError(f"expected an integer size or an (h, w) pair of integers, got {value!r}") from None
    return size, size


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` convolution: ``(B, C, H, W) -> (B, H/p * W/p, D)``.

    ``H`` and ``W`` must be multiples of the patch size; any other size is an error that names
    the size, never a silent crop.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: type[nn.Module] | None = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        self.patches_resolution = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:  # the convolution would take a 3-d (C, H, W) image and return its features unbatched
            raise ValueError(f"expected a batch of images (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        ph, pw = self.patch_size
        if height % ph or width % pw:
            raise ValueError(
                f"Input size {height}x{width} is not a multiple of the patch size {ph}x{pw}; "
                f"resize or crop the images to a multiple of {ph} (e.g. {height // ph * ph}x{width // pw * pw})."
            )
        x = self.proj(x)  # (B, D, H/p, W/p)
        grid_h, grid_w = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))
        if not self.flatten_embedding:
            x = x.reshape(-1, grid_h, grid_w, self.embed_dim)
        return x
