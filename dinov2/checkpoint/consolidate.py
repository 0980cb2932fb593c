"""Write the full teacher (or student) backbone of a sharded training checkpoint as one file.

    python -m dinov2.checkpoint.consolidate OUT/checkpoints/step_0125000 --output vitg14_teacher.pth
    python -m dinov2.checkpoint.consolidate OUT --output teacher.pth      # the run's latest checkpoint

The output is the published single-file layout (a flat backbone state dict with ``blocks.N.``
keys, block chunks flattened, as ``dinov2_vitg14_pretrain.pth``), loadable with
``dinov2_vitg14(weights=...)``, plus the same tensors as ``.safetensors`` next to it (an output
ending in ``.safetensors`` is that file alone); both are written atomically. No process
group and no knowledge of the world size the checkpoint was saved with are needed: DCP stores each
tensor whole in its metadata, and only the chosen backbone is read.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[2])

import torch  # noqa: E402

from dinov2.checkpoint.adapters import adapt_backbone_state_dict  # noqa: E402
from dinov2.checkpoint.io import expand_user, is_url  # noqa: E402
from dinov2.checkpoint.sharded import STEP_PATTERN, find_latest_checkpoint, is_complete, load_full_tensors  # noqa: E402
from dinov2.checkpoint.training import atomic_torch_save, atomic_write_path  # noqa: E402

logger = logging.getLogger("dinov2")

RUN_CONFIG = "config.yaml"  # a training run's resolved config, next to its checkpoints/ and eval/


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else the latest one in ``path`` or ``path/checkpoints``."""
    path = Path(path)
    if is_complete(path):
        return path
    for directory in (path, path / "checkpoints"):
        latest = find_latest_checkpoint(directory)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"no training checkpoint (step_<N>/ with .metadata) at or under {path}")


def _run_dir_of(path: Path) -> Path | None:
    """The run directory that the absolute ``path`` is, or lies in by a run's layout (see :func:`run_config_of`)."""
    if path.is_dir():
        if (path / RUN_CONFIG).is_file():
            return path  # OUT itself, also one kept in a folder named checkpoints (~/checkpoints/vitl_run)
        if path.name == "checkpoints":
            return path.parent
        if (path.parent.name == "checkpoints" and STEP_PATTERN.match(path.name)) or (
            path.parent.name == "eval" and path.name.startswith("training_")
        ):
            return path.parent.parent  # OUT/checkpoints/step_N, OUT/eval/training_N
        return None
    if path.parent.parent.name == "eval" and path.parent.name.startswith("training_"):
        return path.parent.parent.parent  # OUT/eval/training_N/teacher_checkpoint.pth (or the .safetensors)
    return None


def run_config_of(location: str | os.PathLike | None) -> Path | None:
    """The ``config.yaml`` of the training run that the weights at ``location`` belong to: ``location``
    is the run directory ``OUT``, ``OUT/checkpoints``, ``OUT/checkpoints/step_N``,
    ``OUT/eval/training_N`` or a file in it; None for anything else (a URL, a file elsewhere).
    A relative ``location`` is taken from the working directory; one that is a symbolic link, or
    lies under one, is also looked for where it leads (``OUT/checkpoints`` linked to scratch space
    is found by its name, a link to an export by its target)."""
    if not location or is_url(str(location)):
        return None
    path = Path(os.path.abspath(expand_user(location)))  # ``step_N`` inside OUT/checkpoints has a parent then
    for candidate in dict.fromkeys((path, Path(os.path.realpath(path)))):
        run = _run_dir_of(candidate)
        if run is not None and (run / RUN_CONFIG).is_file():
            return run / RUN_CONFIG
    return None


def consolidate(checkpoint: str | Path, output: str | Path, branch: str = "teacher", safetensors: bool = True) -> dict:
    """Write ``branch``'s backbone of ``checkpoint`` to ``output`` (and, with ``safetensors``,
    ``output`` with a ``.safetensors`` suffix; an ``output`` ending in ``.safetensors`` is written
    as safetensors alone); returns the flat state dict written."""
    from safetensors.torch import save_file

    path = resolve_checkpoint(checkpoint)
    backbone = load_full_tensors(path, f"model.{branch}.backbone.")
    flat, _ = adapt_backbone_state_dict(backbone)
    flat = {k: v.contiguous() for k, v in flat.items()}
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def write_safetensors(target: Path) -> None:
        atomic_write_path(target, lambda tmp: save_file(flat, str(tmp), metadata={"format": "pt"}))

    if output.suffix == ".safetensors":  # the safetensors file is the output; no twin
        write_safetensors(output)
    else:
        atomic_torch_save(flat, output)
        if safetensors:
            write_safetensors(output.with_suffix(".safetensors"))
    n_params = sum(v.numel() for v in flat.values())
    logger.info("wrote %s (%d tensors, %.1fM parameters) from %s", output, len(flat), n_params / 1e6, path)
    return flat


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Consolidate a sharded DINOv2 training checkpoint into one backbone file")
    parser.add_argument("checkpoint", help="a step_<N> checkpoint directory, or a run / checkpoints directory")
    parser.add_argument("--output", required=True, help="the .pth file to write (a .safetensors twin goes next to it)")
    parser.add_argument("--branch", default="teacher", choices=("teacher", "student"))
    parser.add_argument("--no-safetensors", action="store_true", help="write only the .pth file")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    flat = consolidate(args.checkpoint, args.output, branch=args.branch, safetensors=not args.no_safetensors)
    print(f"{args.output}: {len(flat)} tensors, {sum(v.numel() for v in flat.values()) / 1e6:.1f}M parameters")
    return flat


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
