#!/usr/bin/env python
"""Throughput, memory, FLOPs and MFU of the full DINOv2 training step, or of the training data stream alone.

``--mode step``: :meth:`dinov2.train.loop.Trainer.step` (batch to device, teacher forward, student
forward + backward, heads, losses, clipping, AdamW, teacher EMA) on a model built as training builds
it (``build_model``), over a few real batches (the config's dataset, augmentation and masked collate;
the Synthetic set when that dataset cannot be opened) built once and cycled. One row per (attention
backend, compile, activation checkpointing); CUDA synchronised around every step; median and best.
FLOPs: model FLOPs, counted with ``torch.utils.flop_counter.FlopCounterMode`` (not fvcore) over one
full step (all its micro-batches, no warm-up) of an eager build without checkpointing: matmul/conv/
attention, forward and backward, a multiply-add = 2 FLOPs. Every SDPA kernel's backward is counted as
twice its forward (the fused kernels' recomputed ``QK^T`` left out, as the ``math`` backend counts), and
SDPA's CPU kernels, which torch's registry lacks, get torch's SDPA formula; activation-checkpointing
recomputation is not counted (MFU, not HFU). *Executed* FLOPs with stochastic depth as configured,
*nominal* with ``student.drop_path_rate=0``; ``mfu`` = executed / median s per step / device peak,
``mfu_nominal`` the same with the nominal FLOPs. xFormers and varlen rows use the ``sdpa`` count.

``--mode data``: images/s of ``build_train_loader`` per ``--num-workers``, ``--iters`` batches after
``--warmup`` (at least one per worker); with ``train.gpu_augmentation=true`` each batch also goes to
the device and through ``build_gpu_augmentation(cfg)`` (as ``Trainer.step`` does in step mode).

    python scripts/benchmark_train.py                                   # quickstart, CPU, seconds
    python scripts/benchmark_train.py --config vitl16_short --batch-size 64 --backends sdpa xformers
    python scripts/benchmark_train.py --mode data --num-workers 0 2 4
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from dinov2.ops.attention import BACKENDS, resolve_backend
from dinov2.train.data import build_train_dataset, build_train_loader
from dinov2.train.loop import Trainer
from dinov2.train.train import build_model, setup_config
from dinov2.utils.benchmark import environment as run_environment
from dinov2.utils.benchmark import release, usable_backends, write_report
from dinov2.utils.config import load_config, load_default_config, select
from dinov2.utils.device import batch_to_device, enable_tf32, peak_memory_mb, resolve_device, seed_everything
from dinov2.utils.logging import describe_error

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTING = ("off", "full", "selective")
GPU_AUGMENTATION_MODULES = ("dinov2.train.data", "dinov2.data.gpu_augmentation")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}
# Nominal dense peak TFLOP/s (data sheets, no sparsity), first match in torch.cuda.get_device_name. "tf32":
# tensor-core rate of fp32 matmuls with compute_precision.tf32; "fp32": the non-tensor-core rate.
DEVICE_PEAKS = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0, "tf32": 495.0, "fp32": 67.0}),  # SXM: "NVIDIA H100 80GB HBM3"
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
)
FLOPS_NOTE = (
    "model FLOPs: torch.utils.flop_counter.FlopCounterMode (not fvcore) over one full Trainer.step (every "
    "micro-batch of it, no warm-up) of an eager build without activation checkpointing: matmul/conv/attention "
    "FLOPs, multiply-add = 2, forward and backward (teacher forward, student forward+backward, heads, KoLeo's "
    "neighbour search, and the GPU augmentation's kernels when on); element-wise ops, optimizer and EMA not "
    "counted, nor recomputation: the backward of every SDPA kernel (CPU flash, CUDA flash/efficient/cuDNN) is "
    "counted as twice its forward (4 B H Lq Lk D), as the math backend's matmuls are, not with the recomputed "
    "QK^T torch's registry adds, and activation checkpointing's recomputed forward is not counted (MFU, not HFU). "
    "SDPA's CPU forward kernel (aten._scaled_dot_product_flash_attention_for_cpu), which torch's registry "
    "lacks, gets torch's SDPA formula. xformers and varlen rows carry the sdpa count "
    "(flops_counted_with_backend). "
    "executed_flops: stochastic depth as configured; nominal_flops: the same step with student.drop_path_rate=0"
)
MFU_NOTE = (
    "mfu = executed_flops / s_iter_median / peak (s_iter: one optimiser step, all its micro-batches); "
    "mfu_nominal = nominal_flops / s_iter_median / peak (model FLOPs utilisation counting the FLOPs a step would "
    "take without stochastic depth); null when no peak is known"
)
CPU_MEM_NOTE = "CPU: peak_mem_mib is the process peak RSS (ru_maxrss): monotone over rows, FLOP counting included"
CUDA_MEM_NOTE = (
    "CUDA: peak_mem_mib = torch.cuda.max_memory_allocated, peak_reserved_mib = torch.cuda.max_memory_reserved (what "
    "the caching allocator took from the card: the figure that must fit on a smaller GPU), over warm-up + timed "
    "steps, reset once each row's model is built (its weights count)"
)


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="plus key=value config overrides")
    p.add_argument("--config", default="quickstart", help="a config under configs/train/ or a path")
    p.add_argument("--mode", choices=("step", "data"), default="step")
    p.add_argument("--batch-size", type=int, help="train.batch_size_per_gpu (default: the config's)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, help="attention backends (default: the config's)")
    p.add_argument("--compile", nargs="+", help="train.compile values (false, true, a backend); default: the config's")
    p.add_argument("--activation-checkpointing", "--checkpointing", dest="checkpointing", nargs="+",
                   choices=CHECKPOINTING, help="default: the config's")  # fmt: skip
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", help="train.device: auto, cpu, cuda, cuda:N (default: the config's)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"),
                   help="compute_precision.autocast_dtype (default auto: bf16 on CUDA, fp32 on CPU)")  # fmt: skip
    p.add_argument("--num-batches", type=int, default=2, help="step mode: distinct in-memory batches, cycled")
    p.add_argument("--batch-source", choices=("auto", "config", "synthetic"), default="auto",
                   help="step mode: the config's dataset, the embedded Synthetic set, or the first that opens")  # fmt: skip
    p.add_argument("--num-workers", nargs="+", type=int, help="data mode: loader workers per row (default: config)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table by device name; none on CPU)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--output", type=Path, default=REPO / "runs" / "benchmarks" / "benchmark_train.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides, rest = split_overrides(p, argv)
    args = p.parse_args(rest)
    if args.warmup < 0 or args.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    for flag, value in (("--batch-size", args.batch_size), ("--num-batches", args.num_batches),
                        ("--peak-tflops", args.peak_tflops), ("--threads", args.threads)):  # fmt: skip
        if value is not None and value <= 0:  # 0 would be ignored (batch, peak, threads) or cycle nothing forever
            p.error(f"{flag} must be > 0, got {value}")
    if args.num_workers and min(args.num_workers) < 0:
        p.error(f"--num-workers must be >= 0, got {min(args.num_workers)}")
    args.opts, args.argv = overrides, argv
    return args


def split_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """``(key=value config overrides, the rest)``. Overrides may stand anywhere on the line, also after
    a list option (``--backends sdpa student.drop_path_rate=0.4``); the token after a one-value option
    (``--output runs/bs=64.json``) is that option's value, whatever it contains."""
    overrides, rest, takes_value = [], [], False
    for token in argv:
        if not takes_value and "=" in token and not token.startswith("-"):
            overrides.append(token)
            continue
        rest.append(token)
        action = None if takes_value else parser._option_string_actions.get(token)
        takes_value = action is not None and action.nargs is None  # store: exactly one value follows
    return overrides, rest


