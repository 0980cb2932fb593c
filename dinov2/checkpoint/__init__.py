"""Checkpoint I/O and state-dict adapters."""

from dinov2.checkpoint.adapters import (
    AdaptReport,
    StateDictMismatchError,
    adapt_backbone_state_dict,
    check_state_dict,
    convert_weight_norm_keys,
    load_backbone_state_dict,
)
from dinov2.checkpoint.io import load_weights_file
