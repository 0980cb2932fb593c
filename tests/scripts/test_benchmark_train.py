"""scripts/benchmark_train.py on CPU: quickstart, tiny batch, one warm-up and one timed iteration."""

from __future__ import annotations

import argparse
import importlib.util
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from dinov2.utils.config import load_config

BATCH = 4
DROP_PATH = 0.4
SHAPE = ["student.depth=2", f"student.drop_path_rate={DROP_PATH}"]  # few ops: FlopCounterMode costs per op
FAST = ["--batch-size", str(BATCH), "--warmup", "1", "--iters", "1", "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def bench(script):
    return script("benchmark_train.py", "benchmark_train")


@pytest.fixture(scope="module")
def step_report(bench, tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "step.json"
    argv = [*FAST, "--num-batches", "1", "--backends", "math", "sdpa", *SHAPE]
    bench.main([*argv, "--output", str(output)])
    return json.loads(output.read_text())


def _mlp_flops(widths: list[int], rows: float) -> float:
    return 2.0 * rows * sum(a * b for a, b in zip(widths[:-1], widths[1:]))


def estimated_step_flops(drop_path: float) -> float:
    """Matmul FLOPs of one quickstart step by hand: 2 per multiply-add, backward = 2x forward.

    Teacher: backbone on the global crops and heads, forward only. Student: backbone on global +
    local crops, DINO head on every CLS token, iBOT head on the masked patches, forward + backward;
    with a drop rate above 0.1 each block's branches run on int(n * (1 - rate)) of n crops."""
    cfg = load_config("quickstart", SHAPE)
    dim, depth, patch = cfg.student.embed_dim, cfg.student.depth, cfg.student.patch_size
    n_global, n_local = 2 * BATCH, cfg.crops.local_crops_number * BATCH
    global_grid, local_grid = (cfg.crops.global_crops_size // patch) ** 2, (cfg.crops.local_crops_size // patch) ** 2

    def backbone(crops: int, grid: int, rate: float) -> float:
        tokens = grid + 1
        kept = int(crops * (1 - rate)) if rate > 0.1 else crops
        per_crop_block = 2 * 12 * dim * dim * tokens + 4 * tokens * tokens * dim  # qkv, proj, MLP; QK^T, AV
        return depth * kept * per_crop_block + 2 * crops * grid * 3 * patch * patch * dim  # + patch embedding

    def head(section, rows: float) -> float:
        hidden, bottleneck = section.head_hidden_dim, section.head_bottleneck_dim
        widths = [dim] + [hidden] * (section.head_nlayers - 1) + [bottleneck, section.head_n_prototypes]
        return _mlp_flops(widths, rows)

    masked_crops = int(n_global * cfg.ibot.mask_sample_probability)
    masked_patches = masked_crops * global_grid * sum(cfg.ibot.mask_ratio_min_max) / 2  # the mean ratio
    teacher = backbone(n_global, global_grid, 0.0) + head(cfg.dino, n_global) + head(cfg.ibot, masked_patches)
    student = backbone(n_global, global_grid, drop_path) + backbone(n_local, local_grid, drop_path)
    student += head(cfg.dino, n_global + n_local) + head(cfg.ibot, masked_patches)
    return teacher + 3 * student


def test_step_rows_times_and_flops(step_report):
    rows = step_report["rows"]
    assert [r["backend"] for r in rows] == ["math", "sdpa"]  # one row per combination
    assert "FlopCounterMode" in step_report["flops_note"] and step_report["git_commit"]
    for row in rows:
        assert row["compile"] == "false" and row["activation_checkpointing"] == "off" and row["dtype"] == "fp32"
        assert row["batch_size"] == BATCH and len(row["times_s"]) == 1
        assert 0 < row["s_iter_best"] <= row["s_iter_median"] and row["img_s"] > 0 and row["peak_mem_mib"] > 0
        assert row["mfu"] is None and row["mfu_nominal"] is None  # no CPU peak without --peak-tflops
        assert row["achieved_tflops"] > 0 and torch.isfinite(torch.tensor(row["loss_last"]))
        nominal, executed = estimated_step_flops(0.0), estimated_step_flops(DROP_PATH)
        assert 0.5 < row["nominal_flops"] / nominal < 2.0, (row["nominal_flops"], nominal)
        assert 0.5 < row["executed_flops"] / executed < 2.0, (row["executed_flops"], executed)
        # Stochastic depth at 0.4 skips dropped samples' compute: executed well below nominal.
        assert row["executed_flops"] < 0.9 * row["nominal_flops"]
        assert row["executed_flops"] / row["nominal_flops"] == pytest.approx(executed / nominal, abs=0.1)


def test_sdpa_row_counts_its_attention(step_report):
    """On CPU, SDPA runs aten._scaled_dot_product_flash_attention_for_cpu (and its backward), which torch's
    FLOP registry may not list: counted as zero, the sdpa row would count fewer FLOPs than math. Counted as
    model FLOPs (backward = twice the forward, the fused kernel's recomputed QK^T left out), both backends
    count the same FLOPs for the same model."""
    math, sdpa = step_report["rows"]
    assert sdpa["flops_counted_with_backend"] == "sdpa" and math["flops_counted_with_backend"] == "math"
    assert sdpa["nominal_flops"] == math["nominal_flops"]
    assert sdpa["executed_flops"] == math["executed_flops"]


def analytic_step_flops(cfg, batch: dict, drop_path: float) -> int:
    """Model FLOPs of one training step, by hand from the config (an independent check of the counter).

    Multiply-add = 2 FLOPs. Per crop of N = 1 + registers + P tokens (P patches) and per block:
    qkv 3d^2 + proj d^2 + MLP (GELU: 2 d h; SwiGLU: 3 d h' with h' = 2/3 h rounded up to 8) per token,
    attention QK^T and AV 2 N^2 d per crop; patch embedding 3 p^2 d per patch. Teacher: the global crops,
    DINO head on their CLS tokens, iBOT head on the masked patches, forward only. Student: global + local
    crops, DINO head on every CLS token, iBOT head on the masked patches; backward = 2 x forward except
    the patch embedding (the images need no gradient: weight gradient only, 1 x). With a drop rate above
    0.1 each block's two branches run on max(int(n (1 - rate)), 1) of each group's n crops. KoLeo: a
    no-grad B x B x d matmul per global crop. Everything per micro-batch, times train.grad_accum_steps."""
    s = cfg.student
    dim, depth, patch, tokens_extra = s.embed_dim, s.depth, s.patch_size, 1 + s.num_register_tokens
    hidden = 4 * dim
    if s.ffn_layer == "mlp":
        per_token = 3 * dim * dim + dim * dim + 2 * dim * hidden
    else:
        swiglu_hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        per_token = 3 * dim * dim + dim * dim + 3 * dim * swiglu_hidden
    batch_size = len(batch["collated_global_crops"]) // 2
    n_masked = len(batch["mask_indices_list"])

    def backbone(crops: int, size: int, rate: float) -> tuple[int, int]:
        """(patch embedding, blocks) forward FLOPs of one group of crops."""
        grid = (size // patch) ** 2
        tokens = grid + tokens_extra
        kept = max(int(crops * (1 - rate)), 1) if rate > 0.1 else crops
        blocks = depth * kept * (2 * tokens * per_token + 2 * 2 * tokens * tokens * dim)
        return 2 * crops * grid * 3 * patch * patch * dim, blocks

    def head(section, rows: int) -> int:
        widths = [dim] + [section.head_hidden_dim] * (section.head_nlayers - 1)
        widths += [section.head_bottleneck_dim, section.head_n_prototypes]
        return 2 * rows * sum(a * b for a, b in zip(widths[:-1], widths[1:]))

    n_global, n_local = 2 * batch_size, cfg.crops.local_crops_number * batch_size
    teacher = sum(backbone(n_global, cfg.crops.global_crops_size, 0.0))
    teacher += head(cfg.dino, n_global) + head(cfg.ibot, n_masked)
    groups = [backbone(n_global, cfg.crops.global_crops_size, drop_path)]
    groups += [backbone(n_local, cfg.crops.local_crops_size, drop_path)] if n_local else []
    embed, blocks = sum(g[0] for g in groups), sum(g[1] for g in groups)
    heads = head(cfg.dino, n_global + n_local) + head(cfg.ibot, n_masked)
    student = (embed + blocks + heads) + (embed + 2 * blocks + 2 * heads)  # forward + backward
    koleo = 2 * (2 * batch_size * batch_size * dim)
    return cfg.train.grad_accum_steps * (teacher + student + koleo)


EXACT_CASES = {
    "vit, drop path 0.4, registers": ["student.num_register_tokens=2"],
    "swiglu, no local crops, 2 micro-batches": [
        "student.ffn_layer=swiglufused", "crops.local_crops_number=0", "train.grad_accum_steps=2",
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", EXACT_CASES)
def test_counted_flops_equal_the_analytic_formula(bench, tmp_path, case):
    """count_flops over one full step (teacher, nested student forward + backward, heads, losses) equals
    the hand-derived model FLOPs exactly, for math and sdpa attention, executed and nominal; one step
    with two micro-batches counts both (twice one micro-batch), warm-up never enters."""
    argv = [*FAST, "--num-batches", "1", *SHAPE, *EXACT_CASES[case]]
    args = bench.parse_args(argv)
    base = bench.load_benchmark_config(args)
    batches, _ = bench.make_batches(base, 1, "synthetic")
    for backend in ("math", "sdpa"):
        for drop_path in (DROP_PATH, 0.0):
            cfg = bench.row_config(base, backend, "false", "off", drop_path=drop_path)
            counted = bench.count_flops(cfg, torch.device("cpu"), batches, str(tmp_path))
            assert counted == analytic_step_flops(cfg, batches[0], drop_path), (backend, drop_path)


class SdpaOnly(torch.nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("backward", [False, True])
def test_count_flops_counts_cpu_sdpa(bench, monkeypatch, backward):
    """count_flops on a step that is one SDPA call on CPU (query and key lengths differ, so a swapped
    argument would show). Forward: QK^T and PV, 2 * Lq * Lk * D each per (batch, head). Backward, as
    model FLOPs: dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q, four products of that size (twice the
    forward; the kernel's recomputation of QK^T is not a model FLOP)."""
    b, h, lq, lk, d = 2, 3, 5, 7, 8
    q = torch.randn(b, h, lq, d, requires_grad=backward)
    k, v = (torch.randn(b, h, lk, d, requires_grad=backward) for _ in range(2))

    def one_step(module, data, count):
        out = module(q, k, v)
        if backward:
            out.sum().backward()

    monkeypatch.setattr(bench, "build_trainer", lambda cfg, device, output_dir: SdpaOnly())
    monkeypatch.setattr(bench, "run_steps", one_step)
    product = 2 * b * h * lq * lk * d
    assert bench.count_flops(None, torch.device("cpu"), [], "") == (2 + 4 * backward) * product


def test_extra_flop_formulas_skip_ops_this_torch_lacks(bench, monkeypatch):
    monkeypatch.setattr(bench, "EXTRA_SDPA_FORMULAS", (("no_such_attention_op", bench._sdpa_forward_flops),))
    assert bench.extra_flop_formulas() == {}
    with bench.flop_counter() as counter:
        torch.ones(2, 3) @ torch.ones(3, 4)
    assert counter.get_total_flops() == 2 * 2 * 3 * 4


def _meta_attention_calls(q, k, v, grad):
    """(name, forward, backward) calls of the fused SDPA kernels torch dispatches to on CUDA, here on the
    meta device (shapes only): the same aten ops, so the same FLOP formulas, without a GPU."""
    aten = torch.ops.aten

    def flash_backward(out):
        o, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = out
        return aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, 0.0, False, seed, offset
        )

    def efficient_backward(out):
        o, lse, seed, offset = out
        return aten._scaled_dot_product_efficient_attention_backward(
            grad, q, k, v, None, o, lse, seed, offset, 0.0, [True, True, True, False]
        )

    def cudnn_backward(out):
        o, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = out
        return aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, o, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, False
        )

    return [
        ("flash", lambda: aten._scaled_dot_product_flash_attention(q, k, v), flash_backward),
        ("efficient", lambda: aten._scaled_dot_product_efficient_attention(q, k, v, None, True), efficient_backward),
        ("cudnn", lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True), cudnn_backward),
    ]


def test_cuda_attention_kernels_count_model_flops(bench):
    """The CUDA flash / memory-efficient / cuDNN SDPA kernels (run on meta tensors) count 2 products
    forward and 4 backward, as the math backend's matmuls do: torch's registry alone counts 5 backward
    (the recomputed QK^T), which would put a GPU sdpa (or xformers, counted as sdpa) row above math."""
    b, h, lq, lk, d = 2, 3, 5, 7, 8
    q, grad = (torch.empty(b, h, lq, d, device="meta") for _ in range(2))
    k, v = (torch.empty(b, h, lk, d, device="meta") for _ in range(2))
    product = 2 * b * h * lq * lk * d
    for name, forward, backward in _meta_attention_calls(q, k, v, grad):
        out = forward()
        with bench.flop_counter() as counter:
            forward()
        assert counter.get_total_flops() == 2 * product, name
        with bench.flop_counter() as counter:
            backward(out)
        assert counter.get_total_flops() == 4 * product, name


def test_data_mode_rows(bench, tmp_path):
    output = tmp_path / "data.json"
    bench.main(["--mode", "data", *FAST, "--num-workers", "0", "1", "--output", str(output)])
    rows = json.loads(output.read_text())["rows"]
    assert [r["num_workers"] for r in rows] == [0, 1]
    for row in rows:
        assert row["batches"] == 1 and row["seconds"] > 0 and row["img_s"] > 0 and not row["gpu_augmentation"]


def test_data_mode_with_gpu_augmentation(bench, tmp_path):
    if importlib.util.find_spec("dinov2.data.gpu_augmentation") is None:
        pytest.skip("no GPU augmentation path in this tree")
    output = tmp_path / "gpu_aug.json"
    argv = ["--mode", "data", *FAST, "--num-workers", "0", "train.gpu_augmentation=true", "--output", str(output)]
    bench.main(argv)
    (row,) = json.loads(output.read_text())["rows"]
    assert row["gpu_augmentation"] and row["img_s"] > 0


def test_gpu_augmentation_that_cannot_be_imported_fails_clearly(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "GPU_AUGMENTATION_MODULES", ("dinov2.no_such_module",))
    with pytest.raises(SystemExit, match="build_gpu_augmentation cannot be imported"):
        bench.main(["--mode", "data", *FAST, "train.gpu_augmentation=true", "--output", str(tmp_path / "x.json")])


def test_device_peak_table(bench, monkeypatch):
    cuda = torch.device("cuda", 0)
    for name, expected in [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bench.device_peak(cuda, "bf16", True, None)[0] == expected
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A100-SXM4-80GB")
    assert bench.device_peak(cuda, "fp16", True, None)[0] == 312.0
    assert bench.device_peak(cuda, "fp32", True, None)[0] == 156.0  # TF32 tensor cores
    assert bench.device_peak(cuda, "fp32", False, None)[0] == 19.5
    assert bench.device_peak(torch.device("cpu"), "fp32", False, None)[0] is None
    assert bench.device_peak(torch.device("cpu"), "fp32", False, 2.5)[0] == 2.5
    assert bench.cell("mfu", None) == "n/a"


def test_a_failing_row_is_recorded_and_the_others_still_run(bench, tmp_path, monkeypatch):
    """Out of memory (or a kernel error) in one combination: its row carries the error, the next row is
    timed, and the exit status says a row failed."""
    real = bench.bench_step_row

    def out_of_memory_for_math(base, combo, ctx):
        if combo[0] == "math":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(base, combo, ctx)

    monkeypatch.setattr(bench, "bench_step_row", out_of_memory_for_math)
    output = tmp_path / "step.json"
    report = bench.main([*FAST, "--num-batches", "1", "--backends", "math", "sdpa", *SHAPE, "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["complete"] and saved["failed_rows"] == 1 == report["failed_rows"]
    failed, timed = saved["rows"]
    assert failed["backend"] == "math" and failed["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert timed["backend"] == "sdpa" and "error" not in timed and timed["img_s"] > 0


def test_rows_already_timed_survive_a_run_stopped_midway(bench, tmp_path, monkeypatch):
    """A run killed at a time limit (here: interrupted before its second row) leaves the first row on disk."""
    real = bench.bench_step_row

    def stop_at_second(base, combo, ctx):
        if combo[0] == "sdpa":
            raise KeyboardInterrupt  # not a row failure: the run itself stops
        return real(base, combo, ctx)

    monkeypatch.setattr(bench, "bench_step_row", stop_at_second)
    output = tmp_path / "step.json"
    with pytest.raises(KeyboardInterrupt):
        bench.main([*FAST, "--num-batches", "1", "--backends", "math", "sdpa", *SHAPE, "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved["complete"] is False and [r["backend"] for r in saved["rows"]] == ["math"]
    assert saved["rows"][0]["s_iter_median"] > 0


def test_flop_counting_that_runs_out_of_memory_leaves_the_timing(bench, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench, "count_flops", out_of_memory)
    output = tmp_path / "step.json"
    bench.main([*FAST, "--num-batches", "1", "--backends", "sdpa", *SHAPE, "--output", str(output)])
    (row,) = json.loads(output.read_text())["rows"]
    assert row["s_iter_median"] > 0 and row["img_s"] > 0 and "error" not in row
    assert row["executed_flops"] is None and row["achieved_tflops"] is None and row["mfu"] is None
    assert row["flops_error"].startswith("OutOfMemoryError")


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--num-batches", "0"], "--num-batches"),  # cycled nothing: the first step waited forever
        (["--batch-size", "0"], "--batch-size"),  # was ignored: the config's batch was timed instead
        (["--peak-tflops", "0"], "--peak-tflops"),  # was ignored: the table's peak was used
        (["--peak-tflops", "-5"], "--peak-tflops"),  # a negative MFU
        (["--num-workers", "2", "-1"], "--num-workers"),
    ],
)
def test_bad_arguments_fail_with_a_message_naming_them(bench, capsys, argv, flag):
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(argv)
    assert stopped.value.code == 2 and flag in capsys.readouterr().err


def test_an_option_value_with_an_equals_sign_is_not_a_config_override(bench, tmp_path):
    """Config overrides (key=value) may stand anywhere on the line, even after a list option
    (``--backends sdpa student.drop_path_rate=0.4``, as docs/performance.md runs it); the value of a
    one-value option such as ``--output runs/bs=64.json`` is that option's, not an override (it was
    taken for one, leaving ``--output`` without its value)."""
    output = tmp_path / "bs=64.json"
    args = bench.parse_args(["--output", str(output), "--backends", "sdpa", "student.drop_path_rate=0.4",
                             "--config", "quickstart", "crops.local_crops_number=2"])  # fmt: skip
    assert args.output == output and args.config == "quickstart" and args.backends == ["sdpa"]
    assert args.opts == ["student.drop_path_rate=0.4", "crops.local_crops_number=2"]
    args = bench.parse_args([f"--output={output}", "train.seed=3"])
    assert args.output == output and args.opts == ["train.seed=3"]


def test_cuda_row_resets_peaks_after_the_build_and_reports_mfu_against_the_device_peak(bench, monkeypatch):
    """bench_step_row's CUDA path, simulated on CPU (torch.cuda's functions replaced): the peak counters
    are reset after the row's model is built and read after the timed steps, the row reports both the
    allocated and the reserved peak (what must fit on a smaller card), and MFU is the counted FLOPs over
    the median step time over the H200's 989 TFLOP/s dense bf16 peak, executed and nominal alike."""
    calls = []
    gib = 2**30

    class BuiltTrainer:
        autocast_dtype = torch.bfloat16

        def samples_per_step(self):
            return 64

    def build(cfg, device, output_dir):
        calls.append("build")
        return BuiltTrainer()

    times = iter([[9.0, 9.0], [0.30, 0.20, 0.25]])  # warm-up (compile, first-touch), then the timed steps

    def steps(trainer, data, count):
        calls.append(f"{count} steps")
        return next(times), 1.5

    flops = {"executed_flops": 7.0e13, "nominal_flops": 9.8e13, "flops_counted_with_backend": "sdpa"}
    monkeypatch.setattr(bench, "step_flops", lambda base, backend, ctx: dict(flops))
    monkeypatch.setattr(bench, "row_config", lambda base, *args, **kwargs: base)
    monkeypatch.setattr(bench, "build_trainer", build)
    monkeypatch.setattr(bench, "run_steps", steps)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append("read") or 30 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 34 * gib)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    base = OmegaConf.create({"compute_precision": {"tf32": True}})
    args = argparse.Namespace(warmup=2, iters=3, peak_tflops=None)
    ctx = {"args": args, "device": torch.device("cuda", 0), "batches": [], "tmp": "", "flops": {}}
    row = bench.bench_step_row(base, ("sdpa", "false", "off"), ctx)
    assert calls == ["reset", "build", "reset", "2 steps", "3 steps", "read"]
    assert row["times_s"] == [0.30, 0.20, 0.25] and row["s_iter_median"] == 0.25 and row["s_iter_best"] == 0.20
    assert row["img_s"] == pytest.approx(64 / 0.25) and row["dtype"] == "bf16"
    assert row["peak_mem_mib"] == 30 * 1024 and row["peak_reserved_mib"] == 34 * 1024
    assert row["peak_tflops"] == 989.0
    assert row["achieved_tflops"] == pytest.approx(280.0)  # 7e13 FLOP / 0.25 s
    assert row["mfu"] == pytest.approx(280.0 / 989.0)
    assert row["mfu_nominal"] == pytest.approx(392.0 / 989.0)  # 9.8e13 / 0.25 s, no stochastic-depth savings


def test_a_run_left_without_any_backend_fails_clearly(bench, tmp_path):
    """``--backends xformers`` where xFormers cannot run (here: CPU) used to time nothing and exit 0 with
    an empty table; a plan step asking only for xFormers would have looked like a clean run."""
    with pytest.raises(SystemExit, match=r"benchmark_train: no backend left to time: xformers .*\(needs CUDA\)"):
        bench.main(
            [*FAST, "--num-batches", "1", "--backends", "xformers", *SHAPE, "--output", str(tmp_path / "x.json")]
        )


def test_a_row_whose_build_fails_reports_its_own_cuda_peak(bench, monkeypatch):
    """A row that runs out of memory while its model is built reports how far it got: the peak since its
    own start, not the peak left over from the FLOP count (or the previous row) before it."""
    gib, peak = 2**30, {"now": 0}

    def count(base, backend, ctx):  # the eager FLOP-count step: the largest allocation of the run
        peak["now"] = max(peak["now"], 60 * gib)
        return {"executed_flops": None, "nominal_flops": None, "flops_counted_with_backend": "sdpa"}

    def build(cfg, device, output_dir):
        peak["now"] = max(peak["now"], 5 * gib)
        raise torch.OutOfMemoryError("CUDA out of memory while building")

    monkeypatch.setattr(bench, "step_flops", count)
    monkeypatch.setattr(bench, "row_config", lambda base, *args, **kwargs: base)
    monkeypatch.setattr(bench, "build_trainer", build)
    monkeypatch.setattr(bench, "make_batches", lambda base, count, source: ([], "synthetic"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: peak.update(now=0))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: peak["now"])
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    base = OmegaConf.create({"student": {"attn_backend": "sdpa"}, "train": {"compile": False,
                             "activation_checkpointing": "off"}})  # fmt: skip
    args = argparse.Namespace(backends=["sdpa"], compile=None, checkpointing=None, num_batches=1,
                              batch_source="synthetic", warmup=1, iters=1, peak_tflops=None)  # fmt: skip
    rows, _ = bench.bench_step(base, args, torch.device("cuda", 0))
    assert "out of memory" in rows[0]["error"]
    assert rows[0]["peak_mem_mib"] == 5 * 1024 and rows[0]["peak_reserved_mib"] == 5 * 1024


def test_varlen_row_flops_equal_the_analytic_formula(bench, tmp_path):
    """FlopCounterMode cannot count SDPA on jagged tensors (on CPU it fails inside the decomposition of
    the nested matmul), so a ``varlen`` row takes the count of an ``sdpa`` build: the same per-crop
    products. Its executed and nominal FLOPs must equal the hand formula, not be null or short."""
    args = bench.parse_args([*FAST, "--num-batches", "1", *SHAPE])
    base = bench.load_benchmark_config(args)
    batches, _ = bench.make_batches(base, 1, "synthetic")
    ctx = {"device": torch.device("cpu"), "batches": batches, "tmp": str(tmp_path), "flops": {}}
    entry = bench.step_flops(base, "varlen", ctx)
    assert entry["flops_counted_with_backend"] == "sdpa" and "flops_error" not in entry
    cfg = bench.row_config(base, "varlen", "false", "off")
    assert entry["executed_flops"] == analytic_step_flops(cfg, batches[0], DROP_PATH)
    assert entry["nominal_flops"] == analytic_step_flops(cfg, batches[0], 0.0)
