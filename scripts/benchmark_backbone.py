#!/usr/bin/env python
"""Throughput and peak memory of the DINOv2 backbone, optionally against transformers' Dinov2Model.

One row per (arch, resolution, batch size, dtype, attention backend, mode). Images/s is the batch
size over the median time of the timed iterations (CUDA is synchronised around every iteration);
the JSON also keeps every iteration's time and the best-iteration figures, which are the steadier
ones on a CPU shared with other processes.
With ``--compare-hf`` the Hugging Face model is loaded with the *same* weights (key mapping below,
checked once by comparing outputs) and timed in alternation with ours, so that load from other
processes hits both equally.

Example (CPU, the first row quoted in docs/performance.md):

    python scripts/benchmark_backbone.py --archs vit_small --resolutions 224 --batch-sizes 32 \
        --dtypes fp32 --backends sdpa --modes forward --compare-hf --warmup 3 --iters 15
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dinov2.models.vision_transformer import ARCHS
from dinov2.utils.benchmark import environment as run_environment
from dinov2.utils.benchmark import release, usable_backends, write_report
from dinov2.utils.logging import describe_error

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = ("math", "sdpa", "xformers", "auto")
MODES = ("forward", "forward_backward")
CPU_MEM_NOTE = "CPU peak_mem is the process peak RSS (ru_maxrss) so far: monotone over rows, shared by ours and HF"


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=["vit_small"], choices=sorted(ARCHS))
    p.add_argument("--patch-size", type=int, default=14)
    p.add_argument("--img-size", type=int, default=518, help="stored position grid (518 for the released models)")
    p.add_argument("--resolutions", nargs="+", type=int, default=[224])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, help="default: sdpa on CPU, sdpa xformers on CUDA")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--compare-hf", action=argparse.BooleanOptionalAction, help="default: on for CPU, off for CUDA")
    p.add_argument("--output", type=Path, help="JSON path (default: <output-dir>/benchmark_backbone.json)")
    p.add_argument("--output-dir", type=Path, default=Path("."))
    args = p.parse_args(argv)
    if args.warmup < 0 or args.iters < 1:
        p.error("--warmup must be >= 0 and --iters >= 1")
    for flag, values in (("--batch-sizes", args.batch_sizes), ("--resolutions", args.resolutions)):
        if min(values) < 1:
            p.error(f"{flag} must be >= 1, got {min(values)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else None
    args.device = device or torch.device(args.device)
    on_cuda = args.device.type == "cuda"
    args.dtypes = args.dtypes or (["bf16"] if on_cuda else ["fp32"])
    args.backends = args.backends or (["sdpa", "xformers"] if on_cuda else ["sdpa"])
    if args.compare_hf is None:
        args.compare_hf = not on_cuda
    args.backends, args.skipped_backends = usable_backends(args.backends, args.device, "benchmark_backbone")
    args.output = args.output or args.output_dir / "benchmark_backbone.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


# ---------------------------------------------------------------------------------------------- models
def build_ours(arch: str, args: argparse.Namespace) -> torch.nn.Module:
    ffn = "swiglufused" if arch == "vit_giant2" else "mlp"
    model = ARCHS[arch](
        patch_size=args.patch_size, img_size=args.img_size, init_values=1.0, ffn_layer=ffn, block_chunks=0
    )
    return model.to(args.device)


def hf_config(model: torch.nn.Module, args: argparse.Namespace):
    from transformers import Dinov2Config

    first = next(iter(model.iter_blocks()))
    return Dinov2Config(
        hidden_size=model.embed_dim,
        num_hidden_layers=model.n_blocks,
        num_attention_heads=model.num_heads,
        mlp_ratio=4,
        image_size=args.img_size,
        patch_size=args.patch_size,
        layerscale_value=1.0,
        use_swiglu_ffn=hasattr(first.mlp, "w12"),
    )


def hf_names(hf_keys: set[str]) -> dict[str, str]:
    """Sub-module names of one HF layer: transformers >= 5 uses q_proj/.../o_proj, older releases query/key/value."""
    if "encoder.layer.0.attention.q_proj.weight" in hf_keys:
        names = {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "o": "attention.o_proj"}
        return names | {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    names = {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value"}
    return names | {"o": "attention.output.dense", "w12": "mlp.weights_in", "down": "mlp.weights_out"}


def map_block_key(rest: str, tensor: torch.Tensor, names: dict[str, str]) -> dict[str, torch.Tensor]:
    """One key of our block ``blocks.{i}.<rest>`` -> HF layer keys (relative to ``encoder.layer.{i}.``)."""
    module, _, leaf = rest.rpartition(".")
    if module == "attn.qkv":
        return {f"{names[n]}.{leaf}": t for n, t in zip("qkv", tensor.chunk(3, dim=0))}
    if module == "mlp.w12" and "gate" in names:
        gate, up = tensor.chunk(2, dim=0)  # ours: silu(first half) * second half
        return {f"{names['gate']}.{leaf}": gate, f"{names['up']}.{leaf}": up}
    simple = {"attn.proj": names["o"], "mlp.w12": names.get("w12"), "mlp.w3": names["down"]}
    simple |= {"ls1": "layer_scale1", "ls2": "layer_scale2"}
    leaf = "lambda1" if module in ("ls1", "ls2") else leaf
    return {f"{simple.get(module, module)}.{leaf}": tensor}


def to_hf_state_dict(state: dict[str, torch.Tensor], hf_keys: set[str]) -> dict[str, torch.Tensor]:
    """Our (official DINOv2) key layout -> transformers' Dinov2Model layout."""
    names = hf_names(hf_keys)
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token"}
    top |= {"pos_embed": "embeddings.position_embeddings", "norm.weight": "layernorm.weight"}
    top |= {"norm.bias": "layernorm.bias", "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight"}
    top |= {"patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias"}
    out = {}
    for key, tensor in state.items():
        if key in top:
            out[top[key]] = tensor
            continue
        _, index, rest = key.split(".", 2)  # blocks.{i}.<rest>
        out |= {f"encoder.layer.{index}.{k}": t for k, t in map_block_key(rest, tensor, names).items()}
    return out


