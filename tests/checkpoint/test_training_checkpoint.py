import random
import re
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from dinov2.checkpoint import (
    CheckpointLoadError,
    CheckpointWriteError,
    atomic_torch_save,
    capture_rng_state,
    export_teacher,
    find_latest_checkpoint,
    load_backbone_state_dict,
    load_checkpoint,
    load_weights_file,
    restore_rng_state,
    save_checkpoint,
)
from dinov2.checkpoint.sharded import load_full_tensors
from dinov2.layers import DINOHead
from dinov2.models import DinoVisionTransformer


def _names(directory):
    return sorted(p.name for p in directory.iterdir())


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((3, 4), value)}, "iteration": int(value), "note": f"v{value}"}


def _assert_state_equal(loaded, expected):
    assert loaded.keys() == expected.keys()
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert loaded["iteration"] == expected["iteration"] and loaded["note"] == expected["note"]


# ------------------------------------------------------------------------------ atomic writes
def test_atomic_save_writes_and_overwrites(tmp_path):
    path = tmp_path / "state.pth"
    atomic_torch_save(_state(1.0), path)
    atomic_torch_save(_state(2.0), path)
    _assert_state_equal(torch.load(path, weights_only=True), _state(2.0))
    assert _names(tmp_path) == ["state.pth"]


# ------------------------------------------------------------------ sharded (DCP) checkpoints
def _model_and_optimizer(seed: int = 0, width: int = 5):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, width), nn.GELU(), nn.Linear(width, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 6)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def _save(directory, iteration, model, optimizer, keep_last=3, note="x"):
    return save_checkpoint(directory, iteration, model, optimizer, {"iteration": iteration, "note": note},
                           capture_rng_state(), keep_last=keep_last)  # fmt: skip


