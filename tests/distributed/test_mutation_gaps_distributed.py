"""dinov2.distributed: behaviour a mutation audit found untested (rank 0's decision when only another
rank says yes, the barrier and shutdown waiting for the slowest rank, each block chunk its own FSDP2
unit, which units keep their parameters gathered after forward (the distillation teacher's too),
NO_SHARD replicated on every rank, each module's compute and gradient-reduction dtypes, norms of
half-precision gradients squared in fp32 and clipping past parameters without gradients, the
current GPU under NCCL, the contiguous tensor a gather hands to the collective, SLURM variables
already set, the student's fp16 check, mixed precision on every accelerator, activation
checkpointing read as false, auto attention's nested choice, and the long dtype names a sharding
policy accepts, which it refused for bfloat16)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from dist_common import MIXED_SHARDING, TINY, WORLD, free_port, join_group, spawn_bounded
from torch import nn

import dinov2.distributed as distributed
from dinov2.distributed.parallelize import any_fp16, module_policy, use_mixed_precision
from dinov2.utils.config import load_config

SLEEP_S = 1.0  # how long one rank lags behind the other where a check needs a slow rank
IMAGES = (2, 3, 32, 32)
# dtypes per module, each pair different from its neighbours' so that a swapped one shows
DTYPES = {
    ("student", "backbone"): ("fp32", "fp32"),
    ("student", "dino_head"): ("fp16", "fp32"),  # fp16 compute, fp32 reduction: the published head policy
    ("student", "ibot_head"): ("fp16", "fp16"),
    ("teacher", "backbone"): ("fp32", "fp32"),
    ("teacher", "dino_head"): ("bf16", "fp32"),  # not the student's: the teacher (and frozen teacher) follow their own
    ("teacher", "ibot_head"): ("fp32", "fp32"),
}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the per-rank head input, whose mean (1 + 2**-11) / 2 fp32 holds exactly and fp16 rounds to 0.5
HEAD_INPUT = {0: 1.0, 1: 2.0**-11}
HALF_GRAD = [300.0, 0.0]  # a norm that fp16 and bf16 hold, whose square (90000) fp16 overflows and bf16 rounds


def _tiny_backbone(**kwargs):
    from dinov2.models import vit_tiny

    return vit_tiny(patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2, **kwargs)


class _Scale(nn.Module):
    """A head whose gradient is its input: ``(w * x).sum()``, ``w`` of 2 elements (1 per rank sharded)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.w * x).sum()


class _Meta(nn.Module):
    """The roles of the distillation meta-architecture: a frozen teacher that follows the teacher's policies."""

    parallel_roles = (("student", "student"), ("teacher", "teacher"), ("frozen_teacher", "teacher"))

    def __init__(self) -> None:
        super().__init__()
        for attribute, _ in self.parallel_roles:
            backbone = _tiny_backbone(block_chunks=2)
            setattr(
                self, attribute, nn.ModuleDict({"backbone": backbone, "dino_head": _Scale(), "ibot_head": _Scale()})
            )


def _sharding_cfg():
    dtypes = [
        f"compute_precision.{role}.{name}.mixed_precision.{key}={value}"
        for (role, name), pair in DTYPES.items()
        for key, value in zip(("param_dtype", "reduce_dtype"), pair, strict=True)
    ]
    # MIXED_SHARDING: backbones FULL_SHARD, DINO heads SHARD_GRAD_OP, iBOT heads NO_SHARD
    return load_config(None, [*TINY, *MIXED_SHARDING, "compute_precision.fsdp_mixed_precision=true", *dtypes])


def _gathered(module: nn.Module) -> list[str]:
    """The names of ``module``'s parameters that are not (sharded) DTensors right now."""
    return [n for n, p in module.named_parameters() if not distributed.is_dtensor(p)]


