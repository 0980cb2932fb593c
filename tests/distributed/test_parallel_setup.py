"""Single-process pieces of the scale-out path: the slot-based data stream, activation
checkpointing and per-block compile, the sharding config checks, precision resolution, SLURM variables."""

from __future__ import annotations

import itertools

import pytest
import torch
from dist_common import TINY

from dinov2.data.seeding import PositionedSampler
from dinov2.distributed import first_host, setup_env_from_slurm
from dinov2.distributed.parallelize import apply_activation_checkpointing, apply_compile, check_sharding_plan
from dinov2.models import vit_tiny
from dinov2.train.precision import grad_scaler, resolve_precision
from dinov2.utils.config import load_config

TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# srun's own (absent from sbatch's batch script): cleared, so that a test run inside a SLURM job sees none
SLURM_STEP_VARIABLES = ("SLURM_STEP_ID", "SLURM_STEPID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST",
                        "SLURM_STEP_TASKS_PER_NODE")  # fmt: skip


def _batches(sampler: PositionedSampler, n: int, batch: int) -> list[list[tuple[int, int]]]:
    items = list(itertools.islice(iter(sampler), n * batch))
    return [items[i : i + batch] for i in range(0, len(items), batch)]


@pytest.mark.parametrize("world,accum", [(1, 4), (2, 2), (4, 1)])
def test_world_size_and_accumulation_are_interchangeable(world, accum):
    n, b, steps = 37, 3, 5
    # per optimiser step, the set of batches all ranks process together
    per_rank = [
        _batches(PositionedSampler(n, b, seed=5, rank=r, world_size=world), steps * accum, b) for r in range(world)
    ]
    got = [sorted(per_rank[r][s * accum + a] for r in range(world) for a in range(accum)) for s in range(steps)]
    single = _batches(PositionedSampler(n, b, seed=5, rank=0, world_size=1), steps * 4, b)
    want = [sorted(single[s * 4 : s * 4 + 4]) for s in range(steps)]
    assert got == want
    positions = [p for step in got for batch in step for p, _ in batch]
    assert sorted(positions) == list(range(steps * 4 * b))  # every position once
    # each pass over the data is a permutation of the dataset
    indices = [i for _, i in itertools.islice(iter(PositionedSampler(n, b, seed=5, rank=0, world_size=1)), 2 * n)]
    assert sorted(indices[:n]) == sorted(indices[n:]) == list(range(n)) and indices[:n] != indices[n:]


def test_stream_resumes_at_any_start_on_another_world_size():
    n, b = 11, 2
    straight = list(itertools.islice(iter(PositionedSampler(n, b, seed=1, rank=0, world_size=1)), 40))
    # 2 ranks resuming after 12 samples take the next slots, round robin
    r0 = list(itertools.islice(iter(PositionedSampler(n, b, seed=1, start=12, rank=0, world_size=2)), 4))
    r1 = list(itertools.islice(iter(PositionedSampler(n, b, seed=1, start=12, rank=1, world_size=2)), 4))
    assert r0 == straight[12:14] + straight[16:18] and r1 == straight[14:16] + straight[18:20]


def _grads(mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = vit_tiny(patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.5, init_values=1.0)
    apply_activation_checkpointing(model, mode)
    model.train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)  # the same stochastic-depth draws in every mode
    out = model.forward_features([x, x[:, :, :16, :16]])
    loss = out[0]["x_norm_clstoken"].square().sum() + out[1]["x_norm_patchtokens"].sum()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_activation_checkpointing_keeps_values_and_gradients():
    loss, grads = _grads("off")
    for mode in ("full", "selective"):
        other_loss, other = _grads(mode)
        assert torch.equal(other_loss, loss), mode
        for name, grad in grads.items():
            torch.testing.assert_close(other[name], grad, rtol=1e-6, atol=1e-7, msg=f"{mode} {name}")
    with pytest.raises(ValueError, match="train.activation_checkpointing='sometimes'"):
        apply_activation_checkpointing(vit_tiny(depth=1), "sometimes")


def test_per_block_compile_keeps_names_and_outputs():
    torch.manual_seed(0)
    model = vit_tiny(patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2, block_chunks=2).eval()
    names = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    assert apply_compile(model, "eager") == 2  # each chunk compiled in place
    assert list(model.state_dict()) == names  # no _orig_mod. segments: checkpoints stay compatible
    torch.testing.assert_close(model(x), expected)
    assert apply_compile(vit_tiny(depth=1), False) == 0