def load_benchmark_config(args: argparse.Namespace):
    """The config with the CLI's overrides. ``train.gpu_augmentation`` is accepted even before the
    default config declares it (the GPU augmentation path is optional)."""
    overrides = list(args.opts)
    overrides += [f"train.batch_size_per_gpu={args.batch_size}"] if args.batch_size is not None else []
    overrides += [f"compute_precision.autocast_dtype={args.dtype}"] if args.dtype else []
    overrides += [f"train.device={args.device}"] if args.device else []
    late = []
    if "gpu_augmentation" not in load_default_config().train:
        late = [o for o in overrides if o.split("=", 1)[0].strip() == "train.gpu_augmentation"]
        overrides = [o for o in overrides if o not in late]
    cfg = load_config(args.config, overrides)
    if late:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(late))
    cfg.evaluation.knn.train_dataset = ""  # no online k-NN in a benchmark
    return cfg


# ---------------------------------------------------------------------------------------------- step mode
def row_config(base, backend: str, compile_: str, checkpointing: str, drop_path: float | None = None):
    """``base`` with one row's settings, lr derived for one process (as ``train.py`` does)."""
    compile_value = {"false": False, "true": True}.get(str(compile_).lower(), compile_)
    section = {"student": {"attn_backend": backend}, "train": {"compile": compile_value}}
    section["train"]["activation_checkpointing"] = str(checkpointing)
    if drop_path is not None:
        section["student"]["drop_path_rate"] = drop_path
    cfg = OmegaConf.merge(base, section)
    return setup_config(argparse.Namespace(config=None, opts=[], output_dir=""), cfg)


