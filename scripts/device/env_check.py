#!/usr/bin/env python
"""What the GPU figures of a device run stand on: software versions, the GPU, which attention backend
``auto`` resolves to, and the two ceilings measured on this card (bf16 matrix product, device copy).

MFU in docs/performance.md is quoted against the data-sheet peak (989 TFLOP/s dense bf16 for an
H100/H200 SXM); the measured matmul rate printed here says how much of that any PyTorch program can
reach on the card as found. Inputs are random (never zeros); each figure is the median of CUDA-event
timings after warm-up. On a machine without CUDA only the software part is reported.

    python scripts/device/env_check.py --output runs/device/env.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import statistics
import subprocess
from pathlib import Path

import torch

from dinov2.ops import xformers_available
from dinov2.ops.attention import resolve_backend
from dinov2.ops.xformers import attention_failure, xformers_import_error
from dinov2.utils.benchmark import environment, write_report
from dinov2.utils.logging import describe_error

PACKAGES = ("torch", "torchvision", "xformers", "omegaconf", "numpy", "triton", "faiss-cpu", "faiss-gpu")


def versions() -> dict[str, str | None]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def cuda_ms(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_tflops(device: torch.device, size: int) -> float:
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    return 2 * size**3 / (cuda_ms(lambda: torch.mm(a, b), warmup=3, iters=10) * 1e-3) / 1e12


def copy_gb_s(device: torch.device, mib: int) -> float:
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (cuda_ms(lambda: dst.copy_(src), warmup=3, iters=20) * 1e-3) / 1e9  # read + write


def ceilings(device: torch.device, size: int, copy_mib: int) -> dict[str, float]:
    result = {"bf16_matmul_tflops": matmul_tflops(device, size), "matmul_size": size}
    result |= {"copy_gb_s": copy_gb_s(device, copy_mib), "copy_mib": copy_mib}
    torch.cuda.empty_cache()
    return result


def gpu_properties(device: torch.device) -> dict:
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "memory_gib": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count}  # fmt: skip


def nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True)
    return out.stdout.strip() or out.stderr.strip()


def main(argv: list[str] | None = None) -> dict:
    """The report, written to ``--output`` after each part: software, then the GPU and its ceilings,
    then xFormers' probe and what ``auto`` resolves to. The probe runs xFormers' kernels, which an
    xFormers built for another torch or CUDA may crash in, so it comes last and what came before is
    already on disk; a part that raises is recorded under ``errors`` and the next part still runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--copy-mib", type=int, default=4096)
    p.add_argument("--output", type=Path, default=Path("runs/device/env.json"))
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    report = {**environment(device), "versions": versions(), "cuda_available": cuda, "complete": False}
    report["torch_cuda"] = torch.version.cuda
    report["xformers_importable"] = xformers_available()
    report["xformers_import_error"] = xformers_import_error()  # why not, e.g. a CUDA runtime it lacks
    write_report(args.output, report, quiet=True)

    def part(key: str, compute) -> None:
        try:
            report[key] = compute()
        except Exception as error:  # recorded; the next part still runs
            report.setdefault("errors", {})[key] = describe_error(error)
        write_report(args.output, report, quiet=True)

    if cuda:
        part("gpu", lambda: gpu_properties(device))
        part("nvidia_smi", nvidia_smi)
        part("ceilings", lambda: ceilings(device, args.matmul_size, args.copy_mib))
        part("xformers_attention_failure", lambda: attention_failure(f"cuda:{torch.cuda.current_device()}"))
    part("auto_backend", lambda: {n: resolve_backend("auto", device, n == "nested") for n in ("dense", "nested")})
    report["complete"] = True
    keys = ("device", "torch", "torch_cuda", "versions", "xformers_importable", "xformers_import_error")
    keys += ("xformers_attention_failure",)
    for key in (*keys, "auto_backend", "ceilings", "errors"):
        if key in report:
            print(f"{key:>20}: {report[key]}")
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    main()
