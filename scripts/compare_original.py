#!/usr/bin/env python
"""Our objective against the original implementation's, on CPU in float32: the same weights and the
same batches through both, then every loss term, every student gradient and both centres compared.

The original's code comes from ``--source`` (its PyPI wheel, see scripts/device/benchmark_original.py,
whose import isolation and CPU stand-ins for xFormers are reused here). Both packages are named
``dinov2``, so the original runs in a child process of this script (``--side original``): it builds
its ``SSLMetaArch`` with a small ViT, copies the student into the teacher as its
``prepare_for_distributed_training`` does, runs ``forward_backward`` on two batches made by its own
mask generator and collate (crops cast to float32), and saves its initial weights, the batches, its
loss terms, gradients and centres. This process then loads those weights into our ``SSLMetaArch``
(weight-norm keys renamed), runs the same batches, and compares.

Then the recipe around the objective: the five schedules of ``vitl16_short`` at full length (the
original's ``build_schedulers`` after its lr scaling, against ours) and every student parameter's
lr multiplier, weight-decay multiplier and last-layer flag (its ``get_params_groups_with_decay``
against ours, on a ViT-S in 4 block chunks with both heads).

Then whole training steps (``FULL_STEPS``): from the same weights, the objective, the clipping,
AdamW over the parameter groups and the teacher EMA, in the original's optimiser code and in our
``Trainer.step``; every student and teacher update is compared (:func:`compare_full_steps`).

Stochastic depth is off (it draws different random subsets in the two codes); everything else is the
recipe's. Both configs get the same explicit values (``SETTINGS``); the report also lists every
default of the original's ``ssl_default_config.yaml`` that differs from ours.

Term names: the original reports ``koleo_loss`` and ``ibot_loss`` halved "for display"; they are
doubled back here, and our ``koleo_loss`` is weighted, so that the numbers compared are each term's
contribution to the loss that is backpropagated.

    python scripts/compare_original.py --source .whl/original --output compare_original.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Explicit on both sides, so that differing defaults cannot hide behind a "match". A ViT-S/16 on
# 64 px global and 32 px local crops: 16 patches per global crop, enough for block masks.
SETTINGS = [
    "student.arch=vit_small", "student.patch_size=16", "student.drop_path_rate=0.0", "student.layerscale=1e-05",
    "student.ffn_layer=mlp", "student.block_chunks=0", "student.qkv_bias=true", "student.proj_bias=true",
    "student.ffn_bias=true", "crops.global_crops_size=64", "crops.local_crops_size=32", "crops.local_crops_number=4",
    "dino.loss_weight=1.0", "dino.koleo_loss_weight=0.1", "dino.head_n_prototypes=512", "dino.head_hidden_dim=128",
    "dino.head_bottleneck_dim=64", "dino.head_nlayers=3", "ibot.loss_weight=1.0", "ibot.separate_head=false",
    "ibot.mask_sample_probability=0.5", "ibot.mask_ratio_min_max=[0.1,0.5]", "ibot.head_n_prototypes=512",
    "ibot.head_hidden_dim=128", "ibot.head_bottleneck_dim=64", "ibot.head_nlayers=3", "train.batch_size_per_gpu=8",
]  # fmt: skip
TEACHER_TEMP = 0.04  # the warm-up value of both recipes
# Whole training steps (objective -> clip per student module -> AdamW over the parameter groups ->
# teacher EMA) from the same weights, with these schedule values: the last layer frozen in the first
# step and trained in the second; AdamW's first step is scale-free, so the second is where the
# clipping and the moments show.
FULL_STEPS = [
    {"lr": 1e-3, "wd": 0.04, "last_layer_lr": 0.0, "mom": 0.9},
    {"lr": 1e-3, "wd": 0.04, "last_layer_lr": 1e-3, "mom": 0.9},
]
# Each case runs both codes from the same weights. At the recipe's start (LayerScale 1e-5) every
# crop's CLS feature is nearly the same, so KoLeo's nearest-neighbour distances are ~1e-4 and its
# gradient (~1/d) amplifies float32 rounding; the other two cases separate that from the objective.
CASES = {
    "recipe_start": [],
    "recipe_start_without_koleo": ["dino.koleo_loss_weight=0.0"],
    "spread_features": ["student.layerscale=1.0"],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, required=True, help="the original's wheel, or a folder with it")
    p.add_argument("--centering", choices=["centering", "sinkhorn_knopp"], default="centering")
    p.add_argument("--separate-ibot-head", action="store_true", help="ibot.separate_head=true on both sides")
    p.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=Path("compare_original.json"))
    p.add_argument("--side", choices=["ours", "original", "original-recipe"], default="ours", help=argparse.SUPPRESS)
    p.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings(args: argparse.Namespace, case: str) -> list[str]:
    extra = [f"train.centering={args.centering}"]
    if args.separate_ibot_head:
        extra.append("ibot.separate_head=true")
    return SETTINGS + extra + CASES[case]


def import_original(args: argparse.Namespace):
    """Child processes: ``(benchmark_original's module, the original's dinov2 package)``, imported
    with that script's isolation from ours."""
    spec = importlib.util.spec_from_file_location("benchmark_original", HERE / "device" / "benchmark_original.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root = bench.locate_package(args.source, Path(tempfile.mkdtemp(prefix="orig_")))
    return bench, bench.import_original(root)


def flat(cfg, prefix: str = "") -> dict:
    """``{dotted.key: value}`` of a plain nested dict."""
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


# ---------------------------------------------------------------------------------------------- original
def run_original(args: argparse.Namespace) -> None:
    """Child process: the original's side, saved to ``args.reference``."""
    import torch

    bench, original = import_original(args)
    bench.cpu_stand_ins()  # xFormers' ops in plain torch, Tensor.cuda an identity
    from omegaconf import OmegaConf

    from dinov2.train.ssl_meta_arch import SSLMetaArch

    package = Path(original.__file__).parent
    cfg = bench.original_config(package, settings(args, args.cases[0]))
    # one gloo process: the original always runs distributed (its Sinkhorn-Knopp all-reduces)
    init = Path(tempfile.mkdtemp(prefix="orig_pg_")) / "init"
    torch.distributed.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
    torch.manual_seed(args.seed)
    model = SSLMetaArch(cfg)
    for name, module in model.student.items():  # what prepare_for_distributed_training does first
        model.teacher[name].load_state_dict(module.state_dict())
    model.need_to_synchronize_fsdp_streams = False  # no FSDP here, so no streams to share after step 1
    model.train()
    weights = {f"{side}.{key}": value.clone() for side in ("student", "teacher")
               for key, value in getattr(model, side).state_dict().items()}  # fmt: skip
    batches = bench.make_batches(cfg, 2, args.seed, original)
    for batch in batches:
        for key in ("collated_global_crops", "collated_local_crops"):
            batch[key] = batch[key].float()  # float32 here, as the model is; values keep their fp16 rounding
    steps = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        terms = model.forward_backward(batch, teacher_temp=TEACHER_TEMP)
        model.dino_loss.apply_center_update()
        model.ibot_patch_loss.apply_center_update()
        grads = {n: p.grad.clone() for n, p in model.student.named_parameters() if p.grad is not None}
        centers = {"dino": model.dino_loss.center.clone(), "ibot": model.ibot_patch_loss.center.clone()}
        steps.append({"terms": {k: float(v) for k, v in terms.items()}, "grads": grads, "centers": centers})
    full_steps = original_full_steps(model, cfg, weights, batches)
    torch.distributed.destroy_process_group()
    config = OmegaConf.to_container(bench.original_config(package, []), resolve=True)
    torch.save({"weights": weights, "batches": batches, "steps": steps, "full_steps": full_steps,
                "default_config": config}, args.reference)  # fmt: skip


def original_full_steps(model, cfg, weights: dict, batches: list) -> list[dict]:
    """Child process: ``FULL_STEPS`` through the original's optimiser code from ``weights``; the
    student and teacher weights after each step.

    Its ``build_optimizer`` over its ``get_params_groups`` and its ``apply_optim_scheduler`` run as
    they are. Two of its calls need FSDP, which a single CPU process here does without, so their
    arithmetic is done on the plain modules: ``clip_grad_norm_`` of each student module (FSDP's
    method; on one process it is ``torch.nn.utils.clip_grad_norm_`` of the module's parameters), and
    ``update_teacher`` (``teacher = m teacher + (1 - m) student`` over every parameter, by ``_foreach``
    ops as it does over FSDP's flat parameters)."""
    import torch

    from dinov2.train.train import apply_optim_scheduler, build_optimizer

    for side in ("student", "teacher"):
        prefix = side + "."
        getattr(model, side).load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    for loss in (model.dino_loss, model.ibot_patch_loss):
        loss.center.zero_()  # the initial centres, as in a fresh model
    optimizer = build_optimizer(cfg, model.get_params_groups())
    out = []
    for values, batch in zip(FULL_STEPS, batches, strict=True):
        apply_optim_scheduler(optimizer, values["lr"], values["wd"], values["last_layer_lr"])
        optimizer.zero_grad(set_to_none=True)
        model.forward_backward(batch, teacher_temp=TEACHER_TEMP)
        model.dino_loss.apply_center_update()
        model.ibot_patch_loss.apply_center_update()
        for module in model.student.values():
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        with torch.no_grad():
            student = [p for key in model.student.keys() for p in model.student[key].parameters()]
            teacher = [p for key in model.student.keys() for p in model.teacher[key].parameters()]
            torch._foreach_mul_(teacher, values["mom"])
            torch._foreach_add_(teacher, student, alpha=1 - values["mom"])
        out.append({f"{side}.{key}": value.clone() for side in ("student", "teacher")
                    for key, value in getattr(model, side).state_dict().items()})  # fmt: skip
    return out


# The recipe outside the objective: the schedules of vitl16_short at full length (the preset of
# benchmark_original.py, lr scaled for one GPU of batch 64) and the parameter groups of a ViT-S/16
# in 4 block chunks (so that chunked names are covered) with both heads.
RECIPE_MODEL = ["student.arch=vit_small", "student.block_chunks=4", "ibot.separate_head=true",
                "dino.head_n_prototypes=512", "ibot.head_n_prototypes=512"]  # fmt: skip
SCHEDULES = ("lr", "wd", "momentum", "teacher_temp", "last_layer_lr")
MASK_BATCHES = 200  # iBOT masks of 64 images (128 global crops) on the 14 x 14 grid of a 224 px ViT-/16


def draw_masks(masking_generator, collate, seed: int) -> dict:
    """Per-crop masked-token counts and the upper bounds of ``MASK_BATCHES`` collated batches."""
    import random

    import torch

    random.seed(seed)
    grid = 14
    generator = masking_generator(input_size=(grid, grid), max_num_patches=0.5 * grid * grid)
    samples = [({"global_crops": [torch.zeros(1)] * 2, "local_crops": [torch.zeros(1)] * 8}, ()) for _ in range(64)]
    counts, bounds = [], []
    for _ in range(MASK_BATCHES):
        batch = collate(samples, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, dtype=torch.float32,
                        n_tokens=grid * grid, mask_generator=generator)  # fmt: skip
        counts.append(batch["collated_masks"].sum(dim=1))
        bounds.append(batch["upperbound"])
    return {"counts": torch.cat(counts), "upperbounds": torch.tensor(bounds)}


def run_original_recipe(args: argparse.Namespace) -> None:
    """Child process: the original's schedules and per-parameter groups, saved to ``args.reference``."""
    import torch

    bench, original = import_original(args)
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.train.train import build_schedulers
    from dinov2.utils import param_groups  # the original's module (ours is dinov2.train.param_groups)
    from dinov2.utils.config import apply_scaling_rules_to_cfg

    package = Path(original.__file__).parent
    cfg = apply_scaling_rules_to_cfg(bench.original_config(package, bench.PRESETS["vitl16_short"]))  # lr, batch 64
    schedules = {name: torch.from_numpy(s.schedule.copy()) for name, s in zip(SCHEDULES, build_schedulers(cfg))}
    model = SSLMetaArch(bench.original_config(package, bench.PRESETS["vitl16_short"] + RECIPE_MODEL))
    groups = []
    for key, module in model.student.items():  # as its get_params_groups does, before fusing
        found = param_groups.get_params_groups_with_decay(
            model=module, lr_decay_rate=cfg.optim.layerwise_decay, patch_embed_lr_mult=cfg.optim.patch_embed_lr_mult
        )
        for g in found:
            groups.append({k: g[k] for k in ("lr_multiplier", "wd_multiplier", "is_last_layer")})
            groups[-1]["name"] = f"{key}.{g['name']}"
    from dinov2.data import MaskingGenerator, collate_data_and_cast

    masks = draw_masks(MaskingGenerator, collate_data_and_cast, args.seed)
    torch.save({"lr": float(cfg.optim.lr), "schedules": schedules, "groups": groups, "masks": masks}, args.reference)


def compare_recipe(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Our schedules and parameter groups against the original's: the report and printed lines."""
    import torch

    from dinov2.checkpoint.adapters import convert_weight_norm_keys
    from dinov2.train.param_groups import get_params_groups_with_decay
    from dinov2.train.schedules import build_schedulers, scaled_lr
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.utils.config import load_config

    ref = original_side(args, "recipe")
    cfg = load_config("vitl16_short")
    cfg.optim.lr = scaled_lr(cfg.optim.base_lr, cfg.train.batch_size_per_gpu, cfg.optim.scaling_rule)
    ours = dict(zip(SCHEDULES, build_schedulers(cfg)))
    report, lines = {"lr": {"ours": cfg.optim.lr, "original": ref["lr"]}, "schedules": {}}, []
    for name in SCHEDULES:
        mine = torch.as_tensor(ours[name].schedule, dtype=torch.float64)
        theirs = ref["schedules"][name].double()
        same_length = mine.shape == theirs.shape
        cell = compare_tensors(mine, theirs) if same_length else {"lengths": [len(mine), len(theirs)]}
        report["schedules"][name] = cell
        lines.append(f"schedule {name:<14} {len(theirs):>7} iterations: "
                     + (f"max rel. diff {cell['rel']:.1e}" if same_length else f"lengths differ {cell['lengths']}"))  # fmt: skip
    model = SSLMetaArch(load_config("vitl16_short", RECIPE_MODEL + ["train.device=cpu"]))
    mine = {}
    for key, module in model.student.items():
        for g in get_params_groups_with_decay(module, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult):
            mine[f"{key}.{g['name']}"] = g
    theirs = convert_weight_norm_keys({g["name"]: g for g in ref["groups"]})
    differ = {}
    for name in sorted(set(mine) | set(theirs)):
        if name not in mine or name not in theirs:
            differ[name] = "only in " + ("ours" if name in mine else "the original")
            continue
        for key in ("lr_multiplier", "wd_multiplier", "is_last_layer"):
            a, b = mine[name][key], theirs[name][key]
            if (abs(a - b) > 1e-12 * max(abs(b), 1.0)) if key != "is_last_layer" else a != b:
                differ.setdefault(name, {})[key] = {"ours": a, "original": b}
    report["param_groups"] = {"parameters": len(theirs), "differ": differ}
    from dinov2.data.collate import collate_data_and_cast
    from dinov2.data.masking import MaskingGenerator

    report["masks"] = compare_masks(draw_masks(MaskingGenerator, collate_data_and_cast, args.seed), ref["masks"])
    lines.insert(0, f"peak lr for batch 64 on one GPU: ours {cfg.optim.lr:.6g}, original {ref['lr']:.6g}")
    lines.append(f"parameter groups: {len(theirs)} parameters, {len(differ)} with another setting")
    for name, what in differ.items():
        lines.append(f"  {name}: {what}")
    m = report["masks"]
    lines.append(f"iBOT masks, {m['crops']} global crops: masked tokens per crop {m['mean']['ours']:.2f} vs "
                 f"{m['mean']['original']:.2f} (mean), unmasked crops {m['unmasked']['ours']:.4f} vs "
                 f"{m['unmasked']['original']:.4f}, upper bound {m['upperbound']['ours']:.1f} vs "
                 f"{m['upperbound']['original']:.1f}, total variation of the count histograms {m['total_variation']:.4f} "
                 f"(two draws of the original: {m['total_variation_original_vs_itself']:.4f})")  # fmt: skip
    return report, lines


def compare_masks(ours: dict, theirs: dict) -> dict:
    """Summary statistics and the histogram distance of two mask draws (different random streams)."""
    import torch

    def histogram(counts):
        return torch.bincount(counts.long(), minlength=197).double() / len(counts)

    def tv(a, b):
        return 0.5 * (histogram(a) - histogram(b)).abs().sum().item()

    half = len(theirs["counts"]) // 2  # the original's own sampling noise: its first half against its second
    return {
        "crops": len(theirs["counts"]),
        "mean": {"ours": ours["counts"].double().mean().item(), "original": theirs["counts"].double().mean().item()},
        "unmasked": {"ours": (ours["counts"] == 0).double().mean().item(),
                     "original": (theirs["counts"] == 0).double().mean().item()},
        "upperbound": {"ours": ours["upperbounds"].double().mean().item(),
                       "original": theirs["upperbounds"].double().mean().item()},
        "total_variation": tv(ours["counts"], theirs["counts"]),
        "total_variation_original_vs_itself": tv(theirs["counts"][:half], theirs["counts"][half:]),
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------- ours
def contributions_original(terms: dict, cfg) -> dict:
    """Each term's share of the backpropagated loss, from the original's display values."""
    out = {}
    for name in ("dino_local_crops_loss", "dino_global_crops_loss"):
        if name in terms:
            out[name] = cfg.dino.loss_weight * terms[name]
    if "koleo_loss" in terms:
        out["koleo_loss"] = 2 * terms["koleo_loss"]  # shown as koleo_weight * sum / 2
    if "ibot_loss" in terms:
        out["ibot_loss"] = cfg.ibot.loss_weight * 2 * terms["ibot_loss"]  # shown halved
    return out


def contributions_ours(terms: dict, cfg) -> dict:
    weights = {"dino_local_crops_loss": cfg.dino.loss_weight, "dino_global_crops_loss": cfg.dino.loss_weight,
               "koleo_loss": cfg.dino.koleo_loss_weight, "ibot_loss": cfg.ibot.loss_weight}  # fmt: skip
    return {name: weights[name] * float(value) for name, value in terms.items() if name in weights}


def compare_tensors(ours, theirs) -> dict:
    diff = (ours.double() - theirs.double()).abs().max().item()
    scale = theirs.double().abs().max().item()
    return {"max_abs": diff, "max_ref": scale, "rel": diff / scale if scale else diff}


def default_differences(original_defaults: dict, ours_cfg) -> dict:
    from omegaconf import OmegaConf

    theirs = flat(original_defaults)
    ours = flat(OmegaConf.to_container(ours_cfg, resolve=True))
    differ = {k: {"original": theirs[k], "ours": ours[k]} for k in sorted(theirs) if k in ours and theirs[k] != ours[k]}
    return {"differ": differ, "only_original": sorted(set(theirs) - set(ours))}


def original_side(args: argparse.Namespace, case: str) -> dict:
    """The original's weights, batches and results for ``case``, from a child process."""
    import torch

    with tempfile.TemporaryDirectory() as scratch:
        reference = Path(scratch) / "original.pt"
        child = [sys.executable, str(Path(__file__).resolve()), "--side", "original", "--reference", str(reference),
                 "--source", str(args.source.resolve()), "--centering", args.centering, "--seed", str(args.seed),
                 "--cases", case]  # fmt: skip
        if case == "recipe":
            child[child.index("--side") + 1 : child.index("--side") + 2] = ["original-recipe"]
            child = child[: child.index("--cases")]
        child += ["--separate-ibot-head"] if args.separate_ibot_head else []
        subprocess.run(child, check=True, cwd=scratch)  # the child keeps our dinov2 off its path itself
        return torch.load(reference, weights_only=True)


def compare_case(args: argparse.Namespace, case: str, ref: dict) -> tuple[dict, list[tuple]]:
    """Our side of ``case`` against the original's results ``ref``: the report and the table rows."""
    from dinov2.checkpoint.adapters import convert_weight_norm_keys

    model, cfg = our_model(args, case, ref["weights"])
    rows, report = [], {"settings": settings(args, case), "steps": []}
    for k, (batch, theirs) in enumerate(zip(ref["batches"], ref["steps"], strict=True)):
        model.zero_grad(set_to_none=True)
        out = model(batch, teacher_temp=TEACHER_TEMP)
        out["loss"].backward()
        model.apply_center_updates()
        step = {"terms": {}, "grads": {}, "centers": {}}
        mine, their = contributions_ours(out, cfg), contributions_original(theirs["terms"], cfg)
        mine["total"], their["total"] = float(out["loss"]), sum(their.values())
        for name in their:
            diff = abs(mine[name] - their[name])
            step["terms"][name] = {"ours": mine[name], "original": their[name], "abs": diff,
                                   "rel": diff / abs(their[name]) if their[name] else diff}  # fmt: skip
        their_grads = convert_weight_norm_keys(theirs["grads"])
        my_grads = {n: p.grad for n, p in model.student.named_parameters() if p.grad is not None}
        per_param = {n: compare_tensors(my_grads[n], their_grads[n]) for n in sorted(set(my_grads) & set(their_grads))}
        worst = max(per_param, key=lambda n: per_param[n]["rel"])
        step["grads"] = {"parameters": len(per_param), "worst": worst, **per_param[worst],
                         "trained_only_by_ours": sorted(set(my_grads) - set(their_grads)),
                         "trained_only_by_original": sorted(set(their_grads) - set(my_grads))}  # fmt: skip
        step["centers"] = {
            "dino": compare_tensors(model.dino_loss.center.flatten(), theirs["centers"]["dino"].flatten()),
            "ibot": compare_tensors(model.ibot_patch_loss.center.flatten(), theirs["centers"]["ibot"].flatten()),
        }
        report["steps"].append(step)
        for name, cell in step["terms"].items():
            rows.append((case, k + 1, name, cell["ours"], cell["original"], cell["rel"]))
        rows.append((case, k + 1, f"gradient, worst of {len(per_param)} ({worst})", None, None, step["grads"]["rel"]))
        for side in ("ours", "original"):
            for name in step["grads"][f"trained_only_by_{side}"]:
                rows.append((case, k + 1, f"gradient only in {side}: {name}", None, None, float("nan")))
        for name, cell in step["centers"].items():
            rows.append((case, k + 1, f"{name} centre after the step", None, None, cell["rel"]))
    return report, rows


def our_model(args: argparse.Namespace, case: str, weights: dict):
    """Our ``SSLMetaArch`` for ``case`` with the original's initial ``weights``, and its config."""
    from dinov2.checkpoint.adapters import convert_weight_norm_keys
    from dinov2.train.ssl_meta_arch import SSLMetaArch
    from dinov2.utils.config import load_config

    cfg = load_config(None, settings(args, case) + ["student.attn_backend=math", "train.device=cpu"])
    model = SSLMetaArch(cfg)
    weights = convert_weight_norm_keys(weights)
    for side in ("student", "teacher"):
        prefix = side + "."
        getattr(model, side).load_state_dict({k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)})
    model.train()
    return model, cfg


def weight_pieces(state: dict, side: str) -> dict:
    """``side``'s floating-point tensors of a ``{side.name: tensor}`` state, each attention ``qkv.bias``
    split into its query, key and value thirds (``...qkv.bias[k]``)."""
    out = {}
    for name, value in state.items():
        if not name.startswith(side + ".") or not value.is_floating_point():
            continue
        if name.endswith("attn.qkv.bias"):
            for label, part in zip("qkv", value.chunk(3), strict=True):
                out[f"{name}[{label}]"] = part
        else:
            out[name] = value
    return out


def compare_updates(ours, theirs, lr: float) -> dict:
    """Two updates of one tensor: ``rel``, ``||ours - original|| / ||original||`` (L2), and
    ``max_abs_over_lr``, the largest element's difference in units of the lr. AdamW's first steps
    are about ``lr * sign(gradient)``, so an element whose gradient is near AdamW's eps (1e-8) turns
    float32 rounding into a visible difference there; the L2 ratio weighs those few elements by
    their share."""
    diff = ours.double() - theirs.double()
    norm = theirs.double().norm().item()
    return {"rel": diff.norm().item() / norm if norm else diff.norm().item(),
            "max_abs_over_lr": diff.abs().max().item() / lr, "norm_original": norm}  # fmt: skip


def set_apart(name: str) -> str | None:
    """Why the update of ``name`` is expected to differ, or None."""
    if name.endswith("qkv.bias[k]"):  # q . b_k is the same for every key, so softmax cancels it
        return "zero gradient in exact arithmetic"
    return None


def compare_full_steps(args: argparse.Namespace, case: str, ref: dict) -> tuple[dict, list[tuple]]:
    """``FULL_STEPS`` through our training loop's ``Trainer.step`` (clip per module, AdamW over our
    groups, EMA) against the original's: each student and teacher tensor's update since the start
    (weights after the step minus the initial weights), compared by :func:`compare_updates`.

    Set apart: the key third of each qkv bias. Its gradient is zero in exact arithmetic, so both codes see rounding noise there, and AdamW's
    normalised step turns that noise into updates up to the lr in both."""
    import torch

    from dinov2.checkpoint.adapters import convert_weight_norm_keys
    from dinov2.train.loop import Trainer
    from dinov2.train.schedules import apply_optim_scheduler

    model, cfg = our_model(args, case, ref["weights"])
    start = convert_weight_norm_keys(ref["weights"])
    rows, report = [], []
    with tempfile.TemporaryDirectory() as scratch:
        trainer = Trainer(cfg, model, torch.device("cpu"), scratch)
        for k, (values, batch, theirs) in enumerate(zip(FULL_STEPS, ref["batches"], ref["full_steps"], strict=True)):
            apply_optim_scheduler(trainer.optimizer, values["lr"], values["wd"], values["last_layer_lr"])
            trainer.step(iter([batch]), {"teacher_temp": TEACHER_TEMP, **values})
            theirs = convert_weight_norm_keys(theirs)
            mine = {f"{side}.{key}": value for side in ("student", "teacher")
                    for key, value in getattr(model, side).state_dict().items()}  # fmt: skip
            step = {}
            for side in ("student", "teacher"):
                a, b, w0 = weight_pieces(mine, side), weight_pieces(theirs, side), weight_pieces(start, side)
                cells = {
                    n: compare_updates(a[n] - w0[n], b[n] - w0[n], values["lr"])
                    for n in sorted(set(a) & set(b) & set(w0))
                }
                apart = {n: (set_apart(n), cells.pop(n)) for n in list(cells) if set_apart(n)}
                worst = max(cells, key=lambda n: cells[n]["rel"])
                step[side] = {"tensors": len(cells), "worst": worst, **cells[worst],
                              "set_apart": {n: {"why": why, "rel": c["rel"]} for n, (why, c) in apart.items()}}  # fmt: skip
                rows.append((case, k + 1, f"{side} update, worst of {len(cells)} ({worst.split('.', 1)[1]})",
                             None, None, cells[worst]["rel"]))  # fmt: skip
                for why in sorted({why for why, _ in apart.values()}):
                    rel = max(c["rel"] for w, c in apart.values() if w == why)
                    rows.append((case, k + 1, f"{side} update, set apart: {why}", None, None, rel))
            report.append(step)
    return {"steps": report, "schedule_values": FULL_STEPS}, rows


def run_ours(args: argparse.Namespace) -> dict:
    from dinov2.utils.config import load_default_config

    report = {"teacher_temp": TEACHER_TEMP, "centering": args.centering, "separate_ibot_head": args.separate_ibot_head,
              "note": "rel: |ours - original| / |original| for terms, max|diff| / max|original| per tensor",
              "cases": {}}  # fmt: skip
    rows, ref = [], None
    for case in args.cases:
        ref = original_side(args, case)
        report["cases"][case], case_rows = compare_case(args, case, ref)
        report["cases"][case]["full_steps"], step_rows = compare_full_steps(args, case, ref)
        rows += case_rows + step_rows
    report["default_differences"] = default_differences(ref["default_config"], load_default_config())
    print(f"{'case':<27} {'step':>4}  {'quantity':<62} {'ours':>10} {'original':>10} {'rel. diff':>9}")
    for case, step_no, name, mine, their, rel in rows:
        cells = f"{mine:>10.6f} {their:>10.6f}" if mine is not None else f"{'':>10} {'':>10}"
        print(f"{case:<27} {step_no:>4}  {name:<62} {cells} {rel:>9.2e}")
    differ = report["default_differences"]["differ"]
    print(f"defaults of the original's config that differ from ours ({len(differ)}): "
          + ", ".join(f"{k} {v['original']} -> {v['ours']}" for k, v in differ.items()))  # fmt: skip
    report["recipe"], lines = compare_recipe(args)
    print("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.side == "original":
        run_original(args)
        return None
    if args.side == "original-recipe":
        run_original_recipe(args)
        return None
    report = run_ours(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    partial = args.output.with_name(args.output.name + ".tmp")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(args.output)
    return report


if __name__ == "__main__":
    main()