def _layout(module: nn.Module) -> dict:
    """Per parameter: the mesh's dimension names, the full shape and this rank's shape."""
    return {
        n: (p.device_mesh.mesh_dim_names, tuple(p.shape), tuple(p.to_local().shape))
        for n, p in module.named_parameters()
    }


def _sharding_part(rank: int) -> dict:
    """parallelize() on the meta-architecture above, then one teacher and one student step."""
    from torch.distributed.fsdp import FSDPModule

    from dinov2.distributed.parallelize import parallelize

    torch.manual_seed(0)
    model = _Meta()
    assert parallelize(model, _sharding_cfg(), torch.device("cpu"))["fsdp"]
    result = {"layout": {}, "units": {}, "out_dtype": {}, "gathered": {}}
    for attribute, _ in model.parallel_roles:
        backbone = getattr(model, attribute).backbone
        result["units"][attribute] = [isinstance(m, FSDPModule) for m in (backbone, *backbone.blocks)]
        for name, module in getattr(model, attribute).items():
            result["layout"][f"{attribute}.{name}"] = _layout(module)
    images = torch.randn(IMAGES, generator=torch.Generator().manual_seed(1))  # the same on both ranks
    head_input = torch.full((2,), HEAD_INPUT[rank])
    for attribute in ("teacher", "frozen_teacher"):
        modules = getattr(model, attribute)
        with torch.no_grad():
            modules.backbone(images)
            for name in ("dino_head", "ibot_head"):
                result["out_dtype"][f"{attribute}.{name}"] = modules[name](head_input).dtype
        for name, module in modules.items():
            result["gathered"][f"{attribute}.{name}"] = _gathered(module)
    student = model.student
    loss = student.backbone(images).sum()
    for name in ("dino_head", "ibot_head"):
        out = student[name](head_input)
        result["out_dtype"][f"student.{name}"] = out.dtype
        loss = loss + out.float()
    for name, module in student.items():  # after forward, before backward
        result["gathered"][f"student.{name}"] = _gathered(module)
    loss.backward()
    result["head_grads"] = {name: student[name].w.grad.full_tensor() for name in ("dino_head", "ibot_head")}
    return result


