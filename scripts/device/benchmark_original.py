#!/usr/bin/env python
"""The original DINOv2 implementation's training step, timed as scripts/benchmark_train.py times ours,
for issue 8's last goal: >= 1.5x its images/s on the same GPU at no more memory.

Its code is not in this repository. ``--source`` names a copy: a wheel, or a folder holding one or
holding its ``dinov2`` package. PyPI has one as ``dinov2==0.0.1.dev2`` (an upload of Meta's code by a
third party, licensed CC-BY-NC); scripts/device/fetch_wheels.sh puts it in ``.whl/original/``. Both
packages are named ``dinov2``, so this script imports nothing of ours: it puts the copy first on
``sys.path``, drops every other folder that holds a ``dinov2``, and stops if the import lands elsewhere.

That wheel is Meta's first public release (commit fc49f49d, April 2023): its training files are
byte for byte those of facebookresearch/dinov2 at that commit. One later change of Meta's touches
speed: the release forces xFormers' FlashAttention op for the student's nested crops, later versions
let xFormers choose. ``--xformers-op auto`` (the default) calls it the later way, ``release`` as released.

What runs is the original's own code, otherwise unchanged:
- its ``ssl_default_config.yaml`` with its ``vitl16_short`` preset (batch 64 per GPU, 4 block chunks)
  and any ``key=value`` overrides;
- ``SSLMetaArch`` on the device, wrapped by its ``prepare_for_distributed_training`` (FSDP in one
  process, fp16 parameters with its grad scaler unless ``--precision bf16``);
- batches from its ``MaskingGenerator`` and ``collate_data_and_cast`` over random crops (fp16 inputs,
  as its train loop casts them);
- the body of its ``do_train`` loop: ``apply_optim_scheduler``, ``zero_grad``, ``forward_backward``,
  unscale and clip per student module, scaler step, ``update_teacher``.

It was written for torch 2.0 (it pins ``torch==2.0.0``), whose FSDP had two attributes that later
torch releases dropped (facebookresearch/dinov2#265). :func:`torch20_fsdp_adapters` puts them back,
each meaning what it meant in 2.0: ``_handles`` (the list of an instance's flat-parameter handles, now
one ``_handle``) and ``_streams`` (the CUDA streams, which the original reads from the teacher and
assigns to the other three roots after its first step, so that all four share them). And
``_reshard`` takes 2.0's list arguments again.

Timing: CUDA synchronised around each step, median and best of ``--iters`` after ``--warmup`` steps;
``img_s`` counts images (not crops) per step; ``peak_mem_mib`` is ``torch.cuda.max_memory_allocated``
and ``peak_reserved_mib`` ``torch.cuda.max_memory_reserved`` over warm-up and timed steps, reset once
the model is built (on CPU the peak resident memory, and no reserved figure) -- all as in
benchmark_train.py. The JSON (``rows`` with one row) is written atomically.

``--cpu-rehearsal`` runs the same code on CPU with a tiny model, for this machine: xFormers has no
CPU kernels, so its three ops get plain-torch stand-ins, ``Tensor.cuda`` returns the tensor, and FSDP
is given a CPU device. It checks this script, not the original's speed.

    python3 scripts/device/benchmark_original.py --source .whl/original --output original.json   # on a GPU
    python scripts/device/benchmark_original.py --source /tmp/orig --cpu-rehearsal --output /tmp/o.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# The original's vitl16_short.yaml: its defaults are ViT-L/16 on ImageNet-1k; the preset sets these.
PRESETS = {"vitl16_short": ["train.batch_size_per_gpu=64", "student.block_chunks=4"]}
# --cpu-rehearsal: a model small enough for a CPU, through the same code paths (nested crops, both
# heads, masking, FSDP with its block-chunk wrapping, the grad scaler unless --precision bf16).
REHEARSAL = [
    "student.arch=vit_small", "student.patch_size=16", "crops.global_crops_size=32", "crops.local_crops_size=16",
    "crops.local_crops_number=2", "dino.head_n_prototypes=256", "dino.head_hidden_dim=64",
    "dino.head_bottleneck_dim=32", "ibot.head_n_prototypes=256", "ibot.head_hidden_dim=64",
    "ibot.head_bottleneck_dim=32",
]  # fmt: skip
MODULES = ("backbone", "dino_head", "ibot_head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True, help="the original's wheel, or a folder with it")
    p.add_argument("--config", choices=sorted(PRESETS), default="vitl16_short")
    p.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    p.add_argument("--precision", choices=["native", "bf16"], default="native",
                   help="native: the config's (fp16 and a grad scaler); bf16: bf16 parameters, no scaler")  # fmt: skip
    p.add_argument("--xformers-op", choices=["auto", "release"], default="auto",
                   help="auto: xFormers picks the nested attention kernel, as every later version of Meta's code "
                   "lets it; release: the April 2023 release's forced FlashAttention op")  # fmt: skip
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--num-batches", type=int, default=2, help="distinct batches, cycled")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-rehearsal", action="store_true", help="a tiny model on CPU with stand-ins for xFormers")
    p.add_argument("--output", type=Path, default=Path("benchmark_original.json"))
    p.add_argument("overrides", nargs="*", help="the original's config keys, key=value")
    args = p.parse_args(argv)
    if args.warmup < 0 or args.iters < 1 or args.num_batches < 1:
        p.error("--warmup must be >= 0, --iters and --num-batches >= 1")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        p.error(f"overrides are key=value: {' '.join(bad)}")
    return args


# ---------------------------------------------------------------------------------------------- source
def source_wheels(source: Path) -> list[Path]:
    """``source`` itself, or the ``dinov2-*.whl`` files in the folder it names."""
    return sorted(source.glob("dinov2-*.whl")) if source.is_dir() else [source]


def locate_package(source: Path, scratch: Path) -> Path:
    """The folder to put on ``sys.path``: ``source`` itself when it holds ``dinov2/``, else the wheel it
    is (or the one wheel it holds) unpacked into ``scratch``."""
    if source.is_dir() and (source / "dinov2" / "__init__.py").is_file():
        return source
    wheels = source_wheels(source)
    if len(wheels) != 1 or not wheels[0].is_file() or wheels[0].suffix != ".whl":
        raise SystemExit(f"--source {source}: expected a dinov2 wheel, a folder with one, or a folder "
                         f"with a dinov2/ package; found {[w.name for w in wheels] or 'nothing'}")  # fmt: skip
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extractall(scratch)
    return scratch


def import_original(root: Path):
    """Import the ``dinov2`` package under ``root`` and no other."""
    if "dinov2" in sys.modules:
        raise SystemExit(f"a dinov2 package is already imported from {sys.modules['dinov2'].__file__}")
    root = root.resolve()

    def other_dinov2(entry: str) -> bool:
        path = Path(entry or ".").resolve()
        return path != root and (path / "dinov2").is_dir()

    sys.path[:] = [str(root)] + [e for e in sys.path if not other_dinov2(e)]
    import dinov2

    where = Path(dinov2.__file__).resolve()
    if root not in where.parents:
        raise SystemExit(f"imported dinov2 from {where}, not from the original's copy in {root}")
    return dinov2


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


# ---------------------------------------------------------------------------------------------- adapters
def torch20_fsdp_adapters(fsdp_package) -> list[str]:
    """Give torch's FSDP back the two attributes of torch 2.0 that the original uses, and its
    ``dinov2.fsdp`` module 2.0's ``_reshard`` signature. Returns what was adapted."""
    import torch.distributed.fsdp._runtime_utils as runtime
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    adapted = []
    stream_names = ("_default_stream", "_unshard_stream", "_post_backward_stream", "_pre_unshard_stream",
                    "_all_reduce_stream")  # fmt: skip

    def get_streams(self):
        return {name: getattr(self, name, None) for name in stream_names}

    def set_streams(self, streams):  # every state under this root, as 2.0 shared one dict among them
        for state in getattr(self, "_all_fsdp_states", [self]):
            for name, stream in streams.items():
                if stream is not None:
                    object.__setattr__(state, name, stream)

    if not hasattr(FSDP, "_handles"):
        FSDP._handles = property(lambda self: [self._handle] if self._handle is not None else [])
        adapted.append("FSDP._handles = [FSDP._handle]")
    if not hasattr(FSDP, "_streams"):
        FSDP._streams = property(get_streams, set_streams)
        adapted.append("FSDP._streams = the root's CUDA streams, assignable to other roots")
    reshard = runtime._reshard
    if "handles" not in reshard.__code__.co_varnames[: reshard.__code__.co_argcount]:

        def reshard_lists(state, handles, free_unsharded_flat_params):
            for handle, free in zip(handles, free_unsharded_flat_params):
                reshard(state, handle, free)

        fsdp_package._reshard = reshard_lists
        adapted.append("dinov2.fsdp._reshard(state, handles, frees) = _reshard per handle")
    return adapted