def test_checkpoint_round_trip_restores_model_optimizer_and_state(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    path = _save(tmp_path, 7, model, optimizer, note="seven")
    assert path == tmp_path / "step_0000007" and (path / ".metadata").is_file()
    fresh, fresh_opt = _model_and_optimizer(1)
    state = load_checkpoint(path, fresh, fresh_opt)
    assert state["iteration"] == 7 and state["note"] == "seven" and state["world_size"] == 1
    assert state["rng"] is not None  # same world size: this rank's RNG states come back
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for group in optimizer.state.values():
        assert any(torch.equal(group["exp_avg"], g["exp_avg"]) for g in fresh_opt.state.values())
    # and the tensors can be read whole without any model (as consolidation does)
    weights = load_full_tensors(path, "model.")
    assert torch.equal(weights["0.weight"], model[0].weight.detach())


def test_failed_save_leaves_previous_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model, optimizer = _model_and_optimizer(0)
    previous = _save(tmp_path, 5, model, optimizer)
    seen = {}

    def failing_save(state, storage_writer=None, **kwargs):
        seen["names"] = _names(tmp_path)
        seen["latest"] = find_latest_checkpoint(tmp_path)
        raise OSError("disk full")

    monkeypatch.setattr(dcp, "save", failing_save)
    with pytest.raises(CheckpointWriteError, match=r"write checkpoint .*step_0000006: rank 0: OSError: disk full"):
        _save(tmp_path, 6, model, optimizer)
    # While it was being written, the temporary directory was hidden and not taken for a checkpoint.
    assert seen["names"] == [".step_0000006.tmp", previous.name] and seen["latest"] == previous
    assert _names(tmp_path) == [previous.name]


def test_each_rank_fsyncs_the_files_it_wrote_and_rank_0_opens_no_other_file(tmp_path, monkeypatch):
    # On a shared file system an fsync by rank 0 of a file that another node wrote flushes nothing of
    # it: every process syncs its own files before the barrier, and rank 0 only syncs the directory.
    import os

    from dinov2.checkpoint import sharded

    synced, reopened = [], []
    real_fsync, real_fsync_path = os.fsync, sharded._fsync_path

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    def recording_fsync_path(path):
        reopened.append((Path(path).name, Path(path).is_file()))  # what it was when it was synced
        real_fsync_path(path)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(sharded, "_fsync_path", recording_fsync_path)
    model, optimizer = _model_and_optimizer(0)
    path = _save(tmp_path, 4, model, optimizer)
    files = [p.name for p in path.iterdir() if p.is_file() and p.name != ".metadata"]
    assert set(files) >= {"rng_rank0.pth", "trainer_state.pth", "__0_0.distcp"}
    assert set(files) <= set(synced), (files, synced)  # fsynced while being written
    assert ".metadata.tmp" in synced  # DCP's metadata, synced by DCP before its rename
    assert reopened and not [name for name, is_file in reopened if is_file], reopened  # directories only


def test_retention_keeps_exactly_the_newest_and_never_the_new_one(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for iteration in [0, 10, 20, 30, 40]:
        _save(tmp_path, iteration, model, optimizer, keep_last=3)
    assert _names(tmp_path) == ["notes.txt", "step_0000020", "step_0000030", "step_0000040"]
    # An older iteration written after newer ones (a resume from an earlier checkpoint) survives.
    _save(tmp_path, 25, model, optimizer, keep_last=1)
    assert _names(tmp_path) == ["notes.txt", "step_0000025", "step_0000040"]


def test_find_latest_is_numeric_and_skips_incomplete_directories(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    assert find_latest_checkpoint(tmp_path / "missing") is None
    assert find_latest_checkpoint(tmp_path) is None
    _save(tmp_path, 9_999_999, model, optimizer, keep_last=0)
    _save(tmp_path, 10_000_000, model, optimizer, keep_last=0)  # 8 digits: sorts first as text
    (tmp_path / "step_99999999").mkdir()  # no .metadata: an interrupted copy, not a checkpoint
    (tmp_path / ".step_99999999.tmp").mkdir()
    assert find_latest_checkpoint(tmp_path) == tmp_path / "step_10000000"


def test_corrupt_checkpoint_error_names_the_path(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    path = _save(tmp_path, 3, model, optimizer)
    shard = next(path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    with pytest.raises(CheckpointLoadError, match=re.escape(str(path))):
        load_checkpoint(path, model, optimizer)
    with pytest.raises(FileNotFoundError, match="step_0000099"):
        load_checkpoint(tmp_path / "step_0000099", model, optimizer)


def test_metadata_that_unpickles_anything_else_is_refused(tmp_path):
    import pickle

    model, optimizer = _model_and_optimizer(0)
    path = _save(tmp_path, 1, model, optimizer)

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    (path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointLoadError, match="builtins.print"):
        load_full_tensors(path, "model.")


# ---------------------------------------------------------------------------------- RNG state
def _draws():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0.0, 1.0) for _ in range(3)],
        np.concatenate([np.random.rand(3), np.random.randn(3)]),
        torch.cat([torch.rand(3), torch.randn(3)]),
    )


def _assert_draws_equal(a, b):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1], b[1])
    assert torch.equal(a[2], b[2])


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0.0, 1.0)  # leaves a cached Gaussian in Python's and NumPy's state
    np.random.randn(1)
    path = tmp_path / "rng.pth"
    atomic_torch_save({"rng": capture_rng_state()}, path)
    expected = _draws()

    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    scrambled = _draws()
    assert scrambled[0] != expected[0] and not np.array_equal(scrambled[1], expected[1])
    assert not torch.equal(scrambled[2], expected[2])

    restore_rng_state(torch.load(path, weights_only=True)["rng"])
    _assert_draws_equal(_draws(), expected)


@pytest.mark.gpu
def test_cuda_rng_state_round_trip(tmp_path):
    device = torch.device("cuda", 0)
    path = tmp_path / "rng.pth"
    atomic_torch_save(capture_rng_state(), path)
    expected = torch.rand(5, device=device)
    torch.rand(7, device=device)
    restore_rng_state(torch.load(path, weights_only=True))
    assert torch.equal(torch.rand(5, device=device), expected)


