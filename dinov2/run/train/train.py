"""Submit DINOv2 pretraining to SLURM: one task per GPU, each running :func:`dinov2.train.train.main`.

    python dinov2/run/train/train.py --nodes 4 --ngpus 8 --partition P --config vitl16_short \\
        --output-dir runs/%j [key=value ...]

Takes the SLURM options of :func:`dinov2.run.submit.get_slurm_args_parser` anywhere on the line and
passes everything else to the training entry point unchanged (``--config``, ``--output-dir``,
``--no-resume``, ``--eval-only``, ``key=value`` overrides). A preempted or timed-out job is requeued
and resumes from ``OUTPUT_DIR/checkpoints``. See docs/distributed.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: import the repository's package, not modules next to this file.
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from dinov2.run.submit import EntryPoint, submit  # noqa: E402

ENTRY = EntryPoint("dinov2.train.train", "dinov2-train", main_takes_argv=True, config_attr="config", sets_aside=True)


def main(argv: Sequence[str] | None = None):
    """Submit the job; returns the submitit job."""
    return submit(ENTRY, argv)


if __name__ == "__main__":
    main()
