"""Command line of the curation pipeline.

    python -m dinov2.curation run --config lvd_vitl14 --output-dir OUT pool=/data/uncurated [key=value ...]
    python -m dinov2.curation embed    --config C --output-dir OUT     # one stage (earlier ones must be done)
    python -m dinov2.curation dedup    --config C --output-dir OUT
    python -m dinov2.curation cluster  --config C --output-dir OUT
    python -m dinov2.curation retrieve --config C --output-dir OUT
    torchrun --nproc_per_node=8 -m dinov2.curation run ...             # the embed stage on 8 GPUs

Rerunning skips finished stages and finished embedding chunks; ``--redo STAGE`` redoes a stage and
the ones after it. The ``dinov2-curate`` console script is the same command.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dinov2.curation.pipeline import STAGES


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "python -m dinov2.curation", description="DINOv2 data curation", add_help=add_help, allow_abbrev=False
    )
    parser.add_argument("stage", choices=("run", *STAGES), help="'run' for every stage in order, or one stage")
    parser.add_argument("--config", "--config-file", dest="config", default="",
                        help="a name under configs/curation/ or a path; empty: configs/curation/default.yaml")  # fmt: skip
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", required=True, help="pipeline directory")
    parser.add_argument("--redo", choices=STAGES, default=None, help="redo this stage and the ones after it")
    parser.add_argument("opts", nargs="*", default=[], help="key=value config overrides, e.g. pool=/data/images")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options, the stage and the ``key=value`` overrides (``opts``), in any order."""
    parser = get_args_parser()
    args = parser.parse_intermixed_args(argv)
    bad = [o for o in args.opts if "=" not in o]
    if bad:
        parser.error(f"unrecognised arguments: {' '.join(bad)} (overrides look like key=value)")
    if args.redo and args.stage != "run" and STAGES.index(args.redo) < STAGES.index(args.stage):
        parser.error(f"--redo {args.redo} deletes stage {args.redo!r}, which {args.stage!r} needs and does not run; "
                     f"use 'run --redo {args.redo}', or '{args.redo} --redo {args.redo}' first")  # fmt: skip
    return args


def main(argv: Sequence[str] | None = None) -> dict | None:
    from dinov2 import distributed
    from dinov2.curation.pipeline import load_curation_config, run_pipeline
    from dinov2.utils.device import resolve_device
    from dinov2.utils.logging import setup_logging

    args = parse_args(argv)
    cfg = load_curation_config(args.config or None, args.opts)
    distributed.init_from_env(resolve_device(cfg.embed.device))
    setup_logging(args.output_dir, rank=distributed.get_rank())
    stages = STAGES if args.stage == "run" else (args.stage,)
    report = run_pipeline(cfg, args.output_dir, stages, redo=args.redo)
    if report is not None:
        print(json.dumps(report["sizes"], indent=2))
    return report


def console_main() -> None:
    main(sys.argv[1:])


if __name__ == "__main__":
    console_main()