# ---------------------------------------------------------------------------- teacher export
class _Compiled(nn.Module):
    """Stands in for torch.compile's wrapper: adds an ``_orig_mod.`` segment to every key."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod = module

    def forward(self, *args, **kwargs):
        return self._orig_mod(*args, **kwargs)


def _backbone(block_chunks=0):
    return DinoVisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, init_values=1.0, block_chunks=block_chunks
    )


def _teacher(block_chunks=0, ibot=True):
    modules = {"backbone": _backbone(block_chunks), "dino_head": DINOHead(32, 16, hidden_dim=24, bottleneck_dim=8)}
    if ibot:
        modules["ibot_head"] = DINOHead(32, 12, hidden_dim=24, bottleneck_dim=8)
    teacher = nn.ModuleDict(modules)
    with torch.no_grad():
        for param in teacher.parameters():
            param.normal_(0.0, 0.2)  # no zero or constant tensors: a mix-up would show
    return teacher.eval()


def _outputs(backbone, x):
    with torch.no_grad():
        out = backbone.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


@pytest.mark.parametrize("block_chunks", [0, 2])
def test_export_teacher_formats(tmp_path, block_chunks):
    teacher = _teacher(block_chunks)
    out = export_teacher(tmp_path, 12, teacher)
    assert out == tmp_path / "eval" / "training_12"
    assert _names(out) == ["teacher_backbone.safetensors", "teacher_checkpoint.pth"]
    assert _names(tmp_path / "eval") == ["training_12"]

    checkpoint = torch.load(out / "teacher_checkpoint.pth", weights_only=True)
    assert list(checkpoint) == ["teacher"]
    expected = teacher.state_dict()
    assert checkpoint["teacher"].keys() == expected.keys()
    assert {k.split(".")[0] for k in checkpoint["teacher"]} == {"backbone", "dino_head", "ibot_head"}
    for key, value in expected.items():
        assert torch.equal(checkpoint["teacher"][key], value), key

    flat = load_weights_file(out / "teacher_backbone.safetensors")
    assert flat.keys() == _backbone(block_chunks=0).state_dict().keys()  # flat blocks.N., no heads
    assert all(v.device.type == "cpu" and v.is_contiguous() for v in flat.values())
    fresh = _backbone(block_chunks=0).eval()
    report = load_backbone_state_dict(fresh, flat)
    assert not report.unchunked and not report.set_aside
    x = torch.randn(2, 3, 32, 32)
    for got, want in zip(_outputs(fresh, x), _outputs(teacher["backbone"], x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_export_strips_wrapper_segments(tmp_path):
    plain = _teacher(ibot=False)
    wrapped = nn.ModuleDict({"backbone": _Compiled(plain["backbone"]), "dino_head": plain["dino_head"]})
    out = export_teacher(tmp_path, 3, wrapped)
    teacher_state = torch.load(out / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert teacher_state.keys() == plain.state_dict().keys()
    flat = safetensors.torch.load_file(out / "teacher_backbone.safetensors")
    assert flat.keys() == plain["backbone"].state_dict().keys()


def test_export_replaces_previous_export_and_survives_failure(tmp_path, monkeypatch):
    first, second = _teacher(), _teacher()
    export_teacher(tmp_path, 7, first)
    out = export_teacher(tmp_path, 7, second)
    loaded = torch.load(out / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    key = "dino_head.mlp.0.weight"
    assert torch.equal(loaded[key], second.state_dict()[key]) and not torch.equal(loaded[key], first.state_dict()[key])
    assert _names(tmp_path / "eval") == ["training_7"]

    def failing_save_file(*args, **kwargs):
        raise OSError("quota exceeded")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    with pytest.raises(OSError, match="quota exceeded"):
        export_teacher(tmp_path, 7, _teacher())
    assert _names(tmp_path / "eval") == ["training_7"]
    loaded = torch.load(out / "teacher_checkpoint.pth", weights_only=True)["teacher"]
    assert torch.equal(loaded[key], second.state_dict()[key])
    assert _names(out) == ["teacher_backbone.safetensors", "teacher_checkpoint.pth"]


# ------------------------------------------------------------------------------ consolidation
def test_consolidate_writes_the_flat_backbone_of_the_newest_checkpoint(tmp_path):
    from dinov2.checkpoint.consolidate import main as consolidate

    torch.manual_seed(0)
    backbone = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_chunks=2)
    model = nn.ModuleDict({"teacher": nn.ModuleDict({"backbone": backbone})})
    optimizer = torch.optim.AdamW(model.parameters())
    run = tmp_path / "run"
    _save(run / "checkpoints", 1, model, optimizer)
    first_pos_embed = backbone.pos_embed.detach().clone()
    with torch.no_grad():
        backbone.pos_embed.add_(1.0)
    _save(run / "checkpoints", 2, model, optimizer)
    out = tmp_path / "out" / "teacher.pth"
    consolidate([str(run), "--output", str(out)])  # a run directory: its newest checkpoint
    flat = torch.load(out, weights_only=True)
    assert torch.equal(safetensors.torch.load_file(out.with_suffix(".safetensors"))["pos_embed"], flat["pos_embed"])
    with safetensors.safe_open(out.with_suffix(".safetensors"), framework="pt") as twin:
        assert twin.metadata() == {"format": "pt"}  # what transformers-style loaders require of a torch file
    reference = DinoVisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, block_chunks=0)
    assert flat.keys() == reference.state_dict().keys()  # the published layout: blocks.N., no chunk level
    load_backbone_state_dict(reference, flat)
    assert torch.equal(reference.pos_embed, backbone.pos_embed)
    # a step directory itself, and --no-safetensors: the .pth alone
    older = tmp_path / "older" / "teacher.pth"
    consolidate([str(run / "checkpoints" / "step_0000001"), "--output", str(older), "--no-safetensors"])
    assert sorted(p.name for p in older.parent.iterdir()) == ["teacher.pth"]
    assert torch.equal(torch.load(older, weights_only=True)["pos_embed"], first_pos_embed)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "empty"))):
        consolidate([str(tmp_path / "empty"), "--output", str(out)])
    with pytest.raises(KeyError, match="model.student.backbone."):
        consolidate([str(run), "--output", str(out), "--branch", "student"])


# ------------------------------------------------------------- non-tensor entries of DCP checkpoints
class _CodeInPickle:
    """Unpickling this runs code (records that it did)."""

    ran = False

    def __reduce__(self):
        return (_CodeInPickle._run, ())

    @staticmethod
    def _run():
        _CodeInPickle.ran = True
        return 0.1


def _point_entry_at_bytes(path, fqn: str, payload: bytes) -> None:
    """Tamper with checkpoint ``path``: store ``payload`` as the bytes of entry ``fqn`` (appended to
    a shard file, the metadata pointing at it), as a hand-edited or hostile checkpoint would."""
    import dataclasses
    import pickle

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from dinov2.checkpoint.dcp_storage import safe_reader

    metadata = safe_reader(path).read_metadata()
    assert isinstance(metadata.state_dict_metadata[fqn], BytesStorageMetadata)  # a non-tensor entry
    (index,) = [i for i in metadata.storage_data if i.fqn == fqn]
    info = metadata.storage_data[index]
    shard = path / info.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(payload)
    metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(payload))
    (path / ".metadata").write_bytes(pickle.dumps(metadata))


def test_non_tensor_checkpoint_entries_are_read_weights_only(tmp_path):
    import io

    model, optimizer = _model_and_optimizer(0)
    path = _save(tmp_path, 4, model, optimizer)
    # The optimizer's hyper-parameters (param_groups) are DCP "bytes" entries, not tensors.
    buffer = io.BytesIO()
    torch.save(_CodeInPickle(), buffer)
    _point_entry_at_bytes(path, "optimizer.param_groups.0.lr", buffer.getvalue())
    fresh, fresh_opt = _model_and_optimizer(1)
    _CodeInPickle.ran = False
    with pytest.raises(CheckpointLoadError, match=re.escape(str(path))):
        load_checkpoint(path, fresh, fresh_opt)
    assert not _CodeInPickle.ran


def _two_layers():
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "idle": nn.Linear(3, 2)})
    return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05)


def _adamw_step(model, optimizer, x, idle_too: bool):
    optimizer.zero_grad(set_to_none=True)
    loss = model["used"](x).square().sum() + (model["idle"](x).sum() if idle_too else 0)
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("stepped", [True, False])
def test_a_checkpoint_saved_before_every_parameter_was_stepped_resumes_exactly(tmp_path, stepped):
    # The optimizer keeps no state for a parameter it has not stepped yet: with fp16 every step so far
    # skipped by the gradient scaler (its first steps usually are: stepped=False), or a parameter that
    # has had no gradient yet. Such checkpoints were written but could not be loaded ("Missing key
    # optimizer.state..."), so the run could not resume. The continuation must also be the same.
    x = torch.randn(4, 3)
    model, optimizer = _two_layers()
    if stepped:
        _adamw_step(model, optimizer, x, idle_too=False)  # "idle" gets no gradient: no state
    else:
        model["used"](x).sum().backward()  # a step the scaler skipped: gradients, no optimizer state
    assert len(optimizer.state) == (2 if stepped else 0)
    path = _save(tmp_path, 1, model, optimizer)
    fresh, fresh_opt = _two_layers()
    load_checkpoint(path, fresh, fresh_opt)
    assert len(fresh_opt.state) == len(optimizer.state)  # the unstepped parameters have none, as saved
    for net, opt in ((model, optimizer), (fresh, fresh_opt)):
        _adamw_step(net, opt, x, idle_too=True)  # now both layers step (AdamW's step counts start at 1)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    steps = sorted(float(s["step"]) for s in fresh_opt.state.values())
    assert steps == ([1.0, 1.0, 2.0, 2.0] if stepped else [1.0] * 4)


def test_non_tensor_checkpoint_entries_round_trip(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    for group in optimizer.param_groups:
        group["lr"], group["betas"] = 0.0123, (0.8, 0.95)
    path = _save(tmp_path, 4, model, optimizer)
    fresh, fresh_opt = _model_and_optimizer(1)
    load_checkpoint(path, fresh, fresh_opt)
    assert [(g["lr"], tuple(g["betas"])) for g in fresh_opt.param_groups] == [(0.0123, (0.8, 0.95))]


def test_corrupt_rng_file_error_names_the_file(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    path = _save(tmp_path, 2, model, optimizer)
    rng = path / "rng_rank0.pth"
    rng.write_bytes(rng.read_bytes()[:50])
    with pytest.raises(CheckpointLoadError, match=re.escape(str(rng))):
        load_checkpoint(path, model, optimizer)


# ------------------------------------------------------------- leftovers of interrupted writes
def test_save_removes_temporaries_left_by_crashed_saves(tmp_path):
    model, optimizer = _model_and_optimizer(0)
    for name in (".step_0000003.tmp", ".step_0000002.0123456789ab.tmp"):  # being written / moved aside
        (tmp_path / name).mkdir()
        (tmp_path / name / "__0_0.distcp").write_bytes(b"\0" * 64)
    (tmp_path / ".nfs0001").write_text("not ours")
    (tmp_path / "step_0000001").mkdir()  # no metadata: not a checkpoint, and not a temporary either
    _save(tmp_path, 5, model, optimizer)
    assert _names(tmp_path) == [".nfs0001", "step_0000001", "step_0000005"]


def test_interrupted_or_failed_pruning_neither_fails_the_save_nor_leaves_a_partial_checkpoint(tmp_path, monkeypatch):
    import shutil

    model, optimizer = _model_and_optimizer(0)
    first = _save(tmp_path, 1, model, optimizer, keep_last=1)
    real_rmtree = shutil.rmtree

    def rmtree_dies_halfway(path, *args, **kwargs):
        next(p for p in sorted(path.iterdir()) if p.suffix == ".distcp").unlink()  # one shard gone...
        raise OSError(39, "Directory not empty")  # ...then the deletion fails (NFS .nfsXXXX file)

    monkeypatch.setattr(shutil, "rmtree", rmtree_dies_halfway)
    second = _save(tmp_path, 2, model, optimizer, keep_last=1)  # the new checkpoint is written: no error
    # The half-deleted old checkpoint is not left under a checkpoint's name.
    assert find_latest_checkpoint(tmp_path) == second and not first.exists()
    assert [n for n in _names(tmp_path) if not n.startswith(".")] == [second.name]
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    third = _save(tmp_path, 3, model, optimizer, keep_last=1)  # and the next save deletes what is left
    assert _names(tmp_path) == [third.name]
    fresh, fresh_opt = _model_and_optimizer(1)
    assert load_checkpoint(third, fresh, fresh_opt)["iteration"] == 3


def test_export_removes_temporaries_left_by_interrupted_exports(tmp_path):
    stale = tmp_path / "eval" / ".training_4.0123456789ab.tmp"
    stale.mkdir(parents=True)
    (stale / "teacher_checkpoint.pth").write_bytes(b"\0" * 64)
    (tmp_path / "eval" / "training_2").mkdir()  # an earlier export stays
    export_teacher(tmp_path, 7, _teacher(ibot=False))
    assert _names(tmp_path / "eval") == ["training_2", "training_7"]


def test_consolidate_failure_leaves_no_temporary_and_output_safetensors(tmp_path, monkeypatch):
    from dinov2.checkpoint.consolidate import consolidate

    backbone = DinoVisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, block_chunks=0)
    model = nn.ModuleDict({"teacher": nn.ModuleDict({"backbone": backbone})})
    _save(tmp_path / "checkpoints", 1, model, torch.optim.AdamW(model.parameters()))
    out = tmp_path / "out"
    real_save_file = safetensors.torch.save_file

    def save_file_fails_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("quota exceeded")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file_fails_halfway)
    with pytest.raises(OSError, match="quota exceeded"):
        consolidate(tmp_path, out / "teacher.pth")
    assert _names(out) == ["teacher.pth"]  # no temporary file left behind
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)
    flat = consolidate(tmp_path, out / "only.safetensors")  # a .safetensors output is that file, no twin
    assert _names(out) == ["only.safetensors", "teacher.pth"]
    loaded = safetensors.torch.load_file(out / "only.safetensors")
    assert loaded.keys() == backbone.state_dict().keys() == flat.keys()
    assert torch.equal(loaded["pos_embed"], backbone.pos_embed.detach())


# ------------------------------------------------------------- a rank that fails (2 gloo processes)
def _timed(action) -> str:
    import time

    start = time.monotonic()
    try:
        action()
        outcome = "ok"
    except Exception as error:  # noqa: BLE001 - the outcome is what the test compares
        outcome = f"{type(error).__name__}: {error}"
    return f"{time.monotonic() - start:.1f}s {outcome}"


def _failing_rank_worker(rank: int, port: int, world: int, root: str) -> None:
    import datetime
    import os
    import time

    import torch.distributed as dist

    from dinov2.checkpoint import sharded

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    # A short timeout: without the fix, rank 0 waits for the failed rank until it expires.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    directory, outcomes = Path(root) / "checkpoints", []
    model, optimizer = _model_and_optimizer(0)
    _save(directory, 1, model, optimizer)
    real_save_synced = sharded._save_synced

    def rank_1_disk_full(obj, path):
        if rank == 1 and path.name == sharded.rng_file(1):
            raise OSError(28, "No space left on device")
        real_save_synced(obj, path)

    sharded._save_synced = rank_1_disk_full
    outcomes.append(_timed(lambda: _save(directory, 2, model, optimizer)))
    sharded._save_synced = real_save_synced
    if rank == 1:  # a truncated RNG file of this rank only
        rng = directory / "step_0000001" / sharded.rng_file(1)
        rng.write_bytes(rng.read_bytes()[:40])
    dist.barrier()
    outcomes.append(_timed(lambda: load_checkpoint(directory / "step_0000001", model, optimizer)))
    real_load_trainer_state = sharded.load_trainer_state

    def rank_1_stale_handle(path):  # fails before the DCP load, which the other rank would wait in
        if rank == 1:
            raise OSError(116, "Stale file handle")
        return real_load_trainer_state(path)

    sharded.load_trainer_state = rank_1_stale_handle
    outcomes.append(_timed(lambda: load_checkpoint(directory / "step_0000001", model, optimizer)))
    sharded.load_trainer_state = real_load_trainer_state
    from test_hostile_storage import peer_failures_inside_dcp  # a rank failing inside DCP's own save and load

    peer_failures_inside_dcp(rank, world, Path(root))
    (Path(root) / f"rank{rank}.txt").write_text("\n".join(outcomes))
    # A failed rank stays alive (as an NCCL peer that is not noticed leaving): rank 0 must not need it to exit.
    deadline = time.monotonic() + 45
    while rank == 1 and not (Path(root) / "rank0.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.2)


@pytest.mark.distributed
def test_a_rank_that_fails_writing_or_reading_its_files_stops_every_rank_at_once(tmp_path, dist_common):
    # Each rank writes (and reads) its own RNG file; one that fails there used to leave the others
    # waiting in the next barrier until the process-group timeout (30 minutes with NCCL), then failing
    # with a timeout that does not say why. Every rank now learns of it at once and raises, naming it.
    import torch.multiprocessing as mp

    common = dist_common
    mp.spawn(_failing_rank_worker, args=(common.free_port(), common.WORLD, str(tmp_path)), nprocs=common.WORLD)
    (save0, load0, early0), (save1, load1, early1) = [
        (tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2)
    ]
    assert "OSError" in save1 and "No space left on device" in save1, save1
    assert float(save0.split("s ")[0]) < 10, save0  # not the process-group timeout
    assert re.search(r"CheckpointWriteError: .*step_0000002.*rank 1", save0), save0
    assert "CheckpointLoadError" in load1 and "rng_rank1.pth" in load1, load1
    assert re.search(r"CheckpointLoadError: .*step_0000001.*rank 1", load0), load0
    assert "CheckpointLoadError" in early1 and "Stale file handle" in early1, early1
    assert float(early0.split("s ")[0]) < 10 and re.search(r"CheckpointLoadError: .*rank 1", early0), early0
    # the failed save left the previous checkpoint as the latest, loadable, and nothing half-written
    assert _names(tmp_path / "checkpoints") == ["step_0000001"]
    fresh, fresh_opt = _model_and_optimizer(1)
    assert load_checkpoint(tmp_path / "checkpoints" / "step_0000001", fresh, fresh_opt)["iteration"] == 1
    from test_hostile_storage import check_peer_failures_inside_dcp

    check_peer_failures_inside_dcp(tmp_path, common.WORLD)