def test_sharding_config_errors_name_the_key():
    cfg = load_config(None, [*TINY, "compute_precision.student.backbone.sharding_strategy=HALF_SHARD"])
    with pytest.raises(ValueError, match=r"compute_precision\.student\.backbone\.sharding_strategy='HALF_SHARD'"):
        check_sharding_plan(cfg)
    cfg = load_config(None, [*TINY, "compute_precision.student.ibot_head.sharding_strategy=NO_SHARD"])
    with pytest.raises(ValueError, match=r"student\.ibot_head and compute_precision\.teacher\.ibot_head"):
        check_sharding_plan(cfg)
    cfg = load_config(None, [*TINY, "compute_precision.student.dino_head.mixed_precision.param_dtype=fp8"])
    with pytest.raises(ValueError, match=r"student\.dino_head\.mixed_precision\.param_dtype='fp8'"):
        check_sharding_plan(cfg)


def test_precision_follows_the_sharding_policy_where_it_applies():
    cfg = load_config(None, TINY)  # the published policies: fp16 params; autocast auto
    assert resolve_precision(cfg, torch.device("cuda"), sharded=True) == (torch.float16, True)
    assert resolve_precision(cfg, torch.device("cpu"), sharded=True) == (None, False)  # auto: fp32 on CPU
    bf16 = [f"compute_precision.{r}.{m}.mixed_precision.param_dtype=bf16" for r in ("student", "teacher")
            for m in ("backbone", "dino_head", "ibot_head")]  # fmt: skip
    assert resolve_precision(load_config(None, [*TINY, *bf16]), torch.device("cuda"), True) == (torch.bfloat16, False)
    fp32 = [item.replace("=bf16", "=fp32") for item in bf16]  # policies in fp32: no autocast at all
    assert resolve_precision(load_config(None, [*TINY, *fp32]), torch.device("cuda"), True) == (None, False)
    forced = load_config(None, [*TINY, "compute_precision.fsdp_mixed_precision=true"])
    assert resolve_precision(forced, torch.device("cpu"), sharded=True) == (torch.float16, True)
    explicit = load_config(None, [*TINY, "compute_precision.autocast_dtype=bf16"])
    assert resolve_precision(explicit, torch.device("cuda"), sharded=False) == (torch.bfloat16, False)
    # bf16 autocast, but the sharded modules compute in fp16 (the published policies): a scaler all the same
    assert resolve_precision(explicit, torch.device("cuda"), sharded=True) == (torch.bfloat16, True)
    unscaled = load_config(None, [*TINY, "compute_precision.grad_scaler=false"])
    assert resolve_precision(unscaled, torch.device("cuda"), sharded=True) == (torch.float16, False)


def test_a_sharded_run_gets_the_sharded_gradient_scaler():
    # its found-inf is all-reduced over ranks: with a plain scaler each rank would skip its own steps
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    assert isinstance(grad_scaler(torch.device("cpu"), sharded=True), ShardedGradScaler)
    plain = grad_scaler(torch.device("cpu"), sharded=False)
    assert isinstance(plain, torch.amp.GradScaler) and not isinstance(plain, ShardedGradScaler)


def test_slurm_variables_become_torchrun_variables(monkeypatch):
    for key in (*TORCHRUN_VARIABLES, *SLURM_STEP_VARIABLES):
        monkeypatch.setenv(key, "unset")  # recorded first, so that teardown also removes what the test adds
        monkeypatch.delenv(key)
    monkeypatch.setattr("dinov2.distributed._first_slurm_host", lambda: "node-017")
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8(x2)",
           "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert setup_env_from_slurm()
    import os

    got = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")}
    assert got == {
        "RANK": "9",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "8",
        "MASTER_ADDR": "node-017",
    }
    assert os.environ["MASTER_PORT"] == str(20000 + 123456 % 10000)
    monkeypatch.setenv("RANK", "3")
    assert not setup_env_from_slurm()  # torchrun's variables (WORLD_SIZE now set) win


def _batch_step_env(monkeypatch, ntasks: str) -> None:
    """What an sbatch script sees (sbatch --ntasks=N; no srun): the job's task count, SLURM_PROCID=0,
    SLURM_LOCALID=0, but none of srun's step variables."""
    for key in (*TORCHRUN_VARIABLES, *SLURM_STEP_VARIABLES):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    env = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": ntasks,
           "SLURM_TASKS_PER_NODE": f"{ntasks}", "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "gpu07"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)


def test_the_batch_script_of_sbatch_is_one_process(monkeypatch):
    # `python train.py` straight in an sbatch script with --ntasks=8: treated as 8 ranks, rank 0 would
    # wait forever for 7 peers that nothing starts. Without srun's SLURM_STEP_ID it is one process.
    import os
    import warnings

    from dinov2 import distributed

    _batch_step_env(monkeypatch, "8")
    with pytest.warns(RuntimeWarning, match=r"SLURM_NTASKS=8 but this process was not started by srun"):
        assert not setup_env_from_slurm()
    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ and "MASTER_ADDR" not in os.environ
    with pytest.warns(RuntimeWarning):
        assert not distributed.init_from_env(torch.device("cpu"))  # no group, nothing waited for
    assert not distributed.is_enabled()
    _batch_step_env(monkeypatch, "1")  # the usual single-task job: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not setup_env_from_slurm()