def build_trainer(cfg, device: torch.device, output_dir: str) -> Trainer:
    seed_everything(int(cfg.train.seed))
    model = build_model(cfg, device)
    model.train()
    return Trainer(cfg, model, device, output_dir)


def open_dataset(cfg, source: str):
    """``(dataset, description)``: the config's dataset, or the embedded Synthetic set."""
    if source in ("auto", "config"):
        try:
            return build_train_dataset(cfg), str(cfg.train.dataset_path)
        except (OSError, RuntimeError, ValueError) as error:
            if source == "config":
                raise
            print(f"note: {cfg.train.dataset_path} cannot be opened ({type(error).__name__}); using Synthetic")
    size = max(64, int(cfg.crops.global_crops_size) * 8 // 7)
    cfg = OmegaConf.merge(cfg, {"train": {"dataset_path": f"Synthetic:split=TRAIN:num_images=1000:image_size={size}"}})
    return build_train_dataset(cfg), str(cfg.train.dataset_path)


def make_batches(cfg, count: int, source: str) -> tuple[list[dict], str]:
    """``count`` batches from the training stream (dataset, augmentation, masks), in this process."""
    cfg = OmegaConf.merge(cfg, {"train": {"num_workers": 0}})
    dataset, description = open_dataset(cfg, source)
    stream = iter(build_train_loader(cfg, dataset))
    return [next(stream) for _ in range(count)], description


def cycle(batches: list[dict]):
    while True:
        for batch in batches:
            yield dict(batch)  # Trainer.step pops keys from the batch it gets


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(trainer: Trainer, data, count: int) -> tuple[list[float], float]:
    """Seconds per step for ``count`` steps (schedules applied as in training), and the last loss."""
    times, loss = [], float("nan")
    for _ in range(count):
        synchronize(trainer.device)
        start = time.perf_counter()
        scheduled = trainer.apply_schedules(min(trainer.iteration, trainer.max_iter - 1))
        losses, _ = trainer.step(data, scheduled)
        trainer.iteration += 1
        synchronize(trainer.device)
        times.append(time.perf_counter() - start)
        loss = float(losses["loss"])
    return times, loss


def _sdpa_forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of an SDPA forward op whose arguments start ``(query, key, value)`` (shapes): ``QK^T`` and
    ``PV``, ``2 B H Lq Lk D`` each (torch's ``sdpa_flop_count``)."""
    return sdpa_flop_count(query, key, value)


def _sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Model FLOPs of an SDPA backward op whose arguments start ``(grad_out, query, key, value)`` (shapes):
    twice the forward, i.e. the four products ``dP = dO V^T``, ``dV = P^T dO``, ``dQ = dS K`` and
    ``dK = dS^T Q``, as the ``math`` backend's two batched matmuls count. The ``QK^T`` that the fused
    kernels recompute in backward is recomputation, which model FLOPs (MFU) leave out; torch's registry
    (``sdpa_backward_flop_count``) counts it as a fifth product, which would make a fused-attention row
    count more FLOPs than a ``math`` row for the same model."""
    return 2 * sdpa_flop_count(query, key, value)


# SDPA kernels, with their schemas' leading arguments, given explicit formulas (the same for every
# backend, so that every row counts the same model FLOPs):
# - _scaled_dot_product_flash_attention_for_cpu(query, key, value, ...): torch 2.14's registry lacks it
#   (FlopCounterMode would count CPU attention as 0);
# - the backward ops, (grad_out, query, key, value, ...): CPU flash (also missing from the registry) and
#   the CUDA flash / memory-efficient / cuDNN kernels, whose registry formula counts the recomputed QK^T.
EXTRA_SDPA_FORMULAS = (
    ("_scaled_dot_product_flash_attention_for_cpu", _sdpa_forward_flops),
    ("_scaled_dot_product_flash_attention_for_cpu_backward", _sdpa_backward_flops),
    ("_scaled_dot_product_flash_attention_backward", _sdpa_backward_flops),
    ("_scaled_dot_product_efficient_attention_backward", _sdpa_backward_flops),
    ("_scaled_dot_product_cudnn_attention_backward", _sdpa_backward_flops),
)


def extra_flop_formulas() -> dict:
    """FlopCounterMode ``custom_mapping`` for the ops of ``EXTRA_SDPA_FORMULAS`` that this torch has
    (they replace the registry's entries where it has some)."""
    formulas = {}
    for name, formula in EXTRA_SDPA_FORMULAS:
        packet = getattr(torch.ops.aten, name, None)
        if packet is not None:
            formulas[packet] = formula
    return formulas


def flop_counter() -> FlopCounterMode:
    """A silent FlopCounterMode that also counts SDPA's CPU kernels."""
    return FlopCounterMode(display=False, custom_mapping=extra_flop_formulas())


def count_flops(cfg, device: torch.device, batches: list[dict], output_dir: str) -> int:
    """FLOPs of one full training step (:func:`flop_counter`), on an eager build without checkpointing."""
    trainer = None
    try:
        trainer = build_trainer(cfg, device, output_dir)
        with flop_counter() as counter:
            run_steps(trainer, cycle(batches), 1)
    finally:
        del trainer
        release(device)
    return int(counter.get_total_flops())


def countable(cfg):
    """``cfg`` for the FLOP count: ``ffn_layer: swiglufused`` counted as ``swiglu`` (the same
    parameters and matmuls; xFormers' fused SwiGLU, where it runs, is a custom op the counter
    cannot see)."""
    if str(select(cfg, "student.ffn_layer", "mlp")) == "swiglufused":
        cfg = OmegaConf.merge(cfg, {"student": {"ffn_layer": "swiglu"}})
    return cfg


def step_flops(base, backend: str, ctx: dict) -> dict:
    """Executed and nominal FLOPs for ``backend`` (cached; xFormers and varlen are counted as sdpa)."""
    # FlopCounterMode sees neither the xFormers kernel nor SDPA on jagged tensors; both compute the
    # attention of the per-group sdpa path (the same block-diagonal products), so they reuse its count.
    counted = "sdpa" if resolve_backend(backend, ctx["device"], nested=True) in ("xformers", "varlen") else backend
    if counted not in ctx["flops"]:
        entry = {"executed_flops": None, "nominal_flops": None, "flops_counted_with_backend": counted}
        try:  # an eager step without checkpointing: the first thing to run out of memory on a large model
            executed = countable(row_config(base, counted, "false", "off"))
            entry["executed_flops"] = count_flops(executed, ctx["device"], ctx["batches"], ctx["tmp"])
            nominal = countable(row_config(base, counted, "false", "off", drop_path=0.0))
            entry["nominal_flops"] = count_flops(nominal, ctx["device"], ctx["batches"], ctx["tmp"])
        except Exception as error:  # the row is still timed; its FLOP figures are left null
            entry["flops_error"] = describe_error(error)
            print(f"note: FLOPs not counted with {counted}: {entry['flops_error']}")
        ctx["flops"][counted] = entry
    return ctx["flops"][counted]


def device_peak(device: torch.device, dtype: str, tf32: bool, override: float | None) -> tuple[float | None, str]:
    """``(peak TFLOP/s or None, where it comes from)``."""
    if override is not None:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "none for CPU (pass --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    key = "tf32" if dtype == "fp32" and tf32 else dtype
    for pattern, peaks in DEVICE_PEAKS:
        if pattern in name:
            return peaks[key], f"{pattern} {key} dense, nominal data-sheet figure"
    return None, f"unknown device {name!r} (pass --peak-tflops)"


def memory_fields(device: torch.device) -> dict:
    """``peak_mem_mib`` (CUDA: peak allocated; CPU: peak RSS) and, on CUDA, ``peak_reserved_mib``: the
    caching allocator's peak hold on the card, allocated plus cached blocks and fragmentation, which is
    what has to fit when a figure measured on a 141 GB H200 is read for an 80 GB H100."""
    fields = {"peak_mem_mib": peak_memory_mb(device)}
    if device.type == "cuda":
        fields["peak_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return fields


def bench_step_row(base, combo: tuple[str, str, str], ctx: dict) -> dict:
    backend, compile_, checkpointing = combo
    cfg = row_config(base, backend, compile_, checkpointing)
    device = ctx["device"]
    flops = step_flops(base, backend, ctx)
    if device.type == "cuda":  # a build that fails then reports its own peak, not the FLOP count's
        torch.cuda.reset_peak_memory_stats(device)
    trainer = build_trainer(cfg, device, ctx["tmp"])
    if device.type == "cuda":  # the row's figures: from the built model on (its weights count)
        torch.cuda.reset_peak_memory_stats(device)
    data = cycle(ctx["batches"])
    run_steps(trainer, data, ctx["args"].warmup)
    times, loss = run_steps(trainer, data, ctx["args"].iters)
    images = trainer.samples_per_step()
    dtype = DTYPE_NAMES[trainer.autocast_dtype]
    peak, peak_source = device_peak(device, dtype, bool(cfg.compute_precision.tf32), ctx["args"].peak_tflops)
    median, best = statistics.median(times), min(times)
    row = {"backend": backend, "attn_backend_resolved": resolve_backend(backend, device), "compile": compile_}
    row |= {"activation_checkpointing": checkpointing, "dtype": dtype, "batch_size": images}
    row |= {"s_iter_median": median, "s_iter_best": best, "img_s": images / median, "img_s_best": images / best}
    row |= {**memory_fields(device), "loss_last": loss, "times_s": times, **flops}
    for suffix, key in (("", "executed_flops"), ("_nominal", "nominal_flops")):
        achieved = flops[key] / median / 1e12 if flops[key] is not None else None
        row[f"achieved_tflops{suffix}"] = achieved
        row[f"mfu{suffix}"] = achieved / peak if peak and achieved is not None else None
    row["peak_tflops"], row["peak_tflops_source"] = peak, peak_source
    del trainer, data
    release(device)
    return row


def failed_step_row(combo: tuple[str, str, str], error: BaseException, device: torch.device) -> dict:
    """The row of a combination that could not be timed (out of memory, a kernel or compiler error)."""
    backend, compile_, checkpointing = combo
    row = {"backend": backend, "compile": compile_, "activation_checkpointing": checkpointing}
    row["error"] = describe_error(error)
    if device.type == "cuda":
        row |= memory_fields(device)  # how far it got
    release(device)
    return row


def bench_step(base, args: argparse.Namespace, device: torch.device, progress=None) -> tuple[list[dict], dict]:
    backends, skipped = usable_backends(args.backends or [str(base.student.attn_backend)], device, "benchmark_train")
    compiles = args.compile or [str(base.train.compile).lower()]
    checkpointing = args.checkpointing or [str(base.train.activation_checkpointing or "off")]
    batches, source = make_batches(base, args.num_batches, args.batch_source)
    rows = []
    with tempfile.TemporaryDirectory(prefix="benchmark_train_") as tmp:
        ctx = {"args": args, "device": device, "batches": batches, "tmp": tmp, "flops": {}}
        for combo in ((b, c, a) for b in backends for c in compiles for a in checkpointing):
            try:
                rows.append(bench_step_row(base, combo, ctx))
            except Exception as error:  # one failing combination must not cost the others (or their JSON)
                rows.append(failed_step_row(combo, error, device))
                print(f"row {combo} failed: {rows[-1]['error']}", flush=True)
            else:
                print_row(rows[-1], STEP_COLUMNS, header=sum("error" not in r for r in rows) == 1)
            if progress is not None:
                progress(rows)
    gpu_augmentation = bool(select(base, "train.gpu_augmentation", False))  # applied inside Trainer.step
    extra = {"batch_source": source, "distinct_batches": len(batches), "gpu_augmentation": gpu_augmentation}
    return rows, extra | {"skipped_backends": skipped}


# ---------------------------------------------------------------------------------------------- data mode
def load_gpu_augmentation(cfg):
    """The GPU augmentation callable when ``train.gpu_augmentation`` is set, else None."""
    if not select(cfg, "train.gpu_augmentation", False):
        return None
    errors = []
    for name in GPU_AUGMENTATION_MODULES:
        try:
            builder = importlib.import_module(name).build_gpu_augmentation
        except (ImportError, AttributeError) as error:
            errors.append(f"{name}: {error}")
            continue
        return builder(cfg)
    raise SystemExit(
        "benchmark_train: train.gpu_augmentation=true but build_gpu_augmentation cannot be imported "
        f"({'; '.join(errors)}); run without it to measure the CPU augmentation path"
    )


def bench_data_row(base, workers: int, gpu_augment, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = OmegaConf.merge(base, {"train": {"num_workers": workers}})
    batch_size = int(cfg.train.batch_size_per_gpu)
    stream = iter(build_train_loader(cfg, build_train_dataset(cfg)))
    times = []
    for i in range(max(args.warmup, workers) + args.iters):
        synchronize(device)
        start = time.perf_counter()
        batch = next(stream)
        batch.pop("skipped_images", None)
        if gpu_augment is not None:
            batch = gpu_augment(batch_to_device(batch, device))
        synchronize(device)
        if i >= max(args.warmup, workers):
            times.append(time.perf_counter() - start)
    del stream
    total = sum(times)
    row = {"num_workers": workers, "batch_size": batch_size, "batches": len(times), "seconds": total}
    row |= {"img_s": batch_size * len(times) / total, "s_batch_median": statistics.median(times)}
    row |= {"gpu_augmentation": gpu_augment is not None, "times_s": times}
    return row


def bench_data(base, args: argparse.Namespace, device: torch.device, progress=None) -> tuple[list[dict], dict]:
    gpu_augment = load_gpu_augmentation(base)
    rows = []
    for workers in args.num_workers or [int(base.train.num_workers)]:
        try:
            rows.append(bench_data_row(base, workers, gpu_augment, args, device))
        except Exception as error:
            rows.append({"num_workers": workers, "error": describe_error(error)})
            print(f"row num_workers={workers} failed: {rows[-1]['error']}", flush=True)
        else:
            print_row(rows[-1], DATA_COLUMNS, header=sum("error" not in r for r in rows) == 1)
        if progress is not None:
            progress(rows)
    return rows, {"dataset_path": str(base.train.dataset_path)}


# ---------------------------------------------------------------------------------------------- report
STEP_COLUMNS = (
    ("backend", "backend"), ("compile", "compile"), ("activation_checkpointing", "ckpt"), ("dtype", "dtype"),
    ("batch_size", "batch"), ("s_iter_median", "s/iter"), ("s_iter_best", "best s/iter"), ("img_s", "img/s"),
    ("peak_mem_mib", "peak MiB"), ("executed_flops", "exec GFLOP"), ("nominal_flops", "nominal GFLOP"),
    ("achieved_tflops", "TFLOP/s"), ("mfu", "MFU"), ("mfu_nominal", "MFU nominal"),
)  # fmt: skip
DATA_COLUMNS = (
    ("num_workers", "workers"), ("batch_size", "batch"), ("batches", "batches"), ("img_s", "img/s"),
    ("s_batch_median", "s/batch"), ("gpu_augmentation", "gpu aug"),
)  # fmt: skip


def cell(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key.endswith("_flops"):
        return f"{value / 1e9:.4g}"
    if key.startswith("mfu"):
        return f"{100 * value:.1f}%"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_row(row: dict, columns: tuple, header: bool) -> None:
    widths = [max(len(title), 9) for _, title in columns]
    if header:
        print(" | ".join(f"{title:>{w}}" for (_, title), w in zip(columns, widths)))
    print(" | ".join(f"{cell(key, row[key]):>{w}}" for (key, _), w in zip(columns, widths)), flush=True)


def environment(args: argparse.Namespace, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    report = {"mode": args.mode, "config": args.config, "overrides": list(args.opts)}
    report |= run_environment(device, __file__, args.argv)
    report |= {"warmup": args.warmup, "iters": args.iters, "peak_mem_note": CUDA_MEM_NOTE if cuda else CPU_MEM_NOTE}
    return report


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_benchmark_config(args)
    device = resolve_device(base.train.device)
    enable_tf32(device, bool(base.compute_precision.tf32))
    report = environment(args, device)
    print(f"{report['device']} | torch {report['torch']} | {args.config} | mode {args.mode}")

    def progress(rows: list[dict]) -> None:  # the rows so far survive a run killed at a time limit
        write_report(args.output, {**report, "rows": rows, "complete": False}, quiet=True)

    if args.mode == "step":
        report["rows"], extra = bench_step(base, args, device, progress)
        report |= {"flops_note": FLOPS_NOTE, "mfu_note": MFU_NOTE, **extra}
    else:
        report["rows"], extra = bench_data(base, args, device, progress)
        report |= extra
    report["complete"] = True
    report["failed_rows"] = sum("error" in row for row in report["rows"])
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failed_rows"] else 0)
