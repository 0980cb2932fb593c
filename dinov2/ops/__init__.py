"""Functional kernels with interchangeable backends (PyTorch-native first, xFormers optional)."""

from dinov2.ops.attention import (
    BACKENDS,
    attention,
    math_attention,
    nested_attention,
    nested_attention_parts,
    resolve_backend,
)
from dinov2.ops.residual import index_add_residual, sample_keep_subset
from dinov2.ops.xformers import xformers_available
