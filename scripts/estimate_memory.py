#!/usr/bin/env python
"""Memory per GPU for DINOv2 training: parameter arithmetic for the state, measured activations.

1. Exact parameter counts from a meta-device build of ``SSLMetaArch``; the state per GPU for world
   size W and a sharding strategy (fp32 student + teacher parameters, fp32 gradients, AdamW moments)
   and the transient unsharded (gathered) student parameters in ``param_dtype``.
2. Activations per image, measured on CPU: one student forward of the training path
   (``_student_outputs`` then ``_losses`` against random teacher targets of the right shapes) under
   bf16 autocast, ``sdpa`` attention, train mode with the recipe's stochastic depth, for activation
   checkpointing off / full / selective. Counted: every storage created by that forward and still
   alive once all but the loss is dropped, i.e. what autograd keeps for backward (once per storage).
   A ``saved_tensors_hooks`` count, reported alongside, misses part of it under checkpointing:
   ``checkpoint`` installs its own hooks inside each block and holds the block inputs (and for
   ``selective`` the matmul outputs) by other means. Storages computed from parameters alone
   (autocast weight copies, weight-normalised prototypes) do not grow with the batch: kept apart.
   The default batch is the smallest one for which the stochastic-depth subsets keep exactly
   ``1 - drop_path_rate`` of each crop group (ViT-B/L: 5 images); backbones above
   ``--extrapolate-above`` are scaled from the largest measured one and flagged ``extrapolated``.

    OMP_NUM_THREADS=2 python scripts/estimate_memory.py            # table + benchmark_memory.json
    python scripts/estimate_memory.py --configs vitl14 --world-sizes 16 32 --skip-activations
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import time
import warnings
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dinov2.distributed.parallelize import apply_activation_checkpointing, module_policy
from dinov2.layers.block import SUBSET_DROP_PATH_THRESHOLD
from dinov2.ops.residual import sample_keep_subset
from dinov2.train.ssl_meta_arch import N_GLOBAL_CROPS, SSLMetaArch
from dinov2.utils.benchmark import cpu_name, git_commit, write_report
from dinov2.utils.config import load_config

DEFAULT_CONFIGS = ("vits14_1gpu", "vitb14_1gpu", "vitl14", "vitg14")
CHECKPOINTING = ("off", "full", "selective")
STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
HEADS = ("dino_head", "ibot_head")
FP32 = 4  # bytes: master parameters, gradients and AdamW moments are fp32
MIB, GIB = 2**20, 2**30


# ------------------------------------------------------------------------------- parameter counts
def _numel(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def count_parameters(cfg) -> dict:
    """Exact counts from a meta-device build (nothing is allocated). FSDP2 shards each backbone
    block (or chunk, with ``student.block_chunks``) as a unit: the largest is kept for the gathers."""
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    backbone = model.student.backbone
    counts = {"arch": str(cfg.student.arch), "embed_dim": model.embed_dim, "depth": backbone.n_blocks}
    for role in ("student", "teacher"):
        modules = getattr(model, role)
        counts[f"{role}_backbone"] = _numel(modules.backbone)
        for head in HEADS:
            counts[f"{role}_{head}"] = _numel(modules[head]) if head in modules else 0
        counts[role] = _numel(modules)
    counts["student_trainable"] = _numel(model.student, trainable=True)
    counts["largest_backbone_unit"] = max(_numel(unit) for unit in backbone.blocks)
    return counts


# ------------------------------------------------------------------------------ state arithmetic
def state_bytes(counts: dict, world: int, strategy: str) -> dict:
    """Persistent state per GPU: fp32 master parameters of student and teacher, fp32 gradients and
    AdamW ``exp_avg`` + ``exp_avg_sq`` of the student's trainable parameters. FULL_SHARD and
    SHARD_GRAD_OP shard all of it over the ``world`` ranks; NO_SHARD replicates it."""
    shards = 1 if strategy == "NO_SHARD" else world
    parts = {
        "params": (counts["student"] + counts["teacher"]) * FP32 / shards,
        "grads": counts["student_trainable"] * FP32 / shards,
        "adamw": 2 * counts["student_trainable"] * FP32 / shards,
    }
    return {**parts, "total": sum(parts.values())}


def gathered_bytes(counts: dict, world: int, strategy: str, param_bytes: int = 2) -> float:
    """Unsharded student parameters in ``param_dtype`` alive at the activation peak (end of forward).

    One process: no FSDP, nothing gathered (autocast's weight copies are measured instead).
    FULL_SHARD: each unit is resharded after its forward and gathered again for backward, so at a
    time one unit plus the prefetched next one: 2 x the largest unit (a block, a chunk of
    ``depth / block_chunks`` blocks, or a head). SHARD_GRAD_OP: the whole student (backbone and
    heads) stays gathered from forward to backward. NO_SHARD: the same (FSDP2 holds ``param_dtype``
    copies of the replicated parameters)."""
    if world == 1:
        return 0.0
    if strategy == "FULL_SHARD":
        heads = max(counts["student_dino_head"], counts["student_ibot_head"])
        return 2 * max(counts["largest_backbone_unit"], heads) * param_bytes
    return counts["student"] * param_bytes


def accumulation_grad_bytes(cfg, counts: dict) -> float:
    """With FSDP2 and ``grad_accum_steps > 1`` the earlier micro-batches' gradients stay unsharded
    (reduce-scattered after the last one), in each student module's ``reduce_dtype``."""
    dtypes = {m: module_policy(cfg, "student", m, True)["reduce_dtype"] for m in ("backbone", *HEADS)}
    return sum(counts[f"student_{m}"] * dtype.itemsize for m, dtype in dtypes.items())


def teacher_target_bytes(cfg, masked_per_image: float) -> float:
    """fp32 teacher targets alive through the student's forward and backward, per image: the 2
    global-crop DINO targets and one iBOT target per masked patch."""
    ibot_k = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
    dino = N_GLOBAL_CROPS * cfg.dino.head_n_prototypes if cfg.dino.loss_weight > 0 else 0
    ibot = masked_per_image * ibot_k if cfg.ibot.loss_weight > 0 else 0
    return (dino + ibot) * FP32


def peak_bytes(plan: dict, act: dict, batch: int) -> dict:
    """Parts of the peak (end of the student forward): state, gathered parameters, ``batch`` images of
    activations and teacher targets, and the batch-independent parameter-derived storages (autocast
    weight copies only without FSDP: with it, matmuls save the gathered ``param_dtype`` parameters)."""
    parts = {"state": plan["total"], "gathered": plan["gathered"], "activations": batch * act["bytes_per_image"]}
    parts["teacher_targets"] = batch * act["teacher_targets_per_image"]
    parts["param_derived"] = act["param_derived_bytes"] + (act["param_casts_bytes"] if not plan["gathered"] else 0)
    return {**parts, "total": sum(parts.values())}


# ---------------------------------------------------------------------------- activation counting
class RetainedStorages(TorchDispatchMode):
    """Remember (weakly) every storage an op creates; afterwards, sum those still alive.

    Outputs of ops whose inputs all come from parameters are ``param_casts`` (a direct cast of a
    parameter, e.g. autocast's) or ``param_derived`` (e.g. weight norm); the rest are activations,
    split by ``phase`` (set from forward hooks). Storages that existed before are never counted."""

    def __init__(self, preexisting: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        super().__init__()
        self.skip = {self.key(t) for t in preexisting}
        self.params = {self.key(p) for p in params}
        self.seen: dict[int, tuple[StorageWeakRef, int, str]] = {}
        self.phase = "backbone"

    @staticmethod
    def key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata  # the StorageImpl: one key per storage, whatever the view

    def _live_kind(self, key: int) -> str | None:
        entry = self.seen.get(key)
        return entry[2] if entry is not None and not entry[0].expired() else None

    def _from_params(self, key: int) -> bool:
        return key in self.params or (self._live_kind(key) or "").startswith("param")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        from_params = bool(inputs) and all(self._from_params(self.key(t)) for t in inputs)
        cast = from_params and func is torch.ops.aten._to_copy.default and self.key(inputs[0]) in self.params
        kind = "param_casts" if cast else "param_derived" if from_params else self.phase
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                key = self.key(t)
                if key not in self.skip and key not in self.params and self._live_kind(key) is None:
                    self.seen[key] = (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes(), kind)
        return out

    def alive(self) -> dict[str, int]:
        totals = dict.fromkeys(("backbone", "heads_losses", "param_casts", "param_derived"), 0)
        for ref, nbytes, kind in self.seen.values():
            totals[kind] += 0 if ref.expired() else nbytes
        return totals


def saved_tensor_counter() -> tuple[torch.autograd.graph.saved_tensors_hooks, dict[int, int]]:
    """Hooks recording the storages autograd's (outermost) pack hook sees, one entry per storage
    (keyed by ``StorageImpl`` like :class:`RetainedStorages`; equivalent to deduplicating by ``data_ptr``)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages.setdefault(RetainedStorages.key(t), t.untyped_storage().nbytes())
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), storages


def make_batch(cfg, images: int) -> dict:
    """A collated batch (see dinov2.data.collate) of ``images`` images, with the collate's average
    masking: ``int(2B * mask_sample_probability)`` crops masked, crop ``i`` at the middle of the
    ``i``-th bin of ``mask_ratio_min_max``."""
    g, loc, patch = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.student.patch_size
    masks = torch.zeros(N_GLOBAL_CROPS * images, (g // patch) ** 2, dtype=torch.bool)
    n_masked = int(len(masks) * cfg.ibot.mask_sample_probability)
    low, high = (float(x) for x in cfg.ibot.mask_ratio_min_max)
    for row in range(n_masked):
        masks[row, : int(masks.shape[1] * (low + (row + 0.5) * (high - low) / n_masked))] = True
    indices = masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": torch.randn(N_GLOBAL_CROPS * images, 3, g, g),
        "collated_local_crops": torch.randn(cfg.crops.local_crops_number * images, 3, loc, loc),
        "collated_masks": masks,
        "mask_indices_list": indices,
        "masks_weight": (1.0 / masks.sum(-1).clamp(min=1).float()).unsqueeze(-1).expand_as(masks)[masks],
        "n_masked_patches": torch.tensor([len(indices)]),
    }


def build_student(cfg) -> SSLMetaArch:
    """The meta-architecture with only the student and the losses materialised on CPU (the teacher
    stays on the meta device), in train mode, attention backend ``sdpa``."""
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    for module in (model.student, model.dino_loss, model.ibot_patch_loss, model.koleo_loss):
        module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.student.named_parameters():  # values do not matter, only finite ones
            p.fill_(1.0) if name.endswith("original0") else p.normal_(0.0, 0.02)  # weight-norm g stays 1
        for buffer in (b for b in model.buffers() if not b.is_meta):
            buffer.zero_()
    model.student.backbone.set_attn_backend("sdpa")
    return model.train()


def keep_fractions(cfg, images: int) -> dict[str, float]:
    """Fraction of each crop group's samples whose residual branches run (stochastic depth; below
    the subset threshold, per-sample DropPath masks: every sample is computed)."""
    rate = float(cfg.student.drop_path_rate)
    groups = {"global": N_GLOBAL_CROPS * images, "local": cfg.crops.local_crops_number * images}
    subset = rate > SUBSET_DROP_PATH_THRESHOLD
    return {
        k: len(sample_keep_subset(n, rate, torch.device("cpu"))[0]) / n if subset else 1.0 for k, n in groups.items()
    }


def exact_batch(cfg, max_images: int = 8) -> int:
    """The smallest batch (images) whose stochastic-depth subsets keep exactly ``1 - rate``."""
    rate = float(cfg.student.drop_path_rate)
    target = 1.0 - rate if rate > SUBSET_DROP_PATH_THRESHOLD else 1.0
    for images in range(1, max_images + 1):
        if all(abs(f - target) < 1e-9 for f in keep_fractions(cfg, images).values()):
            return images
    return max_images


def student_forward_memory(model: SSLMetaArch, batch: dict, targets: dict) -> dict:
    """Bytes kept for backward by one student forward + losses, and the seconds it took."""
    params = [t for t in list(model.parameters()) + list(model.buffers()) if not t.is_meta]
    mode = RetainedStorages(params + list(batch.values()) + list(targets.values()), params)
    hooks, saved = saved_tensor_counter()
    backbone = model.student.backbone
    handles = [
        backbone.register_forward_pre_hook(lambda *_: setattr(mode, "phase", "backbone")),
        backbone.register_forward_hook(lambda *_: setattr(mode, "phase", "heads_losses")),
    ]
    start = time.perf_counter()
    with mode, hooks, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.total_loss(model._losses(model._student_outputs(batch), targets, batch))
    seconds = time.perf_counter() - start
    gc.collect()
    retained = mode.alive()
    live = {k for k, (ref, _, kind) in mode.seen.items() if not ref.expired() and not kind.startswith("param")}
    hooked = sum(n for k, n in saved.items() if k in live)
    del loss
    for handle in handles:
        handle.remove()
    return {**retained, "saved_hooks": hooked, "forward_seconds": seconds}


def measure_activations(cfg, images: int) -> dict:
    """Per checkpointing mode: bytes per image (backbone, heads + losses, total, hook count), the
    batch-independent parameter-derived bytes, and the measurement's own settings."""
    model = build_student(cfg)
    batch, results = make_batch(cfg, images), {}
    ibot_k = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
    targets = {  # random, with the shapes SSLMetaArch._teacher_targets returns
        "dino": torch.rand(N_GLOBAL_CROPS, images, cfg.dino.head_n_prototypes).softmax(-1),
        "ibot": torch.rand(len(batch["mask_indices_list"]), ibot_k).softmax(-1),
    }
    masked = len(batch["mask_indices_list"]) / images
    for mode in CHECKPOINTING:
        apply_activation_checkpointing(model.student.backbone, mode)
        m = student_forward_memory(model, batch, targets)
        results[mode] = {
            "bytes_per_image": (m["backbone"] + m["heads_losses"]) / images,
            "backbone_bytes_per_image": m["backbone"] / images,
            "heads_losses_bytes_per_image": m["heads_losses"] / images,
            "saved_hooks_bytes_per_image": m["saved_hooks"] / images,
            "param_casts_bytes": m["param_casts"],
            "param_derived_bytes": m["param_derived"],
            "teacher_targets_per_image": teacher_target_bytes(cfg, masked),
            "forward_seconds": m["forward_seconds"],
        }
    settings = dict(batch_images=images, masked_patches_per_image=masked, keep_fractions=keep_fractions(cfg, images))
    settings["drop_path_rate"] = cfg.student.drop_path_rate
    return {"extrapolated": False, "settings": settings, "modes": results}


def tokens_per_image(cfg) -> int:
    """Backbone tokens of one image: 2 global and ``local_crops_number`` local crops (CLS, registers)."""
    extra, patch, crops = 1 + int(cfg.student.num_register_tokens), cfg.student.patch_size, cfg.crops
    return N_GLOBAL_CROPS * ((crops.global_crops_size // patch) ** 2 + extra) + crops.local_crops_number * (
        (crops.local_crops_size // patch) ** 2 + extra
    )


def extrapolate(cfg, counts: dict, ref: dict) -> dict:
    """Figures of a recipe that is not run, from a measured ``ref`` entry: backbone activations scaled
    by width x depth x tokens, heads + losses and the weight-normalised prototypes by the number of
    prototypes, autocast weight copies by the backbone parameters."""
    rc, settings = ref["counts"], ref["activations"]["settings"]
    factor = counts["embed_dim"] * counts["depth"] * tokens_per_image(cfg)
    factor /= rc["embed_dim"] * rc["depth"] * ref["tokens_per_image"]
    heads = (cfg.dino.head_n_prototypes + cfg.ibot.head_n_prototypes) / ref["prototypes"]
    modes = {}
    for mode, r in ref["activations"]["modes"].items():
        backbone, head_part = r["backbone_bytes_per_image"] * factor, r["heads_losses_bytes_per_image"] * heads
        hooks = (r["saved_hooks_bytes_per_image"] - r["heads_losses_bytes_per_image"]) * factor + head_part
        modes[mode] = {
            "bytes_per_image": backbone + head_part,
            "backbone_bytes_per_image": backbone,
            "heads_losses_bytes_per_image": head_part,
            "saved_hooks_bytes_per_image": hooks,
            "param_casts_bytes": r["param_casts_bytes"] * counts["student_backbone"] / rc["student_backbone"],
            "param_derived_bytes": r["param_derived_bytes"] * heads,
            "teacher_targets_per_image": teacher_target_bytes(cfg, settings["masked_patches_per_image"]),
            "forward_seconds": None,
        }
    note = f"scaled from {ref['config']} by width x depth x tokens (x{factor:.2f}); drop_path_rate "
    note += f"{cfg.student.drop_path_rate} here, {settings['drop_path_rate']} there"
    return {"extrapolated": True, "note": note, "settings": settings, "modes": modes}


# ----------------------------------------------------------------------------------- one recipe
def sharding_plan(cfg, counts: dict, worlds: list[int]) -> dict:
    """State and gathered bytes per strategy and world size (student backbone's ``param_dtype``)."""
    size = module_policy(cfg, "student", "backbone", True)["param_dtype"].itemsize
    plan = {s: {str(w): state_bytes(counts, w, s) for w in worlds} for s in STRATEGIES}
    for s, w in ((s, w) for s in STRATEGIES for w in worlds):
        plan[s][str(w)]["gathered"] = gathered_bytes(counts, w, s, size)
    return plan


def example(cfg, name: str, entry: dict) -> dict:
    """Peak per GPU at the recipe's batch_size_per_gpu and backbone strategy, on its GPU count:
    1 for the ``*_1gpu`` recipes, else 32."""
    world = 1 if Path(name).stem.endswith("_1gpu") else 32
    strategy = str(cfg.compute_precision.student.backbone.sharding_strategy).upper()
    plan = sharding_plan(cfg, entry["counts"], [world])[strategy][str(world)]
    batch = int(cfg.train.batch_size_per_gpu)
    peaks = {m: peak_bytes(plan, a, batch) for m, a in entry["activations"]["modes"].items()}
    return {"world_size": world, "strategy": strategy if world > 1 else "none (1 process)", "batch_size_per_gpu": batch,
            "grad_accum_steps": int(cfg.train.grad_accum_steps), "peak_bytes": peaks}  # fmt: skip


def run_recipe(name: str, args: argparse.Namespace, measured: list[dict]) -> dict:
    cfg = load_config(name, ["student.attn_backend=sdpa"])
    counts = count_parameters(cfg)
    entry = {"config": name, "counts": counts, "tokens_per_image": tokens_per_image(cfg)}
    entry["prototypes"] = cfg.dino.head_n_prototypes + cfg.ibot.head_n_prototypes
    entry["sharding"] = sharding_plan(cfg, counts, args.world_sizes)
    entry["fsdp_grad_accum_unsharded_grads"] = accumulation_grad_bytes(cfg, counts)
    if args.skip_activations:
        return entry
    start = time.perf_counter()
    if counts["student_backbone"] > args.extrapolate_above * 1e6 and measured:  # else measured, if memory allows
        entry["activations"] = extrapolate(cfg, counts, max(measured, key=lambda e: e["counts"]["student_backbone"]))
    else:
        torch.manual_seed(0)
        entry["activations"] = measure_activations(cfg, args.batch_images or exact_batch(cfg))
        measured.append(entry)
    entry["activations"]["seconds"] = time.perf_counter() - start
    entry["example"] = example(cfg, name, entry)
    print(f"{name}: {entry['activations']['seconds']:.0f} s", flush=True)
    return entry


# --------------------------------------------------------------------------------------- report
def format_table(entries: list[dict], worlds: list[int]) -> str:
    head = ["model", "backbone M", "heads M", "all M"] + [f"state W={w} GiB" for w in worlds]
    head += ["act MiB/img off/full/sel", "B x W", "total GiB off/full/sel"]
    rows = [head]
    for e in entries:
        c = e["counts"]
        row = [e["config"], f"{c['student_backbone'] / 1e6:.1f}", f"{(c['student'] - c['student_backbone']) / 1e6:.1f}"]
        row += [f"{(c['student'] + c['teacher']) / 1e6:.0f}"]
        row += [f"{e['sharding']['FULL_SHARD'][str(w)]['total'] / GIB:.2f}" for w in worlds]
        if "activations" in e:
            modes, ex = e["activations"]["modes"], e["example"]
            flag = " (extrapolated)" if e["activations"]["extrapolated"] else ""
            row += ["/".join(f"{modes[m]['bytes_per_image'] / MIB:.0f}" for m in CHECKPOINTING) + flag]
            row += [f"{ex['batch_size_per_gpu']} x {ex['world_size']}"]
            row += ["/".join(f"{ex['peak_bytes'][m]['total'] / GIB:.1f}" for m in CHECKPOINTING)]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(head))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="names under configs/train/ or paths")
    p.add_argument("--world-sizes", nargs="+", type=int, default=[8, 16, 32, 64])
    p.add_argument("--batch-images", type=int, default=0, help="images per measurement (0: exact stochastic depth)")
    p.add_argument("--extrapolate-above", type=float, default=500.0, help="M backbone params; larger ones are scaled")
    p.add_argument("--output", type=Path, default=Path("benchmark_memory.json"))
    p.add_argument("--skip-activations", action="store_true", help="parameter arithmetic only")
    args = p.parse_args(argv)
    if min(args.world_sizes) < 1 or args.batch_images < 0:
        p.error(f"--world-sizes must be >= 1 (got {min(args.world_sizes)}) and --batch-images >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="A saved_tensors_hooks context", category=FutureWarning)
    start, measured = time.perf_counter(), []
    entries = [run_recipe(name, args, measured) for name in args.configs]
    print(format_table(entries, args.world_sizes))
    print("state: FULL_SHARD, fp32 params (student + teacher) + grads + AdamW. total: peak at the recipe's "
          "batch_size_per_gpu and strategy (state + gathered + activations + targets + weight copies)")  # fmt: skip
    report = {
        "date": datetime.date.today().isoformat(),
        "device": f"{cpu_name()} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "units": "bytes",
        "notes": "estimates: state and gathers from parameter counts; activations = storages autograd keeps after one "
        "student forward + losses on CPU (bf16 autocast, sdpa, train mode); no CUDA context, allocator or temporaries",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": time.perf_counter() - start,
        "recipes": entries,
    }
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    main()
