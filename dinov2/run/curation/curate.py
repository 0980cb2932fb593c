"""Submit the curation pipeline to SLURM: one task per GPU, each running :func:`dinov2.curation.__main__.main`.

    python dinov2/run/curation/curate.py --nodes 4 --ngpus 8 --partition P \\
        run --config lvd_vitl14 --output-dir OUT pool=/data/uncurated.txt [key=value ...]

Every task embeds its share of the chunks; rank 0 then deduplicates, clusters and retrieves. A
preempted or timed-out job is requeued with the same command, less ``--redo STAGE`` (which would
delete the finished work again), and skips what it had finished (stages and embedding chunks). SLURM options (:func:`dinov2.run.submit.get_slurm_args_parser`) are
taken out wherever they appear. See docs/curation.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__" and not __package__:
    # Run as a file: import the repository's package, not modules next to this file.
    sys.path[0] = str(Path(__file__).resolve().parents[3])

from dinov2.run.submit import EntryPoint, submit  # noqa: E402

ENTRY = EntryPoint(
    "dinov2.curation.__main__", "dinov2-curate", main_takes_argv=True, config_attr="config",
    config_loader="dinov2.curation.pipeline:load_curation_config", intermixed=True,
    start_over=(("--redo", "redo", True),),  # a requeued job must not delete what it had finished
)  # fmt: skip


def main(argv: Sequence[str] | None = None):
    """Submit the job; returns the submitit job."""
    return submit(ENTRY, argv)


if __name__ == "__main__":
    main()