def test_an_srun_step_uses_its_own_task_count(monkeypatch):
    # srun -n 4 inside an allocation of 8 tasks: the step has 4 ranks (SLURM_STEP_NUM_TASKS).
    import os

    _batch_step_env(monkeypatch, "8")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "4")
    assert setup_env_from_slurm()
    assert (os.environ["WORLD_SIZE"], os.environ["LOCAL_WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("4", "4", "gpu07")


@pytest.mark.parametrize(
    ("tasks_per_node", "ntasks_per_node", "node_id", "expected"),
    [("8(x2)", None, "1", "8"), ("8(x2),4", None, "2", "4"), ("3,5", None, "1", "5"), (None, None, "0", "1"),
     ("1(x4)", "4", "0", "1"), (None, "4", "0", "4")],
)  # fmt: skip
def test_slurm_local_world_size_is_the_steps_tasks_on_this_node(
    monkeypatch, tasks_per_node, ntasks_per_node, node_id, expected
):
    # SLURM_NTASKS_PER_NODE exists only when the job asked for --ntasks-per-node, and it is the job's
    # request, not what the srun step runs; SLURM_TASKS_PER_NODE (compressed: "8(x2),4" = 8, 8, 4) is
    # the step's, and gives this node's (SLURM_NODEID) count.
    import os

    for key in (*TORCHRUN_VARIABLES, *SLURM_STEP_VARIABLES, "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    monkeypatch.setattr("dinov2.distributed._first_slurm_host", lambda: "node-001")
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "20", "SLURM_NODEID": node_id, "SLURM_STEP_ID": "0"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if tasks_per_node is not None:
        monkeypatch.setenv("SLURM_TASKS_PER_NODE", tasks_per_node)
    if ntasks_per_node is not None:
        monkeypatch.setenv("SLURM_NTASKS_PER_NODE", ntasks_per_node)
    assert setup_env_from_slurm()
    assert os.environ["LOCAL_WORLD_SIZE"] == expected


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("node[01-04,07]", "node01"), ("node[07,01-04],gpu5", "node07"), ("gpu5,node[1-2]", "gpu5"),
     ("rack[2-3]-n[004-005]", "rack2-n004"), ("login", "login")],
)  # fmt: skip
def test_first_host_of_a_compressed_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_master_addr_is_the_first_node_of_the_srun_step(monkeypatch):
    # A step may run on some of the job's nodes (srun -N2 in a 4-node job): its rank 0 is on the step's
    # first node, not the job's.
    import os

    for key in (*TORCHRUN_VARIABLES, *SLURM_STEP_VARIABLES):
        monkeypatch.setenv(key, "unset")
        monkeypatch.delenv(key)
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[01-04]",
           "SLURM_NODELIST": "node[01-04]", "SLURM_STEP_NODELIST": "node[03-04]", "SLURM_STEPID": "1"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert setup_env_from_slurm() and os.environ["MASTER_ADDR"] == "node03"
    with pytest.raises(ValueError, match="node list 'node\\[01'"):
        first_host("node[01")


def test_varlen_with_checkpointing_off_cuda_fails_before_training():
    # Off CUDA, PyTorch's jagged SDPA saves strided nested tensors, which checkpointing cannot
    # recompute ("NestedTensorImpl doesn't support sizes" in backward); the build says so at once.
    from dinov2.distributed.parallelize import parallelize
    from dinov2.train.ssl_meta_arch import SSLMetaArch

    for mode in ("full", "selective"):
        cfg = load_config(None, [*TINY, "student.attn_backend=varlen", f"train.activation_checkpointing={mode}"])
        with torch.device("meta"):
            model = SSLMetaArch(cfg)
        with pytest.raises(ValueError, match=rf"attn_backend=varlen with train.activation_checkpointing={mode}"):
            parallelize(model, cfg, torch.device("cpu"))
    cfg = load_config(None, [*TINY, "student.attn_backend=sdpa", "train.activation_checkpointing=full"])
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    assert parallelize(model, cfg, torch.device("cpu"))["student.attn_backend"] == "sdpa"


def test_srun_steps_running_at_once_get_different_master_ports(monkeypatch):
    # Two `srun ... &` steps of one job whose first node is the same would both bind 20000 + job id.
    import os

    ports = []
    for step in ("0", "1", "2"):
        _batch_step_env(monkeypatch, "8")
        for key in ("MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
            monkeypatch.delenv(key, raising=False)
        monkeypatch.setenv("SLURM_JOB_ID", "123456")
        monkeypatch.setenv("SLURM_STEP_ID", step)
        assert setup_env_from_slurm()
        ports.append(int(os.environ["MASTER_PORT"]))
    assert ports[0] == 20000 + 123456 % 10000  # step 0 keeps the job's port
    assert len(set(ports)) == 3 and all(20000 <= port < 30000 for port in ports)