def _worker(rank: int, port: int, out: str) -> None:
    join_group(rank, port)
    result = {}
    # rank 0's flag, whatever the other rank's says: yes on rank 1 only is no; yes on rank 0 only is yes
    result["rank_zero_says"] = (distributed.rank_zero_says(rank == 1), distributed.rank_zero_says(rank == 0))
    # the barrier: rank 1 passes it only once rank 0, which lags, has reached it
    marker = Path(out) / "rank0_reached_the_barrier"
    if rank == 0:
        time.sleep(SLEEP_S)
        marker.touch()
    distributed.barrier()
    result["marker_seen"] = marker.exists()
    result.update(_sharding_part(rank))
    # bf16 sharded gradients (one element per rank) whose norm's square bf16 does not hold: squared in fp32
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    from dinov2.distributed.grads import total_grad_norm

    mesh = init_device_mesh("cpu", (WORLD,))
    param = nn.Parameter(distribute_tensor(torch.zeros(WORLD, dtype=torch.bfloat16), mesh, [Shard(0)]))
    param.grad = distribute_tensor(torch.tensor(HALF_GRAD, dtype=torch.bfloat16), mesh, [Shard(0)])
    result["bf16_norm"] = total_grad_norm([param])
    param = nn.Parameter(distribute_tensor(torch.zeros(WORLD, dtype=torch.float16), mesh, [Shard(0)]))
    param.grad = distribute_tensor(torch.tensor(HALF_GRAD, dtype=torch.float16), mesh, [Shard(0)])
    result["fp16_norm"] = total_grad_norm([param])  # the reduction of fp16 squares (90000) would be inf
    # HSDP's layout: replicated over a mesh dimension of 2 ranks, sharded over one of 1. The replicas
    # hold the same gradient; adding their squares would give sqrt(2) times the norm
    hsdp = init_device_mesh("cpu", (WORLD, 1))
    replicated = nn.Parameter(distribute_tensor(torch.zeros(2), hsdp, [Replicate(), Shard(0)]))
    replicated.grad = distribute_tensor(torch.tensor([3.0, 4.0]), hsdp, [Replicate(), Shard(0)])
    result["hsdp_norm"] = total_grad_norm([replicated])
    partial = nn.Parameter(torch.zeros(2))
    partial.grad = DTensor.from_local(torch.ones(2), mesh, [Partial()])
    try:
        total_grad_norm([partial])
        result["partial"] = "no error"
    except ValueError as error:
        result["partial"] = str(error)
    torch.save(result, Path(out) / f"r{rank}.pt")
    # shutdown waits for every rank: rank 1 arrives SLEEP_S after rank 0
    torch.distributed.barrier()
    start = time.perf_counter()
    if rank == 1:
        time.sleep(SLEEP_S)
    distributed.shutdown()
    (Path(out) / f"shutdown{rank}.txt").write_text(str(time.perf_counter() - start))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("mutation_gaps_distributed")
    spawn_bounded(_worker, (free_port(), str(out)), seconds=240)
    return out, [torch.load(out / f"r{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.mark.distributed
def test_rank_zero_decides_for_every_rank_also_when_only_another_rank_says_yes(ranks):
    for result in ranks[1]:
        assert result["rank_zero_says"] == (False, True)


@pytest.mark.distributed
def test_the_barrier_and_shutdown_wait_for_the_slowest_rank(ranks):
    out, results = ranks
    assert results[1]["marker_seen"]  # rank 0 touched it, after SLEEP_S, before its barrier
    # rank 0 left shutdown only after rank 1 (SLEEP_S later) reached it; not at once, alone
    assert float((out / "shutdown0.txt").read_text()) >= 0.5 * SLEEP_S


@pytest.mark.distributed
def test_each_block_chunk_is_its_own_unit_and_no_shard_is_replicated(ranks):
    for result in ranks[1]:
        assert result["units"] == {a: [True, True, True] for a in ("student", "teacher", "frozen_teacher")}
        for key, layout in result["layout"].items():
            name = key.split(".")[1]
            for param, (dims, full, local) in layout.items():
                if name == "ibot_head":  # NO_SHARD: every rank holds the whole parameter
                    assert dims == ("replicate", "shard") and local == full, (key, param)
                else:  # sharded over both ranks along dim 0 (2 elements or rows: 1 each)
                    assert dims == ("shard",), (key, param)
                    rows = -(-full[0] // WORLD)  # ceil: rank 0's share
                    assert local[0] in (rows, full[0] - rows) and local[1:] == full[1:], (key, param)
        head = result["layout"]["student.dino_head"]["w"]
        assert head[2] == (1,)  # sharded for real: one element of two


@pytest.mark.distributed
def test_teachers_reshard_after_forward_and_the_student_keeps_what_its_strategy_keeps(ranks):
    for result in ranks[1]:
        gathered = result["gathered"]
        for attribute in ("teacher", "frozen_teacher"):  # no backward: every module resharded after forward
            for name in ("backbone", "dino_head", "ibot_head"):
                assert gathered[f"{attribute}.{name}"] == [], (attribute, name)
        assert gathered["student.backbone"] == []  # FULL_SHARD: resharded after forward
        assert gathered["student.dino_head"] == ["w"]  # SHARD_GRAD_OP: kept gathered for backward
        assert gathered["student.ibot_head"] == ["w"]  # NO_SHARD: never resharded


@pytest.mark.distributed
def test_each_module_computes_and_reduces_gradients_in_its_own_dtypes(ranks):
    fp16 = torch.float16
    exact_mean = (HEAD_INPUT[0] + HEAD_INPUT[1]) / WORLD  # representable in fp32
    fp16_mean = (torch.tensor(HEAD_INPUT[0], dtype=fp16) + torch.tensor(HEAD_INPUT[1], dtype=fp16)) / WORLD
    assert exact_mean != float(fp16_mean)  # the reduction dtype shows in the result
    for result in ranks[1]:
        for key, dtype in result["out_dtype"].items():
            role = "student" if key.startswith("student.") else "teacher"
            assert dtype == TORCH_DTYPES[DTYPES[(role, key.split(".")[1])][0]], key
        grads = result["head_grads"]
        assert grads["dino_head"].dtype == torch.float32  # the weights' dtype, whatever the reduction's
        assert grads["dino_head"].tolist() == [exact_mean] * 2  # reduced in fp32
        assert grads["ibot_head"].tolist() == [float(fp16_mean)] * 2  # reduced in fp16


@pytest.mark.distributed
def test_the_norm_of_half_precision_sharded_gradients_is_squared_in_fp32(ranks):
    for result in ranks[1]:
        for key in ("bf16_norm", "fp16_norm"):
            assert result[key].dtype == torch.float32, key
            torch.testing.assert_close(result[key], torch.tensor(HALF_GRAD).norm(), msg=key)


@pytest.mark.distributed
def test_the_norm_adds_squares_over_sharded_mesh_dimensions_only(ranks):
    for result in ranks[1]:
        torch.testing.assert_close(result["hsdp_norm"], torch.tensor(5.0))  # the 3-4-5 gradient, not 5 * sqrt(2)
        assert "Partial" in result["partial"] and "sharded or replicated" in result["partial"]


def test_clipping_skips_parameters_without_gradients_and_norms_half_gradients_in_fp32():
    from dinov2.distributed.grads import clip_grad_norm_, total_grad_norm

    with_grad, without = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    with_grad.grad = torch.tensor([3.0, 4.0])
    norm = clip_grad_norm_([with_grad, without], 1.0)  # as torch.nn.utils.clip_grad_norm_: no grad, left alone
    torch.testing.assert_close(norm, torch.tensor(5.0))
    torch.testing.assert_close(with_grad.grad, torch.tensor([0.6, 0.8]))
    assert without.grad is None
    half = nn.Parameter(torch.zeros(2, dtype=torch.float16))
    half.grad = torch.tensor(HALF_GRAD, dtype=torch.float16)
    torch.testing.assert_close(total_grad_norm([half]), torch.tensor(HALF_GRAD).norm())  # not inf


def test_collective_device_under_nccl_is_this_process_s_current_gpu(monkeypatch):
    monkeypatch.setattr(distributed, "is_enabled", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # LOCAL_RANK 3's GPU, made current
    assert distributed.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "gloo")
    assert distributed.collective_device() == torch.device("cpu")


def test_all_gather_cat_hands_the_collective_a_contiguous_tensor(monkeypatch):
    # NCCL refuses non-contiguous tensors (gloo copies them): a transposed feature block must be made
    # contiguous before the gather, not by the caller
    handed = []

    def all_gather(parts, tensor, group=None):
        assert tensor.is_contiguous(), "all_gather given a non-contiguous tensor"
        handed.append(tensor)
        for rank, part in enumerate(parts):
            part.copy_(tensor + 10 * rank)  # what rank r would send

    monkeypatch.setattr(distributed, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)
    block = torch.arange(6.0).reshape(2, 3).t()
    assert not block.is_contiguous()
    gathered = distributed.all_gather_cat(block)
    assert len(handed) == 1 and torch.equal(gathered, torch.cat([block, block + 10]))


def test_slurm_fills_only_the_torchrun_variables_not_already_set(monkeypatch):
    import os

    from test_parallel_setup import _batch_step_env

    _batch_step_env(monkeypatch, "2")  # SLURM_PROCID=0, SLURM_LOCALID=0, 2 tasks on this node
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("RANK", "1")  # set by whoever started the process: kept
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.setup_env_from_slurm()
    got = {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    assert got == {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}


def _precision_cfg(*overrides: str):
    return load_config(None, [*TINY, *overrides])


def test_module_policy_reports_each_section_s_own_compute_and_reduce_dtypes():
    cfg = _precision_cfg(
        "compute_precision.student.dino_head.mixed_precision.param_dtype=bf16",
        "compute_precision.student.dino_head.mixed_precision.reduce_dtype=fp16",
        "compute_precision.student.dino_head.sharding_strategy=full_shard",
    )
    want = {"strategy": "FULL_SHARD", "param_dtype": torch.bfloat16, "reduce_dtype": torch.float16}
    assert module_policy(cfg, "student", "dino_head", True) == want
    fp32 = {"strategy": "FULL_SHARD", "param_dtype": torch.float32, "reduce_dtype": torch.float32}
    assert module_policy(cfg, "student", "dino_head", False) == fp32  # without mixed precision: fp32
    auto = _precision_cfg("compute_precision.fsdp_mixed_precision=auto")
    assert [use_mixed_precision(auto, torch.device(d)) for d in ("cpu", "cuda", "xpu")] == [False, True, True]


def test_the_gradient_scaler_follows_whether_any_student_module_computes_in_fp16():
    def cfg(fp16: set[tuple[str, str]]):
        return _precision_cfg(
            *(
                f"compute_precision.{role}.{name}.mixed_precision.param_dtype={'fp16' if (role, name) in fp16 else 'bf16'}"
                for role in ("student", "teacher")
                for name in ("backbone", "dino_head", "ibot_head")
            )
        )

    assert any_fp16(cfg({("student", "ibot_head")}), True)  # one student module in fp16 is enough
    assert not any_fp16(cfg({("teacher", n) for n in ("backbone", "dino_head", "ibot_head")}), True)  # no backward
    assert not any_fp16(cfg({("student", "backbone")}), False)  # mixed precision off: fp32, nothing to scale


@pytest.mark.parametrize(("name", "dtype"), [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                             ("float32", torch.float32), ("BF16", torch.bfloat16)])  # fmt: skip
def test_a_policy_accepts_the_long_dtype_names(name, dtype):
    cfg = _precision_cfg(f"compute_precision.student.backbone.mixed_precision.param_dtype={name}")
    assert module_policy(cfg, "student", "backbone", True)["param_dtype"] == dtype


def test_activation_checkpointing_read_from_yaml_as_false_or_null_is_off():
    from dinov2.distributed.parallelize import apply_activation_checkpointing

    for setting in (False, None):  # YAML reads a bare `off` as false
        backbone = _tiny_backbone()
        for block in backbone.iter_blocks():
            block.checkpointing = "full"
        assert apply_activation_checkpointing(backbone, setting) == 2
        assert [b.checkpointing for b in backbone.iter_blocks()] == ["off", "off"]


def test_auto_attention_resolves_to_the_choice_for_nested_calls(monkeypatch):
    # training's calls are nested (global and local crops in one call): auto takes that row of the table
    import importlib

    from dinov2.distributed.parallelize import resolve_attention_backends

    attention = importlib.import_module("dinov2.ops.attention")  # the module (dinov2.ops.attention is also a function)
    monkeypatch.setitem(attention.AUTO_PREFERENCE, ("cpu", True), ("math",))
    monkeypatch.setitem(attention.AUTO_PREFERENCE, ("cpu", False), ("sdpa",))
    backbone = _tiny_backbone()
    backbone.set_attn_backend("auto")
    attention._auto_choice.cache_clear()  # a choice is made once per process: here from the table above
    try:
        assert resolve_attention_backends(backbone, torch.device("cpu")) == ["math"]
        assert [b.attn.backend for b in backbone.iter_blocks()] == ["math", "math"]
    finally:
        attention._auto_choice.cache_clear()  # later tests choose from the real table again
