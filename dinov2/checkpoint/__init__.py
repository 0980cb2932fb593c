"""Checkpoint I/O, state-dict adapters and training checkpoints (atomic saves, retention, exports)."""

from dinov2.checkpoint.adapters import (
    AdaptReport,
    StateDictMismatchError,
    adapt_backbone_state_dict,
    check_state_dict,
    convert_weight_norm_keys,
    load_backbone_state_dict,
)
from dinov2.checkpoint.io import load_weights_file
from dinov2.checkpoint.training import (
    CheckpointLoadError,
    atomic_torch_save,
    capture_rng_state,
    export_teacher,
    find_latest_checkpoint,
    load_training_checkpoint,
    restore_rng_state,
    save_training_checkpoint,
)
