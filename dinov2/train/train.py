"""DINOv2 pretraining entry point.

    python dinov2/train/train.py --config quickstart --output-dir runs/quickstart [key=value ...]
    torchrun --nproc_per_node=8 dinov2/train/train.py --config vitl16_short --output-dir OUT

The same :func:`main` serves ``python -m dinov2.train.train``, the ``dinov2-train`` console script
and the SLURM launcher. Setup happens here; the loop lives in :mod:`dinov2.train.loop`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run as a file: import the repository's package, not modules next to this file.
    sys.path[0] = str(Path(__file__).resolve().parents[2])

from omegaconf import OmegaConf  # noqa: E402

from dinov2 import distributed  # noqa: E402
from dinov2.checkpoint.training import atomic_write  # noqa: E402
from dinov2.train.schedules import scaled_lr  # noqa: E402
from dinov2.utils.config import is_integer_at_least, load_config, select  # noqa: E402
from dinov2.utils.device import enable_tf32, resolve_device, seed_everything  # noqa: E402
from dinov2.utils.logging import setup_logging  # noqa: E402

logger = logging.getLogger("dinov2")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("DINOv2 training", add_help=add_help)
    parser.add_argument(
        "--config", "--config-file", dest="config", default="",
        help="a config name under configs/train/ (with or without .yaml), distill/NAME, or a path; empty: the default config",
    )  # fmt: skip
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", default="", help="run directory")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    parser.add_argument("--eval-only", action="store_true", help="export and evaluate the latest checkpoint, then exit")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="key=value config overrides, e.g. optim.epochs=10")
    return parser


def _positive_int(cfg: Any, key: str) -> int:
    """The value of ``key``, which must be a positive integer (a batch size, a number of steps)."""
    value = select(cfg, key)
    if not is_integer_at_least(value, 1):
        raise ValueError(f"{key} must be a positive integer, got {value!r}")
    return int(value)


def setup_config(args: argparse.Namespace, cfg: Any = None) -> Any:
    """Default <- experiment config <- overrides (``cfg`` when already loaded); output dir and the
    derived lr filled in, for the current world size."""
    if cfg is None:
        cfg = load_config(args.config or None, args.opts)
    if args.output_dir:
        cfg.train.output_dir = str(args.output_dir)
    world = distributed.get_world_size()
    batch = _positive_int(cfg, "train.batch_size_per_gpu") * world * _positive_int(cfg, "train.grad_accum_steps")
    lr = scaled_lr(float(cfg.optim.base_lr), batch, str(cfg.optim.scaling_rule))
    given = float(cfg.optim.lr)
    if given not in (0.0, lr):  # 0 is the default; the computed value is what a saved config.yaml holds
        logger.warning(
            "optim.lr=%g is replaced by %g, computed from optim.base_lr=%g for a global batch of %d (%s); "
            "set optim.base_lr to change the learning rate",
            given, lr, float(cfg.optim.base_lr), batch, cfg.optim.scaling_rule,
        )  # fmt: skip
    cfg.optim.lr = lr
    return cfg


# What a run writes to its output directory besides its logs; --no-resume moves an earlier run's aside.
RUN_OUTPUTS = ("checkpoints", "training_metrics.json", "tensorboard", "eval", "config.yaml")


def set_aside_previous_run(output_dir: Path) -> Path | None:
    """``--no-resume`` in a directory that holds a run: move that run's checkpoints, metrics, exports and
    config into ``OUTPUT/replaced_{time}/`` (nothing is deleted), so that the new run neither appends to
    them nor, when requeued or restarted, resumes from them. Returns where they went, or None."""
    checkpoints = output_dir / "checkpoints"
    has_run = (checkpoints.is_dir() and any(checkpoints.iterdir())) or (output_dir / "training_metrics.json").is_file()
    if not has_run:
        return None
    base = time.strftime("replaced_%Y%m%d-%H%M%S")
    aside, suffix = output_dir / base, 0
    while aside.exists():
        suffix += 1
        aside = output_dir / f"{base}.{suffix}"
    aside.mkdir()
    for name in RUN_OUTPUTS:
        if (output_dir / name).exists():
            (output_dir / name).rename(aside / name)
    logger.warning("--no-resume: the earlier run in %s was moved to %s", output_dir, aside)
    return aside


def write_run_config(cfg: Any, output_dir: Path) -> None:
    """``OUTPUT/config.yaml`` (rank 0): the resolved config (interpolations written as their values),
    atomically, so that a killed run never leaves a torn file for the evaluations or for a distillation
    that reads it. Written once the run's own checkpoint (if any) has loaded, so that a config whose
    model no longer fits it leaves the file describing the checkpoints."""
    if distributed.is_main_process():
        resolved = OmegaConf.to_yaml(cfg, resolve=True).encode()
        atomic_write(output_dir / "config.yaml", lambda handle: handle.write(resolved))


def build_model(cfg: Any, device):
    """The meta-architecture (SSLMetaArch, or DistillMetaArch with ``distillation.enabled``), built
    on the meta device, parallelised (checkpointing -> compile ->
    FSDP2 with several processes), then materialised on ``device`` with the seeded initialisation:
    no process ever holds the whole unsharded model, and the values do not depend on the world size."""
    import torch

    from dinov2.distributed.parallelize import parallelize

    if select(cfg, "distillation.enabled", False):  # a frozen pretrained teacher (configs/distill/)
        from dinov2.train.distill_meta_arch import DistillMetaArch as MetaArch
    else:
        from dinov2.train.ssl_meta_arch import SSLMetaArch as MetaArch

    with torch.device("meta"):
        model = MetaArch(cfg)
    summary = parallelize(model, cfg, device)
    model.to_empty(device=device)
    model.init_weights(int(cfg.train.seed))
    logger.info("parallelism: %s", ", ".join(f"{k} {v}" for k, v in summary.items()))
    return model


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = get_args_parser().parse_args(argv)
    cfg = load_config(args.config or None, args.opts)
    device = resolve_device(cfg.train.device)
    joined = not distributed.is_enabled()  # a group made here is destroyed here, once the run completes
    distributed.init_from_env(device)
    cfg = setup_config(args, cfg)  # the lr depends on the world size, known once the group exists
    output_dir = Path(cfg.train.output_dir)
    setup_logging(output_dir, rank=distributed.get_rank())
    from dinov2.checkpoint.lock import lock_for_training, unlock_output_directory
    from dinov2.train.init_from import load_init_source, resolve_init_source

    # train.init_from: a new run from another run's weights (None when resuming from this run's own);
    # checked before anything is written, so that a wrong value leaves the output directory alone
    init_source = resolve_init_source(cfg, output_dir / "checkpoints", resume=args.eval_only or not args.no_resume)
    if not args.eval_only:  # first: another job training into this directory stops this one before
        lock_for_training(output_dir)  # anything of its run is moved aside or overwritten (a collective)
    try:
        if distributed.is_main_process():
            output_dir.mkdir(parents=True, exist_ok=True)
            if args.no_resume and not args.eval_only:
                set_aside_previous_run(output_dir)
        distributed.barrier()  # no rank looks into the output directory before rank 0 has set it up
        logger.info("config:\n%s", OmegaConf.to_yaml(cfg))
        logger.info("device %s, %d process(es); lr %.4g (base_lr %s, %s)", device, distributed.get_world_size(),
                    cfg.optim.lr, cfg.optim.base_lr, cfg.optim.scaling_rule)  # fmt: skip
        enable_tf32(device, bool(cfg.compute_precision.tf32))
        # The backbone returns dicts of views (CLS / patch slices of one tensor); nothing modifies them
        # in place, which is what FSDP2's warning is about.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")

        from dinov2.train.loop import Trainer

        seed_everything(int(cfg.train.seed))  # the same seed on every rank: identical initial weights
        model = build_model(cfg, device)
        if init_source is not None:
            load_init_source(model, init_source)
        seed_everything(int(cfg.train.seed), distributed.get_rank())  # then per-rank streams (stochastic depth)
        trainer = Trainer(cfg, model, device, output_dir)
        if args.eval_only:  # trains nothing: the run's metrics and its config.yaml are kept as they are
            if not trainer.resume(truncate_metrics=False):
                logger.warning(
                    "--eval-only: no checkpoint in %s; evaluating the initial weights", trainer.checkpoint_dir
                )
            if not (output_dir / "config.yaml").is_file():
                write_run_config(cfg, output_dir)
            result = {"iteration": trainer.iteration, **trainer.evaluate(f"training_{trainer.iteration}")}
        else:
            if not args.no_resume:  # first: a config whose model does not fit the checkpoint stops here
                trainer.resume()
            write_run_config(cfg, output_dir)
            result = trainer.run(resume=False)
    except BaseException:
        if not args.eval_only:  # on an error too: this process may go on (tests, a notebook) and another job train here
            unlock_output_directory(output_dir)
        raise
    if joined:  # not on an error path: see distributed.shutdown
        distributed.shutdown()
    return result


def console_main() -> None:
    """``dinov2-train`` console script."""
    main()


if __name__ == "__main__":
    main()
