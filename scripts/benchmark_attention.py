#!/usr/bin/env python
"""Nested (global + local crops) attention per backend: time and peak memory, forward and backward.

One row per (arch, batch, dtype, backend, mode). The inputs are those of one student block of a
DINOv2 step: ``2 * batch`` global crops of ``1 + (global_size / patch)^2`` tokens and
``n_local * batch`` local crops of ``1 + (local_size / patch)^2`` tokens, concatenated, with the
arch's heads and head width. This is the number ``auto`` is chosen from (``AUTO_PREFERENCE`` in
dinov2/ops/attention.py); scripts/benchmark_train.py measures whole training steps.

A row that fails (out of memory, a kernel that does not run on the device) records its ``error`` and
the next row still runs; the JSON is rewritten atomically after every row (``complete: false`` until
the end) and the script exits with status 1 when a row failed. ``xformers`` is skipped up front, with
its reason under ``skipped_backends``, unless xFormers imports and the device is CUDA; a skipped
backend is not a failed row, and a run left with no backend stops with that reason.

Example (the CPU figures in docs/performance.md):

    python scripts/benchmark_attention.py --archs vit_small vit_base --batch-sizes 8 --warmup 2 --iters 7
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dinov2.models.vision_transformer import ARCHS
from dinov2.ops import nested_attention, xformers_available
from dinov2.ops.attention import BACKENDS
from dinov2.utils.benchmark import environment, release, usable_backends, write_report
from dinov2.utils.logging import describe_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("forward", "forward_backward")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["vit_small"], choices=sorted(ARCHS))
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--n-local", type=int, default=8)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[8])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument(
        "--backends", nargs="+", choices=BACKENDS, help="default: math sdpa varlen (+ xformers on CUDA when installed)"
    )
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", type=Path, default=Path("benchmark_attention.json"))
    args = p.parse_args(argv)
    if args.warmup < 0 or args.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    if min(args.batch_sizes) < 1 or args.n_local < 0:
        p.error("--batch-sizes must be >= 1 and --n-local >= 0")
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    args.device = torch.device("cpu" if name == "auto" else name)
    cuda = args.device.type == "cuda"
    args.dtypes = args.dtypes or (["bf16"] if cuda else ["fp32"])
    default = ["math", "sdpa", "varlen"] + (["xformers"] if cuda and xformers_available() else [])
    args.backends = args.backends or default
    return args


def group_shapes(batch: int, args: argparse.Namespace) -> list[tuple[int, int]]:
    tokens = [1 + (size // args.patch_size) ** 2 for size in (args.global_size, args.local_size)]
    return [(2 * batch, tokens[0]), (args.n_local * batch, tokens[1])]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_backend(shapes, heads: int, dim: int, dtype, backend: str, mode: str, args) -> dict:
    if args.device.type == "cuda":  # before the inputs: a row that fails to allocate them reports its own peak
        torch.cuda.reset_peak_memory_stats(args.device)
    total = sum(b * n for b, n in shapes)
    backward = mode == "forward_backward"
    q, k, v = (
        torch.randn(total, heads, dim, device=args.device, dtype=dtype, requires_grad=backward) for _ in range(3)
    )
    grad = torch.randn(total, heads, dim, device=args.device, dtype=dtype)

    def step():
        out = nested_attention(q, k, v, shapes, backend=backend)
        if backward:
            torch.autograd.grad(out, (q, k, v), grad)

    times = []
    for i in range(args.warmup + args.iters):
        _sync(args.device)
        start = time.perf_counter()
        step()
        _sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(args.device) / 2**20 if args.device.type == "cuda" else None
    return {"median_ms": 1e3 * statistics.median(times), "best_ms": 1e3 * min(times), "peak_mem_mib": peak}


def bench_row(key: dict, heads: int, dim: int, args: argparse.Namespace) -> dict:
    """One row: ``key`` (arch, batch, groups, dtype, mode, backend) with its timing, or with ``error``."""
    try:
        result = time_backend(key["groups"], heads, dim, DTYPES[key["dtype"]], key["backend"], key["mode"], args)
    except Exception as error:  # one failing backend must not cost the other rows (or their JSON)
        row = {**key, "error": describe_error(error)}
        if args.device.type == "cuda":
            row["peak_mem_mib"] = torch.cuda.max_memory_allocated(args.device) / 2**20  # how far it got
        release(args.device)
        return row
    return {**key, **result}


def run(args: argparse.Namespace, backends: list[str], progress=None) -> list[dict]:
    """Every (arch, batch, dtype, mode, backend) row; ``progress(rows)`` after each."""
    rows = []
    for arch in args.archs:
        with torch.device("meta"):  # only the attention geometry is needed
            attn = ARCHS[arch](patch_size=args.patch_size, block_chunks=0).blocks[0].attn
        heads, dim = attn.num_heads, attn.head_dim
        for batch in args.batch_sizes:
            shapes = group_shapes(batch, args)
            for dtype_name in args.dtypes:
                for mode in args.modes:
                    for backend in backends:
                        key = {"arch": arch, "batch": batch, "groups": shapes, "dtype": dtype_name, "mode": mode}
                        rows.append(bench_row({**key, "backend": backend}, heads, dim, args))
                        print_row(rows[-1], header=sum("error" not in r for r in rows) == 1)
                        if progress is not None:
                            progress(rows)
    return rows


def print_row(row: dict, header: bool) -> None:
    columns = ("arch", "batch", "dtype", "mode", "backend", "median_ms", "best_ms", "peak_mem_mib")
    if "error" in row:
        print(f"row {row['arch']} batch {row['batch']} {row['dtype']} {row['mode']} {row['backend']} failed: "
              f"{row['error']}", flush=True)  # fmt: skip
        return
    if header:
        print(" | ".join(f"{c:>16}" for c in columns))
    cells = [f"{row[c]:16.2f}" if isinstance(row[c], float) else f"{'n/a' if row[c] is None else row[c]!s:>16}"
             for c in columns]  # fmt: skip
    print(" | ".join(cells), flush=True)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; the report written to ``--output`` (``failed_rows``: rows with an ``error``)."""
    args = parse_args(argv)
    backends, skipped = usable_backends(args.backends, args.device, "benchmark_attention")
    command = list(sys.argv[1:] if argv is None else argv)
    report = {"environment": environment(args.device, __file__, command), "skipped_backends": skipped}

    def progress(rows: list[dict]) -> None:  # the rows so far survive a run killed at a time limit
        write_report(args.output, {**report, "rows": rows, "complete": False}, quiet=True)

    report["rows"] = run(args, backends, progress)
    report["complete"] = True
    report["failed_rows"] = sum("error" in row for row in report["rows"])
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failed_rows"] else 0)
