"""Submit the linear probing to SLURM: one task per GPU, each running :func:`dinov2.eval.linear.main`.

    python dinov2/run/eval/linear.py --nodes 1 --ngpus 8 --partition P --config-file vitl14_pretrain \\
        --pretrained-weights W.pth --output-dir OUT/%j [the other arguments of dinov2/eval/linear.py]

SLURM options (:func:`dinov2.run.submit.get_slurm_args_parser`) are taken out wherever they
appear; everything else goes to the evaluation unchanged. A preempted or timed-out job is requeued
and resumes from ``OUTPUT_DIR/checkpoint_linear.pth``. See docs/distributed.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: import the repository's package, not modules next to this file.
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from dinov2.run.submit import EntryPoint, submit  # noqa: E402

ENTRY = EntryPoint("dinov2.eval.linear", "dinov2-linear")


def main(argv: Sequence[str] | None = None):
    """Submit the job; returns the submitit job."""
    return submit(ENTRY, argv)


if __name__ == "__main__":
    main()
