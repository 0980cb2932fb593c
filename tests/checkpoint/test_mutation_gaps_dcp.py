"""The DCP storage layer: behaviour a mutation audit found untested (a shard short by one byte, and
metadata pickles that name a torch function or a pathlib attribute other than a path class)."""

from __future__ import annotations

import re

import pytest
import torch
from test_hostile_storage import _save
from test_training_checkpoint import _model_and_optimizer

from dinov2.checkpoint import CheckpointLoadError, load_checkpoint
from dinov2.checkpoint.sharded import load_full_tensors


def test_a_shard_short_by_its_last_byte_is_named_with_the_size_the_metadata_needs(tmp_path):
    model, optimizer = _model_and_optimizer()
    path = _save(tmp_path, 3, model, optimizer)
    shard = path / "__0_0.distcp"
    size = shard.stat().st_size  # the items are written back to back: the last one ends at the file's end
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CheckpointLoadError, match=rf"{re.escape(str(shard))} is truncated: {size - 1} bytes of {size}"):
        load_checkpoint(path, model, optimizer)


@pytest.mark.parametrize(
    ("payload", "named"),
    [
        (b"\x80\x02ctorch\nmanual_seed\nK\x07\x85R.", "torch.manual_seed"),  # torch.manual_seed(7): not a dtype
        (b"\x80\x02cpathlib\nos\n.", "pathlib.os"),  # pathlib's os module: not a path class
    ],
)
def test_metadata_naming_torch_or_pathlib_attributes_other_than_dtypes_and_paths_is_refused(tmp_path, payload, named):
    model, optimizer = _model_and_optimizer(0)
    path = _save(tmp_path, 1, model, optimizer)
    (path / ".metadata").write_bytes(payload)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    with pytest.raises(CheckpointLoadError, match=re.escape(named)):
        load_full_tensors(path, "model.")
    assert torch.equal(torch.rand(3), expected_next)  # nothing in the payload ran