def build_hf(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module:
    """transformers' Dinov2Model (default attention implementation) holding our model's weights."""
    from transformers import Dinov2Model

    hf = Dinov2Model(hf_config(model, args))
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), set(hf.state_dict())), strict=True)
    return hf.to(args.device)


@torch.inference_mode()
def max_cls_difference(model: torch.nn.Module, hf: torch.nn.Module, args: argparse.Namespace) -> float:
    """Sanity check of the weight mapping at the stored grid size (no position interpolation on either side)."""
    model.eval()
    hf.eval()
    x = torch.randn(2, 3, args.img_size, args.img_size, device=args.device)
    return (model(x) - hf(pixel_values=x).pooler_output).abs().max().item()


# ---------------------------------------------------------------------------------------------- timing
def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_step(model: torch.nn.Module, x: torch.Tensor, mode: str, dtype: torch.dtype, hf: bool) -> Callable[[], None]:
    """One iteration: inference-mode forward, or forward + backward of a scalar loss on the CLS output."""
    model.train(mode == "forward_backward")

    def cls(out):
        return out.pooler_output if hf else out

    def run(inputs):
        return model(pixel_values=inputs) if hf else model(inputs)

    def forward():
        with torch.inference_mode(), autocast(x.device, dtype):
            cls(run(x))

    def forward_backward():
        model.zero_grad(set_to_none=True)
        with autocast(x.device, dtype):
            loss = cls(run(x)).float().mean()
        loss.backward()

    return forward if mode == "forward" else forward_backward