def let_xformers_choose(attention_module) -> str:
    """The release passes ``op=fmha.MemoryEfficientAttentionFlashAttentionOp`` for nested crops; Meta's
    later code calls ``memory_efficient_attention(q, k, v, attn_bias=attn_bias)`` and lets xFormers pick
    (FlashAttention 3 on Hopper, where the build has it). Make the release call it that way."""
    call = attention_module.memory_efficient_attention

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None):
        return call(q, k, v, attn_bias=attn_bias)

    attention_module.memory_efficient_attention = memory_efficient_attention
    return "layers.attention: no forced op, xFormers picks the kernel (as Meta's later code)"


def cpu_stand_ins() -> list[str]:
    """--cpu-rehearsal only: what xFormers and CUDA would do, in plain torch on CPU."""
    import torch
    import torch.nn.functional as F
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def memory_efficient_attention(q, k, v, attn_bias=None, op=None):  # q, k, v: (B, N, heads, dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = None if attn_bias is None else attn_bias.materialize((q.shape[-2], k.shape[-2]), dtype=q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

    def scaled_index_add(x, index, source, scaling=None, alpha=1.0):
        return x.index_add(0, index, source * (alpha if scaling is None else scaling * alpha))

    def index_select_cat(sources, indices):
        return torch.cat([s[i].flatten() for s, i in zip(sources, indices)])

    class CpuFSDP(FSDP):  # FSDP's CPU mode: a CPU device, and no broadcast of CPU states
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **(kwargs | {"device_id": torch.device("cpu"), "sync_module_states": False}))

    from dinov2 import fsdp  # the original's, once import_original has run
    from dinov2.layers import attention, block

    attention.memory_efficient_attention = memory_efficient_attention
    block.scaled_index_add = scaled_index_add
    block.index_select_cat = index_select_cat
    fsdp.FSDP = CpuFSDP
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.synchronize = lambda *args, **kwargs: None
    return ["xformers memory_efficient_attention/scaled_index_add/index_select_cat: plain torch",
            "Tensor.cuda: identity", "FSDP: device cpu"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- config
def build_config(package: Path, args: argparse.Namespace):
    dotlist = list(PRESETS[args.config])
    if args.cpu_rehearsal:
        dotlist += REHEARSAL + ["train.batch_size_per_gpu=4"]
    if args.batch_size:
        dotlist.append(f"train.batch_size_per_gpu={args.batch_size}")
    if args.precision == "bf16":
        dotlist.append("compute_precision.grad_scaler=false")
        for role in ("student", "teacher"):
            for module in MODULES:
                for key in ("param_dtype", "reduce_dtype"):
                    dotlist.append(f"compute_precision.{role}.{module}.mixed_precision.{key}=bf16")
    dotlist += args.overrides
    return original_config(package, dotlist), dotlist


def original_config(package: Path, dotlist: list[str]):
    """The original's ``ssl_default_config.yaml`` with ``dotlist`` merged in; a key it does not have
    is an error that names it."""
    from omegaconf import OmegaConf

    default = OmegaConf.load(package / "configs" / "ssl_default_config.yaml")
    OmegaConf.set_struct(default, True)
    return OmegaConf.merge(default, OmegaConf.from_dotlist(dotlist))


def make_batches(cfg, count: int, seed: int, original) -> list[dict]:
    """As the original's do_train builds them: its mask generator and collate, fp16 crops."""
    import random
    from functools import partial

    import torch

    from dinov2.data import MaskingGenerator, collate_data_and_cast

    random.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    grid = cfg.crops.global_crops_size // cfg.student.patch_size
    mask_generator = MaskingGenerator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    collate = partial(collate_data_and_cast, mask_ratio_tuple=cfg.ibot.mask_ratio_min_max,
                      mask_probability=cfg.ibot.mask_sample_probability, n_tokens=grid * grid,
                      mask_generator=mask_generator, dtype=torch.half)  # fmt: skip
    size_g, size_l = cfg.crops.global_crops_size, cfg.crops.local_crops_size

    def sample():
        global_crops = [torch.randn(3, size_g, size_g, generator=generator) for _ in range(2)]
        local_crops = [torch.randn(3, size_l, size_l, generator=generator) for _ in range(cfg.crops.local_crops_number)]
        return {"global_crops": global_crops, "local_crops": local_crops}, ()

    return [collate([sample() for _ in range(cfg.train.batch_size_per_gpu)]) for _ in range(count)]


# ---------------------------------------------------------------------------------------------- timing
def peak_rss_mib() -> float:
    """CPU: the process's peak resident memory, as benchmark_train.py reports it there."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_json_atomic(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(partial, path)


def run(args: argparse.Namespace) -> dict:
    import torch

    scratch = Path(tempfile.mkdtemp(prefix="dinov2_original_"))
    root = locate_package(args.source, scratch)
    original = import_original(root)  # from here on, "dinov2" is the original's package
    package = Path(original.__file__).parent
    from dinov2 import distributed, fsdp
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.train.train import apply_optim_scheduler, build_optimizer

    cuda = torch.cuda.is_available() and not args.cpu_rehearsal
    if not cuda and not args.cpu_rehearsal:
        raise SystemExit("the original runs on CUDA only; on CPU pass --cpu-rehearsal")
    adapters = torch20_fsdp_adapters(fsdp)
    if args.xformers_op == "auto":
        import dinov2.layers.attention

        adapters.append(let_xformers_choose(dinov2.layers.attention))
    if args.cpu_rehearsal:
        adapters += cpu_stand_ins()
    cfg, dotlist = build_config(package, args)
    torch.manual_seed(args.seed)
    if cuda:
        distributed.enable(overwrite=True)  # its own single-process setup: NCCL, rank 0 of 1
    else:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
        distributed._LOCAL_RANK, distributed._LOCAL_WORLD_SIZE = 0, 1  # what enable() sets
    device = torch.device("cuda" if cuda else "cpu")

    model = SSLMetaArch(cfg).to(device)
    model.prepare_for_distributed_training()
    model.train()
    optimizer = build_optimizer(cfg, model.get_params_groups())
    scaler = model.fp16_scaler
    batches = make_batches(cfg, args.num_batches, args.seed, original)
    # the schedules' first values: warm-up lr and teacher temperature, frozen last layer
    lr, wd, last_layer_lr, momentum = 0.0, cfg.optim.weight_decay, 0.0, cfg.teacher.momentum_teacher
    teacher_temp = cfg.teacher.warmup_teacher_temp
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def step(data) -> float:
        apply_optim_scheduler(optimizer, lr, wd, last_layer_lr)
        optimizer.zero_grad(set_to_none=True)
        losses = model.forward_backward(data, teacher_temp=teacher_temp)
        if scaler is not None:
            if cfg.optim.clip_grad:
                scaler.unscale_(optimizer)
                for module in model.student.values():
                    module.clip_grad_norm_(cfg.optim.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            if cfg.optim.clip_grad:
                for module in model.student.values():
                    module.clip_grad_norm_(cfg.optim.clip_grad)
            optimizer.step()
        model.update_teacher(momentum)
        return float(sum(v.detach().float() for v in losses.values()))

    times, loss = [], float("nan")
    for k in range(args.warmup + args.iters):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = step(batches[k % len(batches)])
        if cuda:
            torch.cuda.synchronize(device)
        if k >= args.warmup:
            times.append(time.perf_counter() - start)
    torch.distributed.destroy_process_group()
    images = cfg.train.batch_size_per_gpu
    median, best = statistics.median(times), min(times)
    dtype = str(cfg.compute_precision.student.backbone.mixed_precision.param_dtype)
    name = args.config + (" (CPU rehearsal: a tiny model)" if args.cpu_rehearsal else "")
    row = {"implementation": "original", "backend": "original", "compile": "off", "activation_checkpointing": "off",
           "config": name, "dtype": dtype, "grad_scaler": scaler is not None, "xformers_op": args.xformers_op,
           "batch_size": images,
           "s_iter_median": median, "s_iter_best": best, "img_s": images / median, "img_s_best": images / best,
           "peak_mem_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else peak_rss_mib(),
           "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20 if cuda else None,
           "loss_last": loss, "times_s": times, "mfu": None, "mfu_nominal": None}  # fmt: skip
    versions = {"torch": torch.__version__}
    try:
        import xformers

        versions["xformers"] = xformers.__version__
    except ImportError:
        versions["xformers"] = None
    wheel = next(iter(source_wheels(args.source)), None)
    return {
        "benchmark": "original_train_step",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if cuda else "cpu (rehearsal)",
        "source": {"path": str(args.source), "imported_from": str(package), "wheel_sha256": wheel and sha256(wheel)},
        "versions": versions,
        "adapters": adapters,
        "overrides": dotlist,
        "warmup": args.warmup,
        "iters": args.iters,
        "rows": [row],
        "complete": True,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    write_json_atomic(args.output, report)
    row = report["rows"][0]
    peak = f"{row['peak_mem_mib'] / 1024:.1f} GiB"
    print(f"original {args.config} batch {row['batch_size']} {row['dtype']}: {row['s_iter_median']:.3f} s/iter "
          f"(best {row['s_iter_best']:.3f}), {row['img_s']:.1f} img/s, peak {peak} -> {args.output}")  # fmt: skip
    return report


if __name__ == "__main__":
    main()
