"""Neural-network modules with the published DINOv2 parameter names."""

from dinov2.layers.attention import Attention, MemEffAttention
from dinov2.layers.block import Block, NestedTensorBlock
from dinov2.layers.dino_head import DINOHead
from dinov2.layers.drop_path import DropPath
from dinov2.layers.layer_scale import LayerScale
from dinov2.layers.mlp import Mlp, SwiGLUFFN, SwiGLUFFNFused
from dinov2.layers.patch_embed import PatchEmbed