def timed_call(step: Callable[[], None], device: torch.device) -> tuple[float, int]:
    """Seconds for one step, and the CUDA peak bytes allocated during it (0 on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, torch.cuda.max_memory_allocated(device)
    return time.perf_counter() - start, 0


def time_steps(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, dict]:
    """Run the steps round-robin (warmup, then timed); median seconds and peak memory per step."""
    times = {name: [] for name in steps}
    peaks = dict.fromkeys(steps, 0)
    for i in range(args.warmup + args.iters):
        for name, step in steps.items():
            seconds, peak = timed_call(step, args.device)
            peaks[name] = max(peaks[name], peak)
            if i >= args.warmup:
                times[name].append(seconds)
    return {
        name: {"median_s": statistics.median(t), "min_s": min(t), "times_s": t, "peak_bytes": peaks[name]}
        for name, t in times.items()
    }


def peak_mem_mib(stats: dict, device: torch.device) -> float:
    if device.type == "cuda":
        return stats["peak_bytes"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------- rows
def bench_row(models: dict[str, torch.nn.Module], cfg: dict, args: argparse.Namespace) -> dict:
    dtype = DTYPES[cfg["dtype"]]
    x = torch.randn(cfg["batch"], 3, cfg["res"], cfg["res"], device=args.device)
    models["ours"].set_attn_backend(cfg["backend"])
    steps = {name: make_step(m, x, cfg["mode"], dtype, hf=name == "hf") for name, m in models.items()}
    stats = time_steps(steps, args)
    row = dict(cfg)
    for name, s in stats.items():
        row[f"{name}_img_s"] = cfg["batch"] / s["median_s"]
        row[f"{name}_ms_iter"] = 1e3 * s["median_s"]
        row[f"{name}_best_img_s"] = cfg["batch"] / s["min_s"]
        row[f"{name}_peak_mem_mib"] = peak_mem_mib(s, args.device)
        row[f"{name}_times_s"] = s["times_s"]
    if "hf" in stats:
        row["ratio_ours_over_hf"] = row["ours_img_s"] / row["hf_img_s"]
        row["ratio_best_ours_over_hf"] = row["ours_best_img_s"] / row["hf_best_img_s"]
    return row


def configs(arch: str, args: argparse.Namespace):
    for res in args.resolutions:
        for batch in args.batch_sizes:
            for dtype in args.dtypes:
                for backend in args.backends:
                    for mode in args.modes:
                        yield {
                            "arch": arch,
                            "res": res,
                            "batch": batch,
                            "dtype": dtype,
                            "backend": backend,
                            "mode": mode,
                        }


def bench_arch(arch: str, args: argparse.Namespace, progress=None) -> list[dict]:
    """Every row of ``arch``. A row that fails (out of memory, a kernel that does not run on the
    device) records its ``error`` and the next row still runs; ``progress(rows)`` after each row."""
    models = {"ours": build_ours(arch, args)}
    check = {}
    if args.compare_hf:
        models["hf"] = build_hf(models["ours"], args)
        check = {"hf_attn_implementation": models["hf"].config._attn_implementation}
        check["max_abs_cls_diff_vs_hf"] = max_cls_difference(models["ours"], models["hf"], args)
    rows = []
    for cfg in configs(arch, args):
        try:
            rows.append(bench_row(models, cfg, args) | check)
        except Exception as error:  # one failing row must not cost the others (or their JSON)
            rows.append(cfg | {"error": describe_error(error)})
            print(f"row {cfg} failed: {rows[-1]['error']}", flush=True)
        else:
            print_row(rows[-1], header=sum("error" not in r for r in rows) == 1)
        if progress is not None:
            progress(rows)
    del models
    release(args.device)
    return rows


# ---------------------------------------------------------------------------------------------- report
COLUMNS = ("arch", "res", "batch", "dtype", "backend", "mode", "ours_img_s", "ours_ms_iter", "ours_peak_mem_mib")
HF_COLUMNS = ("hf_img_s", "hf_ms_iter", "ratio_ours_over_hf", "ratio_best_ours_over_hf")


def print_row(row: dict, header: bool) -> None:
    cols = COLUMNS + (HF_COLUMNS if "hf_img_s" in row else ())
    cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
    if header:
        print(" | ".join(f"{c:>14}" for c in cols))
    print(" | ".join(f"{c:>14}" for c in cells), flush=True)


def environment(args: argparse.Namespace) -> dict:
    cuda = args.device.type == "cuda"
    return {
        **run_environment(args.device, __file__, args.argv),
        "transformers": transformers_version(),
        "skipped_backends": args.skipped_backends,
        "peak_mem_note": "torch.cuda.max_memory_allocated per iteration" if cuda else CPU_MEM_NOTE,
    }


def transformers_version() -> str | None:
    with contextlib.suppress(ImportError):
        import transformers

        return transformers.__version__
    return None


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; the JSON is rewritten after every row (``complete: false`` until the end, so
    a run stopped at a time limit keeps its rows); ``failed_rows`` counts rows with an ``error``."""
    args = resolve_defaults(parse_args(argv))
    report = environment(args)
    print(f"{report['device']} | torch {report['torch']} | threads {report['num_threads']}")
    done: list[dict] = []

    def progress(rows: list[dict]) -> None:
        write_report(args.output, {**report, "rows": [*done, *rows], "complete": False}, quiet=True)

    for arch in args.archs:
        try:
            done += bench_arch(arch, args, progress)
        except Exception as error:  # building the model (or its HF copy) failed: the next arch still runs
            done.append({"arch": arch, "error": describe_error(error)})
            print(f"arch {arch} failed: {done[-1]['error']}", flush=True)
    report |= {"rows": done, "complete": True, "failed_rows": sum("error" in row for row in done)}
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    sys.exit(1 if main()["failed_rows"] else 0)
