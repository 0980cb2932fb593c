#!/usr/bin/env python
"""Nested (global + local crops) attention per backend: time and peak memory, forward and backward.

One row per (arch, batch, dtype, backend, mode). The inputs are those of one student block of a
DINOv2 step: ``2 * batch`` global crops of ``1 + (global_size / patch)^2`` tokens and
``n_local * batch`` local crops of ``1 + (local_size / patch)^2`` tokens, concatenated, with the
arch's heads and head width. This is the number ``auto`` is chosen from (``AUTO_PREFERENCE`` in
dinov2/ops/attention.py); scripts/benchmark_train.py measures whole training steps.

Example (the CPU figures in docs/performance.md):

    python scripts/benchmark_attention.py --archs vit_small --batch-sizes 8 --iters 10
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from dinov2.models.vision_transformer import ARCHS
from dinov2.ops import nested_attention, xformers_available
from dinov2.utils.benchmark import environment, write_report

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
    p.add_argument("--backends", nargs="+", help="default: math sdpa varlen (+ xformers on CUDA when installed)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--output", type=Path, default=Path("benchmark_attention.json"))
    args = p.parse_args(argv)
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
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    for i in range(args.warmup + args.iters):
        _sync(args.device)
        start = time.perf_counter()
        step()
        _sync(args.device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(args.device) / 2**20 if args.device.type == "cuda" else None
    return {"median_ms": 1e3 * statistics.median(times), "best_ms": 1e3 * min(times), "peak_mem_mib": peak}


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for arch in args.archs:
        with torch.device("meta"):  # only the attention geometry is needed
            attn = ARCHS[arch](patch_size=args.patch_size, block_chunks=0).blocks[0].attn
        heads, dim = attn.num_heads, attn.head_dim
        for batch in args.batch_sizes:
            shapes = group_shapes(batch, args)
            for dtype_name in args.dtypes:
                for mode in args.modes:
                    for backend in args.backends:
                        result = time_backend(shapes, heads, dim, DTYPES[dtype_name], backend, mode, args)
                        row = {"arch": arch, "batch": batch, "groups": shapes, "dtype": dtype_name, "mode": mode,
                               "backend": backend, **result}  # fmt: skip
                        rows.append(row)
                        print_row(row, header=len(rows) == 1)
    return rows


def print_row(row: dict, header: bool) -> None:
    columns = ("arch", "batch", "dtype", "mode", "backend", "median_ms", "best_ms", "peak_mem_mib")
    if header:
        print(" | ".join(f"{c:>16}" for c in columns))
    cells = [f"{row[c]:16.2f}" if isinstance(row[c], float) else f"{'n/a' if row[c] is None else row[c]!s:>16}"
             for c in columns]  # fmt: skip
    print(" | ".join(cells))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    rows = run(args)
    write_report(args.output, {"environment": environment(args.device), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
