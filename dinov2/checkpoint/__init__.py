"""Checkpoint I/O, state-dict adapters and sharded training checkpoints (DCP; atomic, with retention), exports."""

from dinov2.checkpoint.adapters import (
    AdaptReport,
    StateDictMismatchError,
    adapt_backbone_state_dict,
    adapt_head_state_dict,
    branch_state_dict,
    check_state_dict,
    convert_weight_norm_keys,
    load_backbone_state_dict,
    load_module_state_dict,
)
from dinov2.checkpoint.io import load_weights_file
from dinov2.checkpoint.lock import OutputDirectoryInUseError
from dinov2.checkpoint.sharded import (
    CheckpointNotVisibleError,
    CheckpointWriteError,
    agreed_latest_checkpoint,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dinov2.checkpoint.training import (
    CheckpointLoadError,
    atomic_torch_save,
    atomic_write,
    capture_rng_state,
    export_teacher,
    restore_rng_state,
)
